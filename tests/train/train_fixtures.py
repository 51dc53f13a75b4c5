"""A small fixed training configuration on stories260K and the Alpaca sample (CPU, float32)."""

from pathlib import Path

from qlora.config import TrainConfig

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
ALPACA = SHARED / "data" / "instruct" / "alpaca_en_demo.json"


def tiny_config(output, **train_overrides) -> TrainConfig:
    train = {"max_steps": 8, "micro_batch_size": 2, "grad_accum": 2, "log_every": 1, "warmup_steps": 2}
    train.update(train_overrides)
    return TrainConfig.from_dict({
        "model": {"path": str(STORIES), "compute_dtype": "float32"},
        "quant": {"quant_type": "nf4"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "data": {"path": str(ALPACA), "max_source_len": 48, "max_target_len": 32, "eval_fraction": 0.01},
        "optim": {"lr": 1e-3},
        "train": train,
        "output": str(output),
        "seed": 0,
        "device": "cpu",
    })  # fmt: skip
