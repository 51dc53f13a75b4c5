"""Fused SwiGLU against its twin `F.silu(gate) * up` (the model's MLP activation), forward and backward."""

import pytest
import torch
import torch.nn.functional as F
from kernel_inputs import DEVICES, randn

from qlora.kernels.swiglu import swiglu

# The roundings are placed where torch places them; what differs is exp and the division inside
# silu (fp32 ulps). fp32: a few ulps. bf16/fp16: one ulp of the output dtype can flip.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
             torch.float16: dict(rtol=1e-3, atol=1e-6)}  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(3, 37), (2, 3, 129), (5000,)], ids=str)
def test_forward_and_backward_match_the_twin(shape, dtype, device):
    gate = randn(shape, dtype, seed=1, device=device, scale=3.0).requires_grad_(True)
    up = randn(shape, dtype, seed=2, device=device).requires_grad_(True)
    dy = randn(shape, dtype, seed=3, device=device)
    want = F.silu(gate) * up
    want_grads = torch.autograd.grad(want, (gate, up), dy)
    got = swiglu(gate, up)
    got_grads = torch.autograd.grad(got, (gate, up), dy)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, **tol)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_swapped_arguments_are_detected(device):
    """Negative control: silu(up) * gate is a different function and the comparison sees it."""
    gate, up = randn((3, 37), seed=1, device=device), randn((3, 37), seed=2, device=device)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(swiglu(up, gate), F.silu(gate) * up, **TOLERANCE[torch.float32])


def test_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.ones(2, 3), torch.ones(2, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 1030)], ids=str)
def test_row_strided_output_equals_the_contiguous_one(shape, device):
    """`row_width`: the result stored as the left columns of a wider matrix (for a LoRA consumer's
    adapter columns), the same values and gradients; the spare columns are left to the consumer."""
    from qlora.kernels.spare_columns import rows_of

    gate = randn(shape, torch.bfloat16, seed=1, device=device, scale=3.0).requires_grad_(True)
    up = randn(shape, torch.bfloat16, seed=2, device=device).requires_grad_(True)
    dy = randn(shape, torch.bfloat16, seed=3, device=device)
    width = shape[-1] + 11
    want = swiglu(gate, up)
    got = swiglu(gate, up, row_width=width)
    assert got.shape == want.shape and got.stride()[-2:] == (width, 1)
    assert torch.equal(got, want)
    assert rows_of(got, width).shape == (got.numel() // shape[-1], width)
    assert torch.equal(rows_of(got, width)[:, : shape[-1]], want.reshape(-1, shape[-1]))
    want_grads = torch.autograd.grad(want, (gate, up), dy)
    got_grads = torch.autograd.grad(got, (gate, up), dy)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.equal(g, w)
    with pytest.raises(ValueError, match="narrower"):
        swiglu(gate, up, row_width=shape[-1] - 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_and_backward_match_the_float64_formula(dtype, device):
    """Against the definition in float64: y = g * sigmoid(g) * u, autograd for the gradients.

    The kernel rounds where torch does: silu(g) to the dtype, then the product (two roundings of half
    an ulp each, so 1 ulp relative: 2^-8 bf16, 2^-11 fp16, a few 2^-24 fp32); the gradients take one
    more rounding. Tolerance: 2 ulps of the dtype, relative, plus a tiny absolute term near zero."""
    shape = (7, 129)
    gate = randn(shape, dtype, seed=1, device=device, scale=3.0).requires_grad_(True)
    up = randn(shape, dtype, seed=2, device=device).requires_grad_(True)
    dy = randn(shape, dtype, seed=3, device=device)
    got = swiglu(gate, up)
    got_grads = torch.autograd.grad(got, (gate, up), dy)
    g64, u64 = gate.detach().double().requires_grad_(True), up.detach().double().requires_grad_(True)
    want = g64 * torch.sigmoid(g64) * u64
    want_grads = torch.autograd.grad(want, (g64, u64), dy.double())
    ulp = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    tol = dict(rtol=2 * ulp, atol=1e-6)
    torch.testing.assert_close(got.double(), want, **tol)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), w, **tol)
    # negative control: the formula with the arguments swapped is far outside the tolerance
    assert not torch.allclose(got.double(), u64 * torch.sigmoid(u64) * g64, **tol)
