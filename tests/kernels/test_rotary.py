"""Fused RoPE against its twin, the model's `apply_rotary`: bit for bit, forward and backward."""

import pytest
import torch
from kernel_inputs import DEVICES, bits, randn

from qlora.kernels.rotary import apply_rotary
from qlora.model.llama import apply_rotary as model_apply_rotary


def cos_sin(position_ids, head_dim, dtype, device, theta=10000.0):
    """cos/sin [B|1, T, hd] as the model's RotaryEmbedding builds them (fp32 angles, cast to dtype)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    freqs = position_ids[..., None].float() * inv_freq  # [B|1, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("per_batch_positions", [False, True], ids=["shared-positions", "packed-positions"])
@pytest.mark.parametrize("heads,head_dim", [(3, 16), (5, 6)], ids=str)
def test_forward_and_backward_are_bit_exact(heads, head_dim, per_batch_positions, dtype, device):
    B, T = 2, 7
    # the model's layout: q is [B, T, heads, hd] from the projection, transposed (not copied) to [B, heads, T, hd]
    x = randn((B, T, heads, head_dim), dtype, seed=heads, device=device).transpose(1, 2).requires_grad_(True)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [5, 6, 7, 8, 9, 10, 11]]) if per_batch_positions \
        else torch.arange(3, 3 + T)[None]  # fmt: skip
    cos, sin = cos_sin(positions, head_dim, dtype, device)
    dy = randn((B, heads, T, head_dim), dtype, seed=9, device=device)
    want = model_apply_rotary(x, cos, sin)
    (want_dx,) = torch.autograd.grad(want, (x,), dy)
    got = apply_rotary(x, cos, sin)
    (got_dx,) = torch.autograd.grad(got, (x,), dy)
    assert torch.equal(bits(got), bits(want)), f"{(bits(got) != bits(want)).sum()} outputs differ"
    assert torch.equal(bits(got_dx), bits(want_dx)), f"{(bits(got_dx) != bits(want_dx)).sum()} gradients differ"
    assert got.stride() == x.stride()  # the output keeps the input's layout


@pytest.mark.parametrize("device", DEVICES)
def test_swapped_cos_and_sin_are_detected(device):
    """Negative control: the bitwise comparison sees a rotation by the complementary angle."""
    x = randn((1, 2, 5, 8), device=device)
    cos, sin = cos_sin(torch.arange(5)[None], 8, torch.float32, device)
    assert not torch.equal(apply_rotary(x, sin, cos), model_apply_rotary(x, cos, sin))


def test_refuses_mismatched_tables():
    x = torch.ones(1, 2, 5, 8)
    with pytest.raises(ValueError, match="rotary cos"):
        apply_rotary(x, torch.ones(1, 4, 8), torch.ones(1, 5, 8))
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rotary(torch.ones(1, 2, 5, 7), torch.ones(1, 5, 7), torch.ones(1, 5, 7))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_and_backward_match_the_float64_formula(dtype, device):
    """Against the definition in float64, from the same (dtype) cos/sin tables: pairs (x_i, x_{i+hd/2})
    rotate: y_i = x_i cos - x_{i+hd/2} sin, y_{i+hd/2} = x_{i+hd/2} cos + x_i sin; the gradient is the
    rotation by the opposite angle. The kernel rounds two products and their sum in the dtype's
    arithmetic, as the twin does: within 2 ulps of the dtype (relative), plus an absolute ulp near 0."""
    B, heads, T, hd = 2, 3, 7, 16
    x = randn((B, heads, T, hd), dtype, seed=4, device=device).requires_grad_(True)
    cos, sin = cos_sin(torch.arange(2, 2 + T)[None], hd, dtype, device)
    dy = randn((B, heads, T, hd), dtype, seed=5, device=device)
    got = apply_rotary(x, cos, sin)
    (got_dx,) = torch.autograd.grad(got, (x,), dy)
    c, s = cos.double()[:, None], sin.double()[:, None]  # [1, 1, T, hd]: broadcast over heads
    half = hd // 2

    def rotate(v, sign):  # by the angle (sign +1) or its opposite (sign -1)
        first, second = v[..., :half], v[..., half:]
        return torch.cat((first * c[..., :half] - sign * second * s[..., :half],
                          second * c[..., half:] + sign * first * s[..., half:]), dim=-1)  # fmt: skip

    ulp = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    tol = dict(rtol=2 * ulp, atol=2 * ulp)
    torch.testing.assert_close(got.double(), rotate(x.detach().double(), 1), **tol)
    torch.testing.assert_close(got_dx.double(), rotate(dy.double(), -1), **tol)
    assert not torch.allclose(got.double(), rotate(x.detach().double(), -1), **tol)  # the sign matters
