"""Merging a LoRA adapter into its base: one dense checkpoint that needs neither qlora nor peft.

For every adapted linear, W' = W + scale * B A (A [r, in], B [out, r], scale = alpha / r, or
alpha / sqrt(r) with rsLoRA, with that layer's r and alpha where the adapter has PEFT's rank_pattern /
alpha_pattern), computed in float32 and rounded once to the output dtype. The adapter is read by
`qlora.adapter.read_adapter`, the reader every command uses (it refuses what PEFT computes otherwise).
What W is is the choice users argue about, so `onto` names it:

- "dequantized": W = dequant(quant(W16)), the 4-bit base the adapter was trained against. Every
  block linear the training run quantized is written dequantized, adapted or not, so the merged
  model computes what base + adapter computed in training (up to the output dtype's rounding).
- "original": W = the checkpoint's own 16-bit weight. The adapter learned to correct the 4-bit
  base, so this model differs from base + adapter by the quantization error (the merge report
  measures by how much); it is what PEFT's `merge_and_unload` on a 16-bit base gives.

How the base was quantized in training (type, double quantization, block size, and the dtype the
weights were cast to before quantizing, i.e. the compute dtype the run resolved) is read from the
`config.yaml` that `qlora train` writes beside the adapter (`quant.*` through
`qlora.config.files.run_quantization`, `model.compute_dtype` by `qlora.precision`'s table); without
it the QLoRA defaults apply (nf4, double quantization, block 64, bfloat16), and explicit arguments
win over both. A compute dtype there that names no dtype ("auto" included: that is what was asked,
not what the run computed in) is an error naming the file and key, never a guess. A pre-quantized
bitsandbytes base has no 16-bit weights: "original" is refused there, "dequantized" uses the
stored codes.

The checkpoint is streamed one tensor at a time and the output written shard by shard, so peak
memory is about one tensor plus one shard, never the dense model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from qlora.adapter import read_adapter
from qlora.checkpoint_io.gguf_file import read_gguf
from qlora.checkpoint_io.safetensors_dir import iter_weights, read_config
from qlora.config.files import RUN_CONFIG, run_quantization
from qlora.config.names import canonical_dtype_name
from qlora.export.hf_dir import (
    DEFAULT_MAX_SHARD_BYTES,
    ShardedSafetensorsWriter,
    write_config,
    write_generation_config,
    write_tokenizer,
)
from qlora.loading import resolve_model_path
from qlora.lora import DEFAULT_TARGETS, LoraSpec
from qlora.precision import DTYPES
from qlora.quant.tensor import QuantizedTensor

ONTO = ("dequantized", "original")


class MergeError(ValueError):
    """A merge that cannot be done as asked; the message says why and what to do."""


@dataclass(frozen=True)
class TrainedBase:
    """How the frozen base was stored while the adapter trained (the `quant` and compute-dtype settings)."""

    quant_type: str | None = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    dtype: torch.dtype = torch.bfloat16

    def base_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The float32 weight the adapter saw: `weight` quantized as in training, then dequantized."""
        if self.quant_type is None:
            return weight.to(self.dtype).float()
        return QuantizedTensor.quantize(weight.to(self.dtype), self.quant_type, self.blocksize,
                                        self.double_quant).dequantize(torch.float32)  # fmt: skip


def read_trained_base(adapter_dir: str | Path, **overrides: Any) -> TrainedBase:
    """The `TrainedBase` recorded in `adapter_dir/config.yaml` (if present), then `overrides` (non-None)."""
    quant = run_quantization(adapter_dir)  # {} without a config.yaml or its quant section
    recorded: dict[str, Any] = {}
    if quant:
        recorded = {"quant_type": None if quant["quant_type"] == "none" else quant["quant_type"],
                    "double_quant": quant["double_quant"], "blocksize": quant["blocksize"]}  # fmt: skip
    dtype = run_compute_dtype(adapter_dir)
    if dtype is not None:
        recorded["dtype"] = dtype
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("quant_type") == "none":
        given["quant_type"] = None
    return replace(TrainedBase(**recorded), **given)


def run_compute_dtype(directory: str | Path) -> torch.dtype | None:
    """The compute dtype the training run in `directory` resolved (`model.compute_dtype` of its config.yaml);
    None without a config.yaml or that key. MergeError, naming the file and key, for a value that is no dtype."""
    path = Path(directory) / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise MergeError(f"{path}: cannot read the training run's configuration: {e}") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or "compute_dtype" not in model:
        return None
    value = model["compute_dtype"]
    dtype = DTYPES.get(canonical_dtype_name(value)) if isinstance(value, str) else None
    if dtype is None:
        asked = " ('auto' is what the run was asked for, not the dtype it resolved)" if value == "auto" else ""
        raise MergeError(
            f"{path}: model.compute_dtype is {value!r}, not one of {', '.join(DTYPES)}{asked}. Set it to the dtype "
            "the run computed in (its log says 'compute dtype ...'); the merge rebuilds the 4-bit base from it."
        )
    return dtype


def is_block_linear_weight(name: str, suffixes: set[str]) -> bool:
    """Whether `name` is the weight of a decoder-block linear whose leaf name is in `suffixes`."""
    module, _, leaf = name.rpartition(".")
    return leaf == "weight" and module.rpartition(".")[2] in suffixes and module.startswith("model.layers.")


def merged_weights(
    model_path: str | Path,
    adapter_dir: str | Path | None,
    onto: str | None = None,
    base: TrainedBase | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, float32 tensor) of base + adapter merged, one tensor at a time (see module doc).

    `onto` None: "dequantized" with an adapter, "original" without (a plain base stays as it is).
    """
    if onto is None:
        onto = "dequantized" if adapter_dir is not None else "original"
    if onto not in ONTO:
        raise MergeError(f"onto must be one of {ONTO}, got {onto!r}")
    base = base or TrainedBase()
    path = resolve_model_path(model_path)
    spec, deltas = read_adapter(adapter_dir) if adapter_dir is not None else (LoraSpec(), {})
    quantized = set(DEFAULT_TARGETS) | set(spec.targets)
    source = read_gguf(path).iter_tensors() if path.suffix == ".gguf" else iter_weights(path)
    for name, tensor in source:
        module = name.removesuffix(".weight")
        if isinstance(tensor, QuantizedTensor):
            if onto == "original":
                raise MergeError(f"{path} is stored pre-quantized (4-bit): it has no original 16-bit weights; "
                                 "merge with --onto dequantized, or give the unquantized model")  # fmt: skip
            weight = tensor.dequantize(torch.float32)
        elif onto == "dequantized" and is_block_linear_weight(name, quantized):
            weight = base.base_weight(tensor)
        else:
            weight = tensor.float() if tensor.is_floating_point() else tensor
        if name.endswith(".weight") and module in deltas:
            lora_A, lora_B = deltas.pop(module)
            if weight.shape != (lora_B.shape[0], lora_A.shape[1]):
                raise MergeError(f"{adapter_dir}: adapter of {module} is [{lora_B.shape[0]}, {lora_A.shape[1]}], "
                                 f"the weight is {list(weight.shape)}")  # fmt: skip
            weight = weight + spec.for_layer(module).scale * (lora_B @ lora_A)  # [out, r] @ [r, in] -> [out, in]
        yield name, weight
    if deltas:
        raise MergeError(f"{adapter_dir}: adapter modules not in the model at {path}: {sorted(deltas)[:5]}")


def source_config(model_path: str | Path) -> dict[str, Any]:
    """The transformers config dict of a model directory or GGUF file."""
    path = resolve_model_path(model_path)
    return read_gguf(path).hf_config if path.suffix == ".gguf" else read_config(path)


def merge(
    model_path: str | Path,
    adapter_dir: str | Path | None,
    output: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    onto: str | None = None,
    base: TrainedBase | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write base + adapter merged as a Hugging Face directory at `output`; return it."""
    path = resolve_model_path(model_path)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise MergeError(f"{output} exists and is not empty; choose a new output directory")
    output.mkdir(parents=True, exist_ok=True)
    config = source_config(path)
    writer = ShardedSafetensorsWriter(output, max_shard_bytes)
    for name, weight in merged_weights(path, adapter_dir, onto, base):
        writer.add(name, weight.to(dtype) if weight.is_floating_point() else weight)
    writer.finish()
    written = write_config(output, config, dtype)
    write_generation_config(output, path, written)
    write_tokenizer(output, path)
    return output
