"""Scaled copy into the spare columns of a wider matrix (B beside W, h beside x): kernel against its
twin in `qlora.ops`, bit for bit, on odd shapes."""

import pytest
import torch
from kernel_inputs import DEVICES, bits, randn

from qlora import ops
from qlora.kernels.columns_copy import copy_into_columns_
from qlora.ops import KernelPolicy

TWINS = KernelPolicy(kernels="torch")


def wider(rows, left, spare, dtype, device, fill=float("nan")):
    """A [rows, left + spare] matrix full of stale data; its spare columns are the destination."""
    return torch.full((rows, left + spare), fill, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("src_dtype,scale", [(torch.float32, 0.25), (torch.float32, 0.3), (torch.bfloat16, 1.0)],
                         ids=str)  # fmt: skip
@pytest.mark.parametrize("rows,left,r,pad", [(37, 96, 8, 0), (70, 100, 13, 3), (5, 64, 64, 0)], ids=str)
def test_kernel_equals_the_twin_bit_for_bit(rows, left, r, pad, src_dtype, scale, device):
    src = randn((rows, r), src_dtype, seed=1, device=device)
    got, want = wider(rows, left, r + pad, torch.bfloat16, device), wider(rows, left, r + pad, torch.bfloat16, device)
    copy_into_columns_(got[:, left:], src, scale)
    ops.copy_into_columns_(want[:, left:], src, scale, policy=TWINS)
    assert torch.equal(bits(got), bits(want))  # NaN == NaN in the untouched left columns
    assert torch.equal(got[:, left : left + r], (src.float() * scale).bfloat16())
    assert torch.count_nonzero(got[:, left + r :]) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_another_scale_is_detected(device):
    """Negative control: the twin's comparison sees a different scale."""
    src = randn((9, 8), torch.float32, seed=2, device=device)
    got, want = wider(9, 16, 8, torch.bfloat16, device, 0.0), wider(9, 16, 8, torch.bfloat16, device, 0.0)
    copy_into_columns_(got[:, 16:], src, 0.5)
    ops.copy_into_columns_(want[:, 16:], src, 0.25, policy=TWINS)
    assert not torch.equal(got, want)


def test_refuses_a_source_wider_than_the_destination():
    with pytest.raises(ValueError, match="does not fit"):
        copy_into_columns_(torch.zeros(4, 3), torch.zeros(4, 5))
