"""LR schedules against transformers' get_*_schedule_with_warmup, step by step, and across a resume."""

from __future__ import annotations

import io
import math

import pytest
import torch

from qlora.config import LoopSection
from qlora.train.schedule import build_scheduler, lr_lambda

transformers_optimization = pytest.importorskip("transformers.optimization")

REFERENCE = {
    "constant": lambda opt, w, t: transformers_optimization.get_constant_schedule_with_warmup(opt, w),
    "cosine": transformers_optimization.get_cosine_schedule_with_warmup,
    "linear": transformers_optimization.get_linear_schedule_with_warmup,
}
PEAK_LR = 2e-4


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK_LR)


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps + 1):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@pytest.mark.parametrize(("warmup", "max_steps"), [(0, 50), (10, 100), (3, 37), (37, 37), (1, 2)])
def test_matches_transformers_at_every_step(schedule, warmup, max_steps):
    ref_opt = _optimizer()
    ref = REFERENCE[schedule](ref_opt, warmup, max_steps)
    ours_opt = _optimizer()
    ours = build_scheduler(ours_opt, LoopSection(max_steps=max_steps, warmup_steps=warmup, lr_schedule=schedule))
    expected = _lrs(ref, ref_opt, max_steps)
    got = _lrs(ours, ours_opt, max_steps)
    # Same float operations in the same order: bit-identical, so no tolerance.
    assert got == expected
    for step in range(max_steps + 1):
        assert lr_lambda(step, schedule=schedule, warmup_steps=warmup, max_steps=max_steps) * PEAK_LR == got[step]


def test_shapes_differ_where_they_should():
    # Negative control for the comparison: the three schedules are not the same curve.
    mid = {s: lr_lambda(60, schedule=s, warmup_steps=10, max_steps=110) for s in ("constant", "cosine", "linear")}
    assert mid["constant"] == 1.0
    assert mid["linear"] == pytest.approx(0.5)
    assert mid["cosine"] == pytest.approx(0.5)
    assert lr_lambda(35, schedule="cosine", warmup_steps=10, max_steps=110) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.25))
    )
    assert lr_lambda(5, schedule="constant", warmup_steps=10, max_steps=110) == 0.5
    assert lr_lambda(0, schedule="linear", warmup_steps=10, max_steps=110) == 0.0


def test_cosine_stays_at_zero_past_max_steps():
    # Documented difference: transformers' half-cycle cosine climbs again after num_training_steps.
    assert lr_lambda(150, schedule="cosine", warmup_steps=0, max_steps=100) == 0.0
    assert lr_lambda(150, schedule="linear", warmup_steps=0, max_steps=100) == 0.0


def test_warmup_ratio_from_the_config():
    loop = LoopSection(max_steps=100, warmup_ratio=0.1)  # warmup_steps None -> ceil(0.1 * 100) = 10
    opt = _optimizer()
    lrs = _lrs(build_scheduler(opt, loop), opt, 100)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(PEAK_LR / 2) and lrs[10] == PEAK_LR


def _saved_after(loop: LoopSection, steps: int) -> tuple[dict, dict]:
    opt = _optimizer()
    sched = build_scheduler(opt, loop)
    for _ in range(steps):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # the closure is not pickled: plain counters only
    return state["opt"], state["sched"]


@pytest.mark.parametrize("optimizer_state_first", [True, False])
def test_resume_gives_the_uninterrupted_lrs(optimizer_state_first):
    loop = LoopSection(max_steps=40, warmup_steps=25, lr_schedule="cosine")
    opt = _optimizer()
    full = _lrs(build_scheduler(opt, loop), opt, 40)
    opt_state, sched_state = _saved_after(loop, 17)  # still in warmup: lr(17) != lr(0)

    opt2 = _optimizer()
    if optimizer_state_first:
        opt2.load_state_dict(opt_state)
        sched2 = build_scheduler(opt2, loop, state=sched_state)
    else:
        sched2 = build_scheduler(opt2, loop, state=sched_state)
        opt2.load_state_dict(opt_state)
    assert opt2.param_groups[0]["lr"] == full[17] != full[0]
    assert _lrs(sched2, opt2, 40 - 17) == full[17:]


def test_plain_load_state_dict_loses_the_lr():
    # Why build_scheduler takes `state`: LambdaLR.load_state_dict alone leaves the optimizer at
    # multiplier(0). If this ever starts passing, torch fixed it and the Note can go.
    loop = LoopSection(max_steps=40, warmup_steps=25)
    opt_state, sched_state = _saved_after(loop, 17)
    opt2 = _optimizer()
    opt2.load_state_dict(opt_state)
    sched2 = build_scheduler(opt2, loop)
    sched2.load_state_dict(sched_state)
    assert opt2.param_groups[0]["lr"] == 0.0


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_lambda(0, schedule="step", warmup_steps=0, max_steps=10)
