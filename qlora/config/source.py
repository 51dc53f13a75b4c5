"""`ModelSource`: which model a command loads and how (path, adapter, 4-bit storage, compute dtype,
device), the one section that `generate`, `eval`, `merge`, `quantize` and `export-gguf` share, and
that `qlora.loading.load(**dataclasses.asdict(source))` takes as it is. `qlora train` keeps its own
layout of the same settings (`model.path`, `model.compute_dtype`, `quant.*`, `lora.init_from`,
`device`: config files written by earlier runs must keep loading) and hands them over as a
`ModelSource` through `TrainConfig.model_source()`.

The field declarations are functions so that a command holding one of these settings outside a
`ModelSource` (the training sections, `qlora eval judge`'s local judge) declares it with the same
help, alias and check rather than a copy of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from qlora.config.checks import blocksize, device, non_empty_str
from qlora.config.fields import Section, _opt
from qlora.config.names import ComputeDtype, SourceQuantType


def model_path_field(alias: str = "--model") -> Any:
    return _opt(
        doc="Base model: a local Hugging Face directory (config.json + *.safetensors), a .gguf file, "
        "or a Hugging Face hub id (needs the 'hub' extra).",
        alias=alias,
        check=non_empty_str,
    )


def compute_dtype_field() -> Any:
    return _opt(
        "auto",
        doc="Dtype of activations and of the dequantized weights in matmuls: auto (bfloat16 where the device "
        "computes it natively: CUDA GPUs that support it, CPUs with AVX-512 BF16 or AMX; float32 elsewhere, "
        "where bf16 matmuls are emulated and many times slower), bfloat16 (bf16), float16 (fp16) or "
        "float32 (fp32). LoRA weights and optimizer state stay float32.",
        alias="--compute-dtype",
    )


def device_field(default: str = "auto") -> Any:
    return _opt(
        default,
        doc="Device: auto (cuda if available, else cpu), cpu, cuda, cuda:<index> or mps.",
        alias="--device",
        check=device,
    )


def source_quant_type_field() -> Any:
    return _opt(
        "auto",
        doc="4-bit data type of the frozen base: nf4 (the QLoRA paper's NormalFloat), fp4, int4, or none "
        "(kept 16-bit); auto = as the adapter's training run stored it (the config.yaml beside the adapter), "
        "else nf4.",
        alias="--quant-type",
    )


@dataclass(kw_only=True)
class ModelSource(Section):
    """The model to load: base checkpoint, optional adapter, 4-bit storage, compute dtype and device."""

    SECTION: ClassVar[str] = "model"

    path: str = model_path_field()
    adapter: str | None = _opt(
        None,
        doc="A LoRA adapter directory (saved by qlora train, or PEFT's) applied on the base; none = the base alone.",
        alias="--adapter",
        check=non_empty_str,
    )
    quant_type: SourceQuantType = source_quant_type_field()
    double_quant: bool | None = _opt(
        None,
        doc="Quantize the per-block absmax constants to 8 bits too (~0.127 instead of 0.5 bits/parameter); "
        "none = as the adapter's training run did, else on.",
        alias="--double-quant",
    )
    blocksize: int | None = _opt(
        None,
        doc="Elements per absmax block of the 4-bit weights; none = the adapter's training run's, else 64.",
        alias="--blocksize",
        check=blocksize,
    )
    compute_dtype: ComputeDtype = compute_dtype_field()
    device: str = device_field()
