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


def prepare_for_training(*args, **kwargs):
    """Apply every speed and memory setting of `qlora train`'s step to a model (`qlora.train.prepare`)."""
    from qlora.train.prepare import prepare_for_training as _prepare

    return _prepare(*args, **kwargs)


def __getattr__(name: str):
    if name == "Trainer":  # the training floors load on first use only
        from qlora.train.trainer import Trainer

        return Trainer
    if name == "LoraSpec":
        from qlora.lora import LoraSpec

        return LoraSpec
    raise AttributeError(f"module 'qlora' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "LoraSpec",
    "QuantizedTensor",
    "Trainer",
    "__version__",
    "load",
    "load_model",
    "prepare_for_training",
    "quantize",
]
