"""LoRA through a frozen (optionally 4-bit) base: the layer and its autograd function (`layer`), the
product rounded once (`matmul`), and the adapter's dropout mask hashed from a seed (`dropout`)."""

from qlora.lora.dropout import HashedDropout
from qlora.lora.layer import (
    DEFAULT_TARGETS,
    LoRALinear,
    LoRALinearFunction,
    LoraSpec,
    QuantSpec,
    lora_layers,
    mark_only_lora_trainable,
    replace_linears,
)

__all__ = [
    "DEFAULT_TARGETS",
    "HashedDropout",
    "LoRALinear",
    "LoRALinearFunction",
    "LoraSpec",
    "QuantSpec",
    "lora_layers",
    "mark_only_lora_trainable",
    "replace_linears",
]
