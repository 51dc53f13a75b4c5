"""`train(cfg)`: what `qlora train` runs, a `Trainer` fitted from start to end (`qlora.train.trainer`)."""

from __future__ import annotations

from qlora.config import TrainConfig
from qlora.precision import resolve_device
from qlora.train.trainer import Trainer, TrainResult, evaluate, seed_everything


def train(cfg: TrainConfig, *, progress: bool | None = None) -> TrainResult:
    """Run the finetune described by `cfg`: `Trainer(cfg).fit()`, then leave the process group (torchrun)."""
    trainer = Trainer(cfg, progress=progress)
    try:
        return trainer.fit()
    finally:
        trainer.close()


__all__ = ["TrainResult", "Trainer", "evaluate", "resolve_device", "seed_everything", "train"]
