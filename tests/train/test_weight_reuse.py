"""Dense weights kept from a checkpoint's recompute for the backward (`model.checkpoint_context`).

What it must do: give the same loss and gradients, bit for bit; dequantize each 4-bit weight twice
per step instead of three times; and hold no dense weight between the forward and the backward.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from train_fixtures import VOCAB, tiny_qlora_model

import qlora.lora.layer
import qlora.lora.matmul
from qlora.ops import KernelPolicy, policy_of

N_LINEARS = 2 * 7  # two decoder layers of seven 4-bit linears each
N_INPUT_GRADIENTS = N_LINEARS - 3  # layer 0's q, k, v read the frozen embeddings: no input gradient


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(3))


def count_dequantizations(monkeypatch) -> list:
    """Record every dense weight `qlora.lora.matmul` materialises (weakly, to see when it is freed)."""
    made = []
    real = qlora.lora.matmul.dense_weight

    def recording(base, dtype, out=None, *, policy):
        w = real(base, dtype, out, policy=policy)
        made.append(weakref.ref(w))
        return w

    monkeypatch.setattr(qlora.lora.matmul, "dense_weight", recording)  # the forward's
    monkeypatch.setattr(qlora.lora.layer, "dense_weight", recording)  # the backward's
    return made


def step(model, params):
    loss = model(tokens()).float().logsumexp(-1).mean()
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_loss_and_gradients_with_two_dequantizations_instead_of_three(dtype, monkeypatch):
    model, params = tiny_qlora_model("cpu", dtype=dtype)
    made = count_dequantizations(monkeypatch)
    want_loss, want_grads = step(model, params)
    assert len(made) == 2 * N_LINEARS + N_INPUT_GRADIENTS  # forward, recompute, input gradient
    made.clear()
    model.checkpoint_context = policy_of(model).reusing_dense_weights
    got_loss, got_grads = step(model, params)
    assert len(made) == 2 * N_LINEARS
    assert torch.equal(got_loss, want_loss)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert torch.equal(got, want)


def test_no_dense_weight_is_held_between_forward_and_backward(monkeypatch):
    """The checkpoint's first pass discards what the layers save: every dense weight is freed by the
    time the forward returns. Negative control: the same context without checkpointing holds them."""
    model, params = tiny_qlora_model("cpu", dtype=torch.bfloat16)
    made = count_dequantizations(monkeypatch)
    policy = policy_of(model)
    model.checkpoint_context = policy.reusing_dense_weights
    loss = model(tokens()).float().logsumexp(-1).mean()
    gc.collect()
    assert len(made) == N_LINEARS and all(ref() is None for ref in made)
    torch.autograd.grad(loss, params)

    made.clear()
    model.gradient_checkpointing = False
    with KernelPolicy().reusing_dense_weights():  # another model's policy: this model saves no weight
        loss = model(tokens()).float().logsumexp(-1).mean()
    gc.collect()
    assert len(made) == N_LINEARS and all(ref() is None for ref in made)
    del loss

    made.clear()
    with policy.reusing_dense_weights():  # misuse: outside a checkpoint, saved weights live until backward
        loss = model(tokens()).float().logsumexp(-1).mean()
    gc.collect()
    assert sum(ref() is not None for ref in made) == N_INPUT_GRADIENTS  # those its backward will need
    del loss
