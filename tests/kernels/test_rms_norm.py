"""Fused RMSNorm against its twin, the model's `RMSNorm` module, forward and backward."""

import pytest
import torch
from kernel_inputs import DEVICES, randn

from qlora.kernels.rms_norm import rms_norm
from qlora.model.llama import RMSNorm

# fp32: the kernel sums the row in another order than torch's mean and uses 1/sqrt for rsqrt, so
# results differ by a few fp32 ulps (measured: <= 5e-7 absolute on unit-scale values).
# bf16: outputs are rounded to bf16, so one such ulp can flip a rounding: allow 1 bf16 ulp
# (relative 2^-8 = 3.9e-3, doubled for the gradients, which round twice).
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


def twin_and_fused(shape, dtype, weight_dtype, device, seed=0):
    D = shape[-1]
    module = RMSNorm(D, eps=1e-6).to(device=device, dtype=weight_dtype)
    with torch.no_grad():
        module.weight.copy_(randn(D, seed=seed + 1) * 0.5 + 1.0)
    x = randn(shape, dtype, seed=seed, device=device).requires_grad_(True)
    dy = randn(shape, torch.promote_types(dtype, weight_dtype), seed=seed + 2, device=device)
    return module, x, dy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float32)], ids=str)  # fmt: skip
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 64), (7, 257)], ids=str)
def test_forward_and_backward_match_the_model_module(shape, dtype, weight_dtype, device):
    module, x, dy = twin_and_fused(shape, dtype, weight_dtype, device)
    want = module(x)
    want_dx, want_dw = torch.autograd.grad(want, (x, module.weight), dy)
    got = rms_norm(x, module.weight, module.eps)
    got_dx, got_dw = torch.autograd.grad(got, (x, module.weight), dy)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_dx, want_dx, **tol)
    # dweight sums dy * h over all rows: the absolute error grows with the row count
    torch.testing.assert_close(got_dw, want_dw, rtol=tol["rtol"], atol=tol["atol"] * x.numel() / shape[-1])
    assert got_dx.abs().max() > 0.1 and got_dw.abs().max() > 0.1  # the gradients are not trivially zero


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 37), (5, 257)], ids=str)
def test_out_dtype_rounds_a_float32_stream_once(shape, device):
    """A float32 residual stream with bf16 weights: normalise and scale in fp32, round once to bf16."""
    module, x, _ = twin_and_fused(shape, torch.float32, torch.bfloat16, device)
    dy = randn(shape, torch.bfloat16, seed=7, device=device)
    want = module(x, torch.bfloat16)
    want_dx, want_dw = torch.autograd.grad(want, (x, module.weight), dy)
    got = rms_norm(x, module.weight, module.eps, torch.bfloat16)
    got_dx, got_dw = torch.autograd.grad(got, (x, module.weight), dy)
    assert (got.dtype, got_dx.dtype, got_dw.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    tol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_dx, want_dx, **TOLERANCE[torch.float32])  # dy * w and h stay fp32
    torch.testing.assert_close(got_dw, want_dw, rtol=tol["rtol"], atol=tol["atol"] * shape[0])
    # rounded once: h is not rounded to bf16 before the weight multiplies it
    twice = (module.weight * x.detach().to(torch.bfloat16).float().pow(2).mean(-1, keepdim=True).rsqrt()
             .mul(x.detach().to(torch.bfloat16).float()).to(torch.bfloat16))  # fmt: skip
    assert not torch.equal(got.detach(), twice)


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_weight_gets_no_gradient(device):
    module, x, dy = twin_and_fused((4, 33), torch.float32, torch.float32, device)
    module.weight.requires_grad_(False)
    got = rms_norm(x, module.weight, module.eps)
    (dx,) = torch.autograd.grad(got, (x,), dy)
    (want_dx,) = torch.autograd.grad(module(x), (x,), dy)
    torch.testing.assert_close(dx, want_dx, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_a_wrong_eps_is_detected(device):
    """Negative control: the tolerances above are tight enough to see eps change from 1e-6 to 1e-2."""
    module, x, _ = twin_and_fused((3, 37), torch.float32, torch.float32, device)
    x = x.detach() * 0.05  # small rows, where eps matters
    with pytest.raises(AssertionError):
        torch.testing.assert_close(rms_norm(x, module.weight, 1e-2), module(x), **TOLERANCE[torch.float32])


def test_refuses_a_weight_of_the_wrong_size():
    with pytest.raises(ValueError, match="last dimension 8"):
        rms_norm(torch.ones(2, 8), torch.ones(9), 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 64)], ids=str)
def test_row_strided_output_equals_the_contiguous_one(shape, device):
    """`row_width`: the result stored as the left columns of wider rows (for the adapter columns of the
    projections that read it); the same values and gradients, and the rows found back by `rows_of`."""
    from qlora.kernels.spare_columns import rows_of

    module, x, dy = twin_and_fused(shape, torch.bfloat16, torch.bfloat16, device)
    width = shape[-1] + 8
    want = rms_norm(x, module.weight, module.eps)
    got = rms_norm(x, module.weight, module.eps, None, width)
    assert got.shape == want.shape and got.stride()[-2:] == (width, 1) and torch.equal(got, want)
    assert torch.equal(rows_of(got, width)[:, : shape[-1]], want.reshape(-1, shape[-1]))
    for g, w in zip(torch.autograd.grad(got, (x, module.weight), dy),
                    torch.autograd.grad(want, (x, module.weight), dy), strict=True):  # fmt: skip
        assert torch.equal(g, w)
    with pytest.raises(ValueError, match="narrower"):
        rms_norm(x, module.weight, module.eps, None, shape[-1] - 1)


def rms_norm_float64(x, weight, eps):
    """The definition, in float64: x / sqrt(mean(x^2) + eps) * w (independent of the model's module)."""
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 37), (7, 257)], ids=str)
def test_forward_and_backward_match_the_float64_formula(shape, dtype, device):
    """Against the definition in float64 (autograd for the gradients). fp32: a few fp32 ulps of the
    row sums (rtol 1e-5). bf16: inputs and outputs are bf16, the kernel computes in fp32 and rounds
    the output once (half a bf16 ulp, 2^-9 relative) and dw once more over the row sum: rtol 8e-3
    (one bf16 ulp, 2^-8, doubled); dw's absolute error grows with the number of rows summed."""
    module, x, dy = twin_and_fused(shape, dtype, dtype, device)
    weight = module.weight.detach().requires_grad_(True)
    got = rms_norm(x, weight, 1e-6)
    got_dx, got_dw = torch.autograd.grad(got, (x, weight), dy)
    x64, w64 = x.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    want = rms_norm_float64(x64, w64, 1e-6)
    want_dx, want_dw = torch.autograd.grad(want, (x64, w64), dy.double())
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(got_dx.double(), want_dx, **tol)
    torch.testing.assert_close(got_dw.double(), want_dw, rtol=tol["rtol"], atol=tol["atol"] * x.numel() / shape[-1])
    # the formula is not the kernel's mirror: with eps 1e-2 it is far from the kernel's result
    assert not torch.allclose(got.double(), rms_norm_float64(x * 0.05, weight, 1e-2) / 0.05, **tol)
