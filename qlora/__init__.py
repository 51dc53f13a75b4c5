"""qlora: QLoRA finetuning engine (4-bit NormalFloat base, double quantization, LoRA adapters)."""

from qlora.quant import QuantizedTensor, quantize

__version__ = "0.1.0"

__all__ = ["QuantizedTensor", "__version__", "quantize"]
