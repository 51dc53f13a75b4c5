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
