"""gradcheck in float64 on tiny shapes: each fused backward is the derivative of its own forward.

The kernels accumulate in float64 when given float64 tensors (and only then), which is what makes
finite differences precise enough to check the analytical gradients (torch's default tolerances).
"""

import pytest
import torch
from kernel_inputs import DEVICES, randn

from qlora.kernels.cross_entropy import cross_entropy_sum
from qlora.kernels.rms_norm import rms_norm
from qlora.kernels.rotary import apply_rotary
from qlora.kernels.swiglu import swiglu

f64 = torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm(device):
    x = randn((3, 7), f64, seed=1, device=device).requires_grad_(True)
    w = (randn(7, f64, seed=2, device=device) * 0.3 + 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (x, w))


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu(device):
    g = randn((3, 7), f64, seed=1, device=device, scale=2.0).requires_grad_(True)
    u = randn((3, 7), f64, seed=2, device=device).requires_grad_(True)
    assert torch.autograd.gradcheck(swiglu, (g, u))


@pytest.mark.slow  # >5 s under the interpreter
@pytest.mark.parametrize("device", DEVICES)
def test_rotary(device):
    # tiny: the interpreter runs one program per (batch, position) for every finite difference
    x = randn((1, 3, 2, 4), f64, seed=1, device=device).transpose(1, 2).requires_grad_(True)  # [B, heads=2, T=3, hd]
    angles = torch.arange(1, 4, dtype=f64)[:, None] * torch.tensor([1.0, 0.1], dtype=f64)
    emb = torch.cat([angles, angles], -1)[None].to(device)  # [1, T, hd]
    assert torch.autograd.gradcheck(lambda x: apply_rotary(x, emb.cos(), emb.sin()), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy(device):
    logits = randn((3, 20), f64, seed=1, device=device, scale=2.0).requires_grad_(True)
    labels = torch.tensor([4, -100, 19], device=device)
    assert torch.autograd.gradcheck(lambda z: cross_entropy_sum(z, labels, block_v=16), (logits,))


@pytest.mark.slow  # >5 s under the interpreter
@pytest.mark.parametrize("device", DEVICES)
def test_lora_input_gradient_through_dropout(device):
    """The LoRA layer's backward with the hashed-dropout kernels forced (`ops.dropout_backward`: A's gradient
    and dL/dx through the dropout's mask) is the derivative of the forward (same draws on every call)."""
    from qlora.lora import LoRALinearFunction
    from qlora.ops import KernelPolicy

    x = randn((2, 5, 7), f64, seed=1, device=device).requires_grad_(True)
    A = randn((3, 7), f64, seed=2, device=device).requires_grad_(True)
    B = randn((6, 3), f64, seed=3, device=device).requires_grad_(True)
    W, b = randn((6, 7), f64, seed=4, device=device), randn(6, f64, seed=5, device=device)

    def seeded(*args):
        torch.manual_seed(5)
        return LoRALinearFunction.apply(*args, b, W, 0.75, None, 0.4, KernelPolicy(kernels="triton"))

    assert torch.autograd.gradcheck(seeded, (x, A, B))
