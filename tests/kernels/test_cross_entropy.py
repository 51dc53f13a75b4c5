"""Fused cross-entropy against its twin `F.cross_entropy(logits.float(), ..., reduction="sum")`."""

import pytest
import torch
import torch.nn.functional as F
from kernel_inputs import DEVICES, randn

from qlora.kernels.cross_entropy import cross_entropy_sum

IGNORE = -100


def inputs(rows, vocab, dtype, device, scale=3.0, seed=0):
    logits = randn((rows, vocab), dtype, seed=seed, device=device, scale=scale).requires_grad_(True)
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(seed)).to(device)
    labels[1] = IGNORE  # a prompt position
    return logits, labels


# fp32 on both sides; only the order of the exp-sum differs (online, tiled): a few fp32 ulps.
# The gradient is rounded to the logits' dtype (the twin's comes back in it too): 1 ulp there.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-6)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,vocab,block_v", [(7, 37, 16), (3, 100, 64), (5, 16, 16)], ids=str)
def test_loss_and_gradient_match_torch(rows, vocab, block_v, dtype, device):
    logits, labels = inputs(rows, vocab, dtype, device)
    want = F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=IGNORE)
    (want_grad,) = torch.autograd.grad(want * 0.7, (logits,))  # a non-unit upstream gradient
    got = cross_entropy_sum(logits, labels, block_v=block_v)
    (got_grad,) = torch.autograd.grad(got * 0.7, (logits,))
    assert got.dtype == torch.float32 and got_grad.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, **TOLERANCE[dtype])
    assert torch.all(got_grad[1] == 0)  # the ignored row


@pytest.mark.parametrize("device", DEVICES)
def test_large_logits_stay_finite(device):
    """The online max keeps exp in range: logits of 1e4 would overflow a naive exp."""
    logits, labels = inputs(4, 50, torch.float32, device, scale=1e4)
    want = F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE)
    got = cross_entropy_sum(logits, labels, block_v=16)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_all_ignored_gives_zero_loss_and_gradient(device):
    logits, labels = inputs(3, 20, torch.float32, device)
    labels[:] = IGNORE
    got = cross_entropy_sum(logits, labels, block_v=16)
    (grad,) = torch.autograd.grad(got, (logits,))
    assert got.item() == 0.0 and torch.all(grad == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_shifted_labels_are_detected(device):
    """Negative control: predicting the neighbouring token is a different loss, and the check sees it."""
    logits, labels = inputs(7, 37, torch.float32, device)
    shifted = torch.where(labels == IGNORE, labels, (labels + 1) % 37)
    want = F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(cross_entropy_sum(logits, shifted, block_v=16), want, rtol=1e-6, atol=1e-5)


def test_refuses_labels_outside_the_vocabulary():
    with pytest.raises(IndexError, match="outside the vocabulary"):
        cross_entropy_sum(torch.zeros(2, 10), torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="power of two"):
        cross_entropy_sum(torch.zeros(2, 10), torch.tensor([3, 1]), block_v=24)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loss_and_gradient_match_the_float64_formula(dtype, device):
    """Against log_softmax in float64: loss = -sum over kept rows of log_softmax(x)[label], gradient
    (softmax(x) - onehot(label)) * upstream on kept rows, 0 on ignored ones. The kernel works in fp32
    (a few fp32 ulps of the row's exp-sum: rtol 1e-5 on the loss) and rounds the gradient to the
    logits' dtype once (TOLERANCE above: 1 ulp there)."""
    logits, labels = inputs(7, 100, dtype, device)
    got = cross_entropy_sum(logits, labels, block_v=32)
    (got_grad,) = torch.autograd.grad(got * 0.7, (logits,))
    x64 = logits.detach().double()
    kept = labels != IGNORE
    log_p = torch.log_softmax(x64, dim=-1)
    want = -log_p[kept, labels[kept]].sum()
    onehot = F.one_hot(labels.clamp(min=0), 100).double()
    want_grad = (log_p.exp() - onehot) * 0.7 * kept[:, None]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad.double(), want_grad, **TOLERANCE[dtype])
    assert not torch.allclose(got.double(), -log_p[kept, (labels[kept] + 1) % 100].sum(), rtol=1e-5)  # control
