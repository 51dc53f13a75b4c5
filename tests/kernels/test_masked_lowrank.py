"""`out += scale * keep * (g @ a)` (the adapter's input gradient through its dropout), kernel and twin,
against a float64 reference on odd shapes."""

import pytest
import torch
from kernel_inputs import DEVICES, randn

from qlora import ops
from qlora.kernels.masked_lowrank import add_masked_lowrank_
from qlora.lora.dropout import HashedDropout
from qlora.ops import KernelPolicy

# The kernel rounds once (the float32 sum); the twin rounds the product to the dtype first, then the sum.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-7, atol=2**-6),
             torch.float16: dict(rtol=2**-10, atol=2**-9)}  # fmt: skip


def inputs(n, n_in, rank, dtype, device, keep_dtype=torch.bool, seed=0):
    out = randn((n, n_in), dtype, seed=seed, device=device)
    g = randn((n, rank), dtype, seed=seed + 1, device=device, scale=0.5)
    a = randn((rank, n_in), dtype, seed=seed + 2, device=device, scale=0.5)
    keep = torch.rand(n, n_in, generator=torch.Generator().manual_seed(seed + 3)) > 0.3
    keep = keep.to(device) if keep_dtype == torch.bool else (keep / 0.7).to(device=device, dtype=keep_dtype)
    return out, g, a, keep


def reference(out, g, a, keep, scale):
    return (out.double() + scale * keep.double() * (g.double() @ a.double())).to(out.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(37, 203, 5), (130, 96, 64), (9, 300, 72)], ids=str)
def test_kernel_matches_float64(shape, dtype, device):
    out, g, a, keep = inputs(*shape, dtype, device)
    want = reference(out, g, a, keep, 1 / 0.7)
    got = add_masked_lowrank_(out.clone(), g, a, keep, 1 / 0.7)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("implementation", ["triton", "torch"])
@pytest.mark.parametrize("device", DEVICES)
def test_ops_dispatch_the_hashed_mask_and_a_strided_destination(device, implementation):
    """The mask a `HashedDropout` (what the LoRA layer hands the op), out a column view of a wider matrix,
    through qlora.ops."""
    out, g, a, _ = inputs(33, 70, 6, torch.bfloat16, device, seed=4)
    mask = HashedDropout(torch.tensor([4, 5], device=device), 0.3)
    wide = torch.zeros(33, 80, dtype=torch.bfloat16, device=device)
    wide[:, :70] = out
    ops.add_masked_lowrank_(wide[:, :70], g, a, mask, 1.0, policy=KernelPolicy(kernels=implementation))
    want = reference(out, g, a, mask.multipliers(33, 70, torch.float64), 1.0)  # keep / (1 - p)
    torch.testing.assert_close(wide[:, :70], want, **TOLERANCE[torch.bfloat16])
    assert torch.count_nonzero(wide[:, 70:]) == 0  # nothing written beside the view


@pytest.mark.parametrize("device", DEVICES)
def test_another_mask_is_detected(device):
    """Negative control: the comparison above sees a transposed mask."""
    out, g, a, keep = inputs(40, 40, 8, torch.float32, device)
    got = add_masked_lowrank_(out.clone(), g, a, keep.t().contiguous(), 2.0)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, reference(out, g, a, keep, 2.0), **TOLERANCE[torch.float32])


def test_refuses_shapes_that_do_not_line_up():
    out, g, a, keep = inputs(5, 7, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="do not line up"):
        add_masked_lowrank_(out, g, a.t().contiguous(), keep, 1.0)
