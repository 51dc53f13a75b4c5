"""`StepInBackward`: the same AdamW steps as the optimizer's own `step()`, run from backward hooks, and the errors
for what it cannot do (CPU); the paged pipeline on CUDA (gpu-marked, below). Inside a CUDA graph:
tests/train/test_cuda_graph.py."""

from __future__ import annotations

import os

import pytest
import torch

from qlora.kernels import triton_importable
from qlora.ops import KernelPolicy
from qlora.optim import build_optimizer
from qlora.optim.in_backward import StepInBackward, backward_order_groups

SIZES = [23, 41, 17, 33, 5]


def deep_model(dtype=torch.float32, seed=0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(SIZES[:-1], SIZES[1:], strict=True):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers).to(dtype)


def loss_of(model, step, dtype):
    g = torch.Generator().manual_seed(step)
    return model(torch.randn(8, SIZES[0], generator=g).to(dtype)).float().square().mean()


def train(in_backward: bool, steps=6, dtype=torch.float32, policy=None):
    model = deep_model(dtype)
    opt = build_optimizer("paged_adamw_32bit", model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8**s)  # a new lr every step
    stepper = StepInBackward(opt, backward_order_groups(model), policy=policy) if in_backward else None
    for step in range(steps):
        loss = loss_of(model, step, dtype)
        if stepper:
            stepper.prepare()
            stepper.backward(loss)
            assert all(p.grad is None for p in model.parameters())  # dropped as soon as used
        else:
            loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_same_parameters_and_state_as_the_optimizer_step(dtype):
    ref_model, ref_opt = train(False, dtype=dtype)
    model, opt = train(True, dtype=dtype)
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    got, want = opt.state_dict(), ref_opt.state_dict()
    assert got["param_groups"] == want["param_groups"]
    for pid, state in want["state"].items():
        assert set(got["state"][pid]) == set(state)
        assert float(got["state"][pid]["step"]) == float(state["step"]) == 6.0
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["state"][pid][key], state[key], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not triton_importable() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1 to force the kernel onto CPU tensors")  # fmt: skip
def test_the_update_runs_with_the_steppers_policy(monkeypatch):
    """The policy given to the stepper picks the update's implementation, not process state: forced, the
    AdamW kernel runs (here in Triton's interpreter); the twins' stepper never calls it. Both take the
    optimizer's own steps."""
    import qlora.kernels.adamw

    real, calls = qlora.kernels.adamw.adamw_step_, []
    monkeypatch.setattr(qlora.kernels.adamw, "adamw_step_", lambda *a: calls.append(1) or real(*a))
    ref_model, _ = train(False, steps=2)
    twin_model, _ = train(True, steps=2, policy=KernelPolicy(kernels="torch"))
    assert calls == []
    kernel_model, _ = train(True, steps=2, policy=KernelPolicy(kernels="triton"))
    assert len(calls) == 2 * 2 * 4  # two steps of four layers' weight and bias
    for models in zip(twin_model.parameters(), kernel_model.parameters(), ref_model.parameters(), strict=True):
        for got in models[:2]:
            torch.testing.assert_close(got, models[2], rtol=1e-5, atol=1e-6)


def test_a_different_learning_rate_is_detected():
    """Negative control: the comparison above sees an lr change."""
    model, opt = deep_model(), None
    opt = build_optimizer("paged_adamw_32bit", model.parameters(), lr=1e-2)
    stepper = StepInBackward(opt, backward_order_groups(model))
    ref = deep_model()
    ref_opt = build_optimizer("paged_adamw_32bit", ref.parameters(), lr=2e-2)
    stepper.prepare()
    stepper.backward(loss_of(model, 0, torch.float32))
    loss_of(ref, 0, torch.float32).backward()
    ref_opt.step()
    assert not torch.allclose(model[0].weight, ref[0].weight, rtol=1e-5, atol=1e-6)


def test_dry_prepare_changes_nothing():
    model = deep_model()
    opt = build_optimizer("paged_adamw_32bit", model.parameters(), lr=1e-2, weight_decay=0.1)
    stepper = StepInBackward(opt, backward_order_groups(model))
    before = [p.detach().clone() for p in model.parameters()]
    stepper.prepare(dry=True)
    stepper.backward(loss_of(model, 0, torch.float32))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert all(float(opt.state[p]["step"]) == 0 and not opt.state[p]["exp_avg"].any() for p in model.parameters())


def test_groups_follow_backward_order():
    model = deep_model()
    groups = backward_order_groups(model)
    assert [len(g) for g in groups] == [2, 2, 2, 2]
    assert groups[0][0] is model[6].weight and groups[-1][1] is model[0].bias


def test_groups_out_of_order_are_refused():
    model = deep_model()
    opt = build_optimizer("paged_adamw_32bit", model.parameters(), lr=1e-2)
    stepper = StepInBackward(opt, backward_order_groups(model)[::-1])
    stepper.prepare()
    with pytest.raises(RuntimeError, match="completed before group 0"):
        stepper.backward(loss_of(model, 0, torch.float32))


def test_a_parameter_without_gradient_is_an_error():
    model = deep_model()
    extra = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer("paged_adamw_32bit", [*model.parameters(), extra], lr=1e-2)
    stepper = StepInBackward(opt, [*backward_order_groups(model), [extra]])
    stepper.prepare()
    with pytest.raises(RuntimeError, match="every parameter must receive a gradient"):
        stepper.backward(loss_of(model, 0, torch.float32))


def test_plain_backward_is_refused_and_load_state_dict_after_building():
    model = deep_model()
    opt = build_optimizer("paged_adamw_32bit", model.parameters(), lr=1e-2)
    saved = opt.state_dict()
    stepper = StepInBackward(opt, backward_order_groups(model))
    with pytest.raises(RuntimeError, match=r"stepper.backward\(loss\)"):
        loss_of(model, 0, torch.float32).backward()
    with pytest.raises(RuntimeError, match="before building its StepInBackward"):
        opt.load_state_dict(saved)
    stepper.remove()
    loss_of(model, 0, torch.float32).backward()  # detached: a plain backward works again
    opt.step()


def test_refuses_what_it_cannot_run():
    model = deep_model()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="32-bit QAdamW"):
        StepInBackward(build_optimizer("adamw_8bit", params, lr=1e-2), [params])
    with pytest.raises(ValueError, match="32-bit QAdamW"):
        StepInBackward(build_optimizer("adamw", params, lr=1e-2), [params])
    with pytest.raises(ValueError, match="partition"):
        StepInBackward(build_optimizer("paged_adamw_32bit", params, lr=1e-2), [params[:-1]])
    with pytest.raises(ValueError, match="more than one group"):
        StepInBackward(build_optimizer("paged_adamw_32bit", params, lr=1e-2), [params, params[:1]])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_pipeline_on_cuda_matches_the_optimizer_step(dtype):
    """Every state paged (page_min_numel=1) through the three slots, six groups (the slots wrap twice), against the
    same optimizer stepping after backward with its states resident."""
    sizes = [23, 300, 41, 700, 17, 333, 5]

    def build(seed=0):
        torch.manual_seed(seed)
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
        return torch.nn.Sequential(*layers).to("cuda", dtype)

    def data(step):
        g = torch.Generator().manual_seed(step)
        return torch.randn(8, sizes[0], generator=g).to("cuda", dtype)

    ref, model = build(), build()
    ref_opt = build_optimizer("paged_adamw_32bit", ref.parameters(), lr=1e-2, weight_decay=0.1, page_min_numel=1 << 62)
    opt = build_optimizer("paged_adamw_32bit", model.parameters(), lr=1e-2, weight_decay=0.1, page_policy="always",
                          page_min_numel=1)  # fmt: skip
    stepper = StepInBackward(opt, backward_order_groups(model))
    largest = max(sum(8 * p.numel() for p in g) for g in stepper.groups)
    assert largest <= stepper.staging_bytes // 3 < largest + 512 * 2 * 2  # three slots, 512-byte aligned tensors
    for step in range(5):
        ref(data(step)).float().square().mean().backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        stepper.prepare()
        stepper.backward(model(data(step)).float().square().mean())
        assert all(p.grad is None for p in model.parameters())
    # float32: rounding of contracted multiply-adds; bf16: a parameter may round to the neighbouring value (1 unit)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-3}
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, **tol)
    opt.state_dict()  # synchronises: the pages hold the last write-back
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert opt.state[p]["exp_avg"].is_pinned() and not opt.state[p]["exp_avg"].is_cuda
        want = ref_opt.state[q]["exp_avg_sq"].cpu()
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], want, rtol=1e-3 if dtype == torch.float32 else 3e-2,
                                   atol=1e-9)  # fmt: skip


def test_parameters_at_different_step_counts_get_their_own_bias_corrections():
    """A resumed state where one parameter has taken more steps than the others (e.g. it was unused for a while):
    each row uses that parameter's own count, as the optimizer's step does."""
    models, optimizers = [], []
    for _ in range(2):
        model = deep_model()
        opt = build_optimizer("paged_adamw_32bit", model.parameters(), lr=1e-2)
        for i, p in enumerate(model.parameters()):
            opt.state[p].update(opt._init_state(p))
            opt.state[p]["step"] += 5 if i == 0 else 2
            opt.state[p]["exp_avg"].fill_(0.01)
            opt.state[p]["exp_avg_sq"].fill_(1e-4)
        models.append(model)
        optimizers.append(opt)
    stepper = StepInBackward(optimizers[1], backward_order_groups(models[1]))
    loss_of(models[0], 0, torch.float32).backward()
    optimizers[0].step()
    stepper.prepare()
    stepper.backward(loss_of(models[1], 0, torch.float32))
    for a, b in zip(models[1].parameters(), models[0].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert [float(optimizers[1].state[p]["step"]) for p in models[1].parameters()][:2] == [6.0, 3.0]


@pytest.mark.gpu
def test_groups_with_nothing_paged_between_paged_ones_on_cuda():
    """Eight groups, only some paged (page_min_numel between the layers' sizes): a slot's next user may be many
    groups after its last one, and must still wait for that one's write-back."""
    sizes = [23, 300, 7, 400, 5, 350, 9, 280, 3]  # weights: 6900, 2100, 2800, 2000, 1750, 3150, 2520, 840

    def build():
        torch.manual_seed(0)
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
        return torch.nn.Sequential(*layers).to("cuda")

    ref, model = build(), build()
    ref_opt = build_optimizer("paged_adamw_32bit", ref.parameters(), lr=1e-2, page_min_numel=1 << 62)
    opt = build_optimizer("paged_adamw_32bit", model.parameters(), lr=1e-2, page_policy="always", page_min_numel=2500)
    stepper = StepInBackward(opt, backward_order_groups(model))
    paged = [bool(items) for items in stepper._pages]
    assert paged == [False, True, True, False, False, True, False, True]
    for step in range(4):
        x = torch.randn(8, sizes[0], generator=torch.Generator().manual_seed(step)).cuda()
        ref(x).square().mean().backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        stepper.prepare()
        stepper.backward(model(x).square().mean())
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
