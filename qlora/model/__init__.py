"""Floor 5a: the Llama-family decoder and its configuration (no quantization, no LoRA, no I/O)."""

from qlora.model.config import SUPPORTED_MODEL_TYPES, ModelConfig, UnsupportedModelError
from qlora.model.llama import KVCache, LlamaForCausalLM, RMSNorm

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "KVCache",
    "LlamaForCausalLM",
    "ModelConfig",
    "RMSNorm",
    "UnsupportedModelError",
]
