"""The one-pass AdamW kernel against its twin (`qlora.ops.adamw_step_`) and against torch's AdamW maths
(`qlora.optim.adamw.adamw_update_many_`), on odd sizes, float32 and bf16 parameters, both lerp branches."""

import pytest
import torch
from kernel_inputs import DEVICES, bits, randn

from qlora import ops
from qlora.kernels.adamw import adamw_step_
from qlora.ops import KernelPolicy
from qlora.optim.adamw import adamw_coefficients, adamw_update_many_

TWINS = KernelPolicy(kernels="torch")
HYPER = {"lr": 3e-3, "eps": 1e-8, "weight_decay": 0.1}


def inputs(n, p_dtype, device, seed=0):
    p = randn((n,), p_dtype, seed, device)
    g = randn((n,), p_dtype, seed + 1, device, scale=0.5)
    m = randn((n,), torch.float32, seed + 2, device, scale=0.1)
    v = randn((n,), torch.float32, seed + 3, device, scale=0.1).square()
    return p, g, m, v


def row(step, beta1, beta2, device, apply=True):
    return torch.tensor(adamw_coefficients(step, beta1=beta1, beta2=beta2, apply=apply, **HYPER),
                        dtype=torch.float32, device=device)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,beta1,step", [(1, 0.9, 1), (1023, 0.9, 7), (3001, 0.6, 2), (2049, 0.3, 5)], ids=str)
def test_kernel_matches_the_twin_and_torch_adamw(n, beta1, step, p_dtype, device):
    beta2 = 0.999
    got = [t.clone() for t in inputs(n, p_dtype, device)]
    twin = [t.clone() for t in got]
    ref = [t.clone() for t in got]
    adamw_step_(*got, row(step, beta1, beta2, device))
    ops.adamw_step_(*twin, row(step, beta1, beta2, device), policy=TWINS)
    adamw_update_many_([ref[0]], [ref[1]], [ref[2]], [ref[3]], step, beta1=beta1, beta2=beta2, **HYPER)
    for name, a, b, c in zip(("p", "grad", "exp_avg", "exp_avg_sq"), got, twin, ref, strict=True):
        # rounding of a contracted multiply-add at most: float32 to ~2e-7 relative, bf16 p to one unit (2^-8)
        tol = {"rtol": 1e-2, "atol": 1e-2} if a.dtype == torch.bfloat16 else {"rtol": 2e-6, "atol": 1e-7}
        torch.testing.assert_close(a, b, **tol, msg=f"{name}: kernel vs twin")
        torch.testing.assert_close(a, c, **tol, msg=f"{name}: kernel vs adamw_update_many_")
    if p_dtype == torch.bfloat16:  # bf16 p: at most one unit in the last place apart
        assert (bits(got[0]).int() - bits(ref[0]).int()).abs().max() <= 1
    assert not torch.equal(got[2], inputs(n, p_dtype, device)[2])  # the update ran (a bf16 p may not move)


@pytest.mark.parametrize("device", DEVICES)
def test_a_dry_row_stores_nothing(device):
    tensors = inputs(777, torch.bfloat16, device, seed=5)
    before = [t.clone() for t in tensors]
    adamw_step_(*tensors, row(3, 0.9, 0.999, device, apply=False))
    for a, b in zip(tensors, before, strict=True):
        assert torch.equal(bits(a), bits(b))
    ops.adamw_step_(*tensors, row(3, 0.9, 0.999, device, apply=False), policy=TWINS)
    for a, b in zip(tensors, before, strict=True):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("device", DEVICES)
def test_another_step_is_detected(device):
    """Negative control: the bias correction of another step gives another p."""
    a = [t.clone() for t in inputs(300, torch.float32, device)]
    b = [t.clone() for t in a]
    adamw_step_(*a, row(1, 0.9, 0.999, device))
    adamw_step_(*b, row(2, 0.9, 0.999, device))
    assert not torch.allclose(a[0], b[0], rtol=1e-6, atol=0)


def test_refuses_mismatched_moments():
    p, g, m, v = inputs(10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="exp_avg"):
        adamw_step_(p, g, m[:9], v, row(1, 0.9, 0.999, "cpu"))
    with pytest.raises(ValueError, match="coefficients"):
        adamw_step_(p, g, m, v, row(1, 0.9, 0.999, "cpu").double())


def adamw_float64(p, g, m, v, step, beta1, beta2, lr, eps, weight_decay):
    """Decoupled-weight-decay Adam (Loshchilov & Hutter) in float64, written from the definition."""
    p, g, m, v = (t.double() for t in (p, g, m, v))
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
    return p * (1 - lr * weight_decay) - lr * m_hat / (v_hat.sqrt() + eps), m, v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("beta1,step", [(0.9, 1), (0.6, 5)], ids=str)
def test_kernel_matches_the_float64_formula(beta1, step, p_dtype, device):
    """The kernel (fp32 arithmetic, p stored in its dtype) against the definition in float64. fp32: a
    handful of fp32 roundings in the update, rtol 1e-5 (the update is ~lr, so p itself is far more
    exact); bf16 p: the stored p is rounded once to bf16, rtol 2^-8 (one bf16 ulp)."""
    beta2 = 0.999
    tensors = [t.clone() for t in inputs(1023, p_dtype, device)]
    want_p, want_m, want_v = adamw_float64(*tensors, step, beta1, beta2, **HYPER)
    adamw_step_(*tensors, row(step, beta1, beta2, device))
    p, _, m, v = tensors
    p_tol = dict(rtol=2.0**-8, atol=1e-6) if p_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p.double(), want_p, **p_tol)
    # m and v: two fp32 products and a sum; where they nearly cancel the error is absolute, a few
    # ulps of the operands (|g| ~ 0.5: ulp 6e-8; g^2 ~ 0.25, v ~ 0.01: ulp 1e-9)
    torch.testing.assert_close(m.double(), want_m, rtol=1e-6, atol=2e-7)
    torch.testing.assert_close(v.double(), want_v, rtol=1e-6, atol=4e-9)
    # control: without the bias correction (step -> large) the float32 p is measurably different
    if p_dtype == torch.float32:
        uncorrected, _, _ = adamw_float64(*inputs(1023, p_dtype, device), 10**6, beta1, beta2, **HYPER)
        assert not torch.allclose(p.double(), uncorrected, **p_tol)
