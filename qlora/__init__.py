"""qlora: QLoRA finetuning engine (4-bit NormalFloat base, double quantization, LoRA adapters)."""

__version__ = "0.1.0"
