"""qlora: QLoRA finetuning engine (4-bit NormalFloat base, double quantization, LoRA adapters)."""

from qlora.quant import QuantizedTensor, quantize


def load_model(*args, **kwargs):
    """Load a Llama-family checkpoint with a 4-bit base (see `qlora.loading.load_model`)."""
    from qlora.loading import load_model as _load_model  # the model floors load on first use only

    return _load_model(*args, **kwargs)


def load(*args, **kwargs):
    """A model (+ adapter) and its tokenizer, ready to run (see `qlora.loading.load`)."""
    from qlora.loading import load as _load

    return _load(*args, **kwargs)


__version__ = "0.1.0"

__all__ = ["QuantizedTensor", "__version__", "load", "load_model", "quantize"]
