"""`adamw` and `paged_adamw_32bit` follow torch.optim.AdamW; every optimizer resumes exactly from its state_dict."""

from __future__ import annotations

import io

import pytest
import torch
from optim_fixtures import MAX_GRAD_NORM, make_mlp, make_scheduler, train

from qlora.optim import OPTIMIZER_NAMES, QAdamW, TorchAdamW, build_optimizer

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.99), 1e-8, 0.1
STEPS = 50


def build(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name == "torch":
        return torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    return build_optimizer(name, model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)


def run(name: str, steps: int = STEPS):
    model = make_mlp(seed=0)
    optimizer = build(name, model)
    return model, optimizer, train(model, optimizer, make_scheduler(optimizer), 0, steps)


@pytest.mark.parametrize("name", ["adamw", "paged_adamw_32bit"])
def test_follows_torch_adamw(name):
    ref_model, ref_opt, ref = run("torch")
    model, opt, ours = run(name)
    # the run exercises what it claims to: clipping active, lr changing, weights moving
    assert max(h["grad_norm"] for h in ref) > MAX_GRAD_NORM
    assert not torch.equal(ref[0]["params"][0], ref[-1]["params"][0])
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        for i, (pa, pb) in enumerate(zip(a["params"], b["params"], strict=True)):
            # rtol/atol from the issue: float32 rounding of identical op sequences; in practice the difference is 0
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=f"step {step}, parameter {i}")
    frozen = list(model[2].parameters())
    fresh = make_mlp(seed=0)
    for p, p0 in zip(frozen, fresh[2].parameters(), strict=True):
        assert torch.equal(p, p0), "the frozen layer moved"
        assert p not in opt.state, "the frozen layer got optimizer state"
    assert len(opt.state) == len(ref_opt.state) == 6
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-8)


def test_negative_control_decay_order_matters():
    """A different weight-decay order (bitsandbytes': after the step) must fail the parity check above."""
    _, _, ref = run("torch", steps=5)
    class DecayAfter(QAdamW):
        @torch.no_grad()
        def step(self, closure=None):
            super().step(closure)
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        p.mul_(1 - g["lr"] * WD)

    model = make_mlp(seed=0)
    opt = DecayAfter(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    sched = make_scheduler(opt)
    ours = train(model, opt, sched, 0, 5)
    assert not torch.allclose(ours[-1]["params"][0], ref[-1]["params"][0], rtol=1e-5, atol=1e-6)


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_resume_equals_uninterrupted(name):
    _, full_opt, full = run(name, steps=STEPS)

    model = make_mlp(seed=0)
    opt = build(name, model)
    sched = make_scheduler(opt)
    train(model, opt, sched, 0, STEPS // 2)
    saved = roundtrip({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    del model, opt, sched

    model = make_mlp(seed=1)  # different init: everything must come from the checkpoint
    model.load_state_dict(saved["model"])
    opt = build(name, model)
    sched = make_scheduler(opt)
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    resumed = train(model, opt, sched, STEPS // 2, STEPS - STEPS // 2)

    for i, (pa, pb) in enumerate(zip(resumed[-1]["params"], full[-1]["params"], strict=True)):
        assert torch.equal(pa, pb), f"{name}: parameter {i} differs after resume"
    assert opt.param_groups[0]["lr"] == full_opt.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), [p for g in full_opt.param_groups for p in g["params"]], strict=True):
        assert (p in opt.state) == (q in full_opt.state)
        for key, value in full_opt.state.get(q, {}).items():
            assert torch.equal(opt.state[p][key], value), f"{name}: state {key!r} differs after resume"


def test_8bit_state_dict_holds_codes():
    model = make_mlp(seed=0)
    opt = build("paged_adamw_8bit", model)
    train(model, opt, make_scheduler(opt), 0, 2)
    state = roundtrip(opt.state_dict())["state"]
    kinds = {tuple(sorted(s)) for s in state.values()}
    assert ("absmax1", "absmax2", "state1", "state2", "step") in kinds  # fc1 (4,773) and fc2 (129,000)
    assert ("exp_avg", "exp_avg_sq", "step") in kinds  # biases and fc3 (3,000 < 4096)
    assert all(s["state1"].dtype == torch.uint8 for s in state.values() if "state1" in s)


def test_load_rejects_state_of_another_optimizer_kind():
    model = make_mlp(seed=0)
    opt32 = build("paged_adamw_32bit", model)
    train(model, opt32, make_scheduler(opt32), 0, 1)
    opt8 = build("adamw_8bit", model)
    with pytest.raises(ValueError, match="optim_bits=8"):
        opt8.load_state_dict(opt32.state_dict())


def test_torch_and_paged_32bit_load_each_other():
    """A 32-bit state dict has torch's keys: switching between `adamw` and `paged_adamw_32bit` on resume works."""
    model = make_mlp(seed=0)
    ours = build("paged_adamw_32bit", model)
    train(model, ours, make_scheduler(ours), 0, 3)
    theirs = build("adamw", model)
    theirs.load_state_dict(roundtrip(ours.state_dict()))
    back = build("paged_adamw_32bit", model)
    back.load_state_dict(roundtrip(theirs.state_dict()))
    for p in ours.state:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(back.state[p][key], ours.state[p][key])


def test_registry():
    model = make_mlp(seed=0)
    assert type(build("adamw", model)) is TorchAdamW and isinstance(build("adamw", model), torch.optim.AdamW)
    for name in ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"):
        assert isinstance(build(name, model), QAdamW)
    with pytest.raises(ValueError, match="paged_adamw_32bit"):
        build_optimizer("adam_9bit", model.parameters(), lr=1e-3)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_memory_report_on_cpu(name):
    model = make_mlp(seed=0)
    opt = build(name, model)
    train(model, opt, make_scheduler(opt), 0, 1)
    report = opt.memory_report()
    assert report["gpu_bytes"] == report["pinned_host_bytes"] == report["gpu_staging_bytes"] == 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    if name in ("adamw", "paged_adamw_32bit"):
        expected = sum(8 * p.numel() + 4 for p in trainable)  # two float32 moments + the float32 step
    else:
        expected = sum((2 * p.numel() + 8 * -(-p.numel() // 256)) if p.numel() >= 4096 else 8 * p.numel()
                       for p in trainable) + 4 * len(trainable)  # fmt: skip
    assert report["cpu_bytes"] == expected


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_multi_tensor_update_equals_torch_single_tensor_adamw(weight_decay):
    """`adamw_update_many_` over several tensors = torch.optim.AdamW(foreach=False) stepping each, bit for bit."""
    from qlora.optim.adamw import adamw_update_many_

    g = torch.Generator().manual_seed(0)
    shapes = [(7, 13), (64,), (3, 5, 11), (1,)]
    ours = [torch.randn(s, generator=g) for s in shapes]
    theirs = [torch.nn.Parameter(t.clone()) for t in ours]
    reference = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay,
                                  foreach=False)  # fmt: skip
    moments = [(torch.zeros(s), torch.zeros(s)) for s in shapes]
    for step in range(1, 6):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, grad in zip(theirs, grads, strict=True):
            p.grad = grad.clone()
        reference.step()
        adamw_update_many_(ours, grads, [m for m, _ in moments], [v for _, v in moments], step, lr=1e-2,
                           beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=weight_decay)  # fmt: skip
    for p, q, (m, v) in zip(ours, theirs, moments, strict=True):
        assert torch.equal(p, q.detach())
        assert torch.equal(m, reference.state[q]["exp_avg"]) and torch.equal(v, reference.state[q]["exp_avg_sq"])


def test_bfloat16_parameters_update_in_float32_then_round():
    from qlora.optim.adamw import adamw_update_many_

    g = torch.Generator().manual_seed(1)
    start = torch.randn(9, 5, generator=g).to(torch.bfloat16)
    grad = torch.randn(9, 5, generator=g)
    half, full = start.clone(), start.float()
    hyper = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}
    adamw_update_many_([half], [grad.to(torch.bfloat16)], [torch.zeros(9, 5)], [torch.zeros(9, 5)], 1, **hyper)
    adamw_update_many_([full], [grad.to(torch.bfloat16).float()], [torch.zeros(9, 5)], [torch.zeros(9, 5)], 1,
                       **hyper)  # fmt: skip
    assert half.dtype == torch.bfloat16 and torch.equal(half, full.to(torch.bfloat16))
    assert not torch.equal(half, start)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_unknown_page_policy_is_refused(name):
    with pytest.raises(ValueError, match="page_policy"):
        QAdamW(make_mlp(seed=0).parameters(), page_policy="sometimes")
    with pytest.raises(ValueError, match="page_policy"):  # also by the optimizers that never page
        build_optimizer(name, make_mlp(seed=0).parameters(), lr=LR, page_policy="sometimes")


def test_multi_tensor_chunks_cover_every_parameter_once():
    from qlora.optim.optimizer import _chunks

    items = [(torch.zeros(n), i) for i, n in enumerate([5, 3, 9, 2, 2, 12, 1])]
    runs = _chunks(items, 8)
    assert [[i for _, i in run] for run in runs] == [[0, 1], [2], [3, 4], [5], [6]]
    assert all(sum(t.numel() for t, _ in run) <= 8 or len(run) == 1 for run in runs)
