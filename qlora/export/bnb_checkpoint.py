"""Writing a bitsandbytes 4-bit checkpoint: what transformers + bitsandbytes `from_pretrained` loads
pre-quantized (format-spec 1.6-1.7), and what `qlora.load_model` then uses without re-quantizing.

Every block linear (`q/k/v/o_proj`, `gate/up/down_proj`) is quantized by `QuantizedTensor.quantize`
(byte-identical to bitsandbytes' `quantize_4bit`) and stored under bitsandbytes' six keys per
weight (`QuantizedTensor.to_bnb_state_dict`). Embeddings, norms and `lm_head` stay in `dtype`,
exactly the modules transformers leaves unquantized (`get_keys_to_not_convert`: the output
embedding; Llama-family models have no other `nn.Linear`). config.json gains the
`quantization_config` block transformers itself writes (format-spec 1.7).

`dtype` is both the dtype the weights are cast to before quantizing (it is recorded in each
weight's quant-state blob and is what dequantization returns) and the compute dtype named in the
config, as when transformers loads a model with `dtype=...` and `BitsAndBytesConfig(...)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qlora.checkpoint_io.gguf_file import read_gguf
from qlora.checkpoint_io.safetensors_dir import iter_weights
from qlora.export.hf_dir import (
    DEFAULT_MAX_SHARD_BYTES,
    ShardedSafetensorsWriter,
    write_config,
    write_generation_config,
    write_tokenizer,
)
from qlora.export.merge import MergeError, is_block_linear_weight, source_config
from qlora.loading import resolve_model_path
from qlora.lora import DEFAULT_TARGETS
from qlora.precision import dtype_name
from qlora.quant.tensor import QuantizedTensor

BNB_QUANT_TYPES = ("nf4", "fp4")


def bnb_quantization_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype) -> dict[str, Any]:
    """The `quantization_config` transformers 5.23 writes for a 4-bit model (format-spec 1.7)."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": dtype_name(compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def quantize_checkpoint(
    model_path: str | Path,
    output: str | Path,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write `model_path` as a bitsandbytes 4-bit Hugging Face directory at `output`; return it."""
    if quant_type not in BNB_QUANT_TYPES:
        raise MergeError(f"quant_type {quant_type!r} has no bitsandbytes encoding; choose one of {BNB_QUANT_TYPES}")
    path = resolve_model_path(model_path)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise MergeError(f"{output} exists and is not empty; choose a new output directory")
    config = source_config(path)
    writer = ShardedSafetensorsWriter(output, max_shard_bytes)
    source = read_gguf(path).iter_tensors() if path.suffix == ".gguf" else iter_weights(path)
    for name, tensor in source:
        if isinstance(tensor, QuantizedTensor):
            raise MergeError(f"{path} is already stored 4-bit ({name}); quantize the unquantized model instead")
        if is_block_linear_weight(name, set(DEFAULT_TARGETS)):
            q = QuantizedTensor.quantize(tensor.to(dtype), quant_type, blocksize, double_quant)
            for key, value in q.to_bnb_state_dict(name).items():
                writer.add(key, value)
        else:
            writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    writer.finish()
    written = write_config(output, config, dtype,
                           quantization_config=bnb_quantization_config(quant_type, double_quant, dtype))  # fmt: skip
    write_generation_config(output, path, written)
    write_tokenizer(output, path)
    return output
