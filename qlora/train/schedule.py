"""Learning-rate schedules: linear warmup from 0, then constant, cosine to 0, or linear to 0.

`lr_lambda(step)` is the multiplier of the peak learning rate (`optim.lr`) used for the optimizer
step with 0-based index `step`. The formulas are those of transformers'
`get_constant_schedule_with_warmup`, `get_cosine_schedule_with_warmup` (half a cycle) and
`get_linear_schedule_with_warmup`, written with the same float operations in the same order, so
the multipliers are bit-identical (`tests/train/test_schedule.py` compares every step):

    warmup (step < W):  step / max(1, W)           (so the very first step has lr 0 when W > 0)
    constant:           1
    linear:             max(0, (T - step) / max(1, T - W))
    cosine:             max(0, 0.5 * (1 + cos(pi * progress))),  progress = (step - W) / max(1, T - W)

with W warmup steps and T = max_steps. One deliberate difference: past `max_steps` transformers'
cosine climbs back up (progress > 1 is a second half-cycle); ours clamps progress to 1 and stays
at 0. The loop never runs past `max_steps`, so this only matters to someone who extends a run.

Note the QLoRA script's `constant` schedule with `warmup_ratio 0.03`: transformers' `constant`
ignores warmup, so that run had none. Our `constant` always honours the configured warmup (set
`train.warmup_steps 0` for none); `config.LoopSection.effective_warmup_steps` resolves the ratio.

`build_scheduler` wraps the multiplier in `torch.optim.lr_scheduler.LambdaLR` with a closure: its
state_dict is then just counters and floats (`last_epoch`, `base_lrs`), which checkpoints store and
`torch.load(weights_only=True)` reads back. Call `scheduler.step()` once after each
`optimizer.step()`; LambdaLR applies multiplier(0) at construction. To resume, pass the saved state
to `build_scheduler(..., state=...)` rather than calling `load_state_dict` yourself (see Note:
Resuming LambdaLR).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # annotations only: config is a leaf module, but train/ must not need it at run time
    from qlora.config import LoopSection, TrainConfig

SCHEDULES = ("constant", "cosine", "linear")


def lr_lambda(step: int, *, schedule: str, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the peak learning rate for the optimizer step with 0-based index `step`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, float(max_steps - step) / float(max(1, max_steps - warmup_steps)))
    # `pi * 0.5 * 2.0`: transformers' `pi * num_cycles * 2.0` with num_cycles = 0.5, kept verbatim so
    # the rounding is identical.
    progress = min(1.0, float(step - warmup_steps) / float(max(1, max_steps - warmup_steps)))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig | LoopSection, *, state: dict[str, Any] | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `optimizer` for `cfg.train` (a TrainConfig) or `cfg` (its LoopSection).

    To resume, pass the saved `scheduler.state_dict()` as `state`. See Note: Resuming LambdaLR.
    """
    loop = getattr(cfg, "train", cfg)
    schedule, warmup, total = loop.lr_schedule, loop.effective_warmup_steps, loop.max_steps
    if schedule not in SCHEDULES:
        raise ValueError(f"train.lr_schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")

    def multiplier(step: int) -> float:
        return lr_lambda(step, schedule=schedule, warmup_steps=warmup, max_steps=total)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    if state is not None:
        # Note: Resuming LambdaLR
        # `LambdaLR.load_state_dict` restores its step counter but not the learning rate in the
        # optimizer's param groups; construction has just set those to base_lr * multiplier(0)
        # (0 under warmup). Only when the optimizer's own state is loaded *after* this would the
        # right lr come back, so the first resumed step would silently depend on call order.
        # Re-apply the restored step's lr here, with LambdaLR's own expression, so that either
        # order gives the uninterrupted run's lr bit for bit.
        scheduler.load_state_dict(state)
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base_lr * multiplier(scheduler.last_epoch)
    return scheduler
