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
