"""Fused LoRA dropout under gradient checkpointing: the recompute draws the same seeds, so the same masks.

Each LoRA layer draws its dropout seed from torch's generator; the checkpoint restores the generator
for the recompute. If it did not, the recompute would drop other elements than the forward did and
the gradients would belong to no single mask (they would differ from a run without checkpointing).
"""

from __future__ import annotations

import os

import pytest
import torch
from train_fixtures import VOCAB, tiny_qlora_model

from qlora import ops

DEVICES = [pytest.param("cpu", id="interpreter")] if os.environ.get("TRITON_INTERPRET") == "1" else []
DEVICES.append(pytest.param("cuda", marks=pytest.mark.gpu))


@pytest.mark.parametrize("device", DEVICES)
def test_checkpointing_changes_nothing_with_fused_dropout(device):
    pytest.importorskip("triton")
    model, params = tiny_qlora_model(device, dtype=torch.bfloat16, dropout=0.2)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(3)).to(device)
    results = []
    with ops.use_implementation("triton"):
        assert ops.lora_dropout_fusable(model.model.embed_tokens(ids), 8)
        for checkpointing in (True, False, True):
            model.gradient_checkpointing = checkpointing
            torch.manual_seed(11)
            loss = model(ids).float().logsumexp(-1).mean()
            results.append([loss.detach(), *torch.autograd.grad(loss, params)])
    for got, want in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # negative control: another seed, other masks, other gradients
    with ops.use_implementation("triton"):
        torch.manual_seed(12)
        loss = model(ids).float().logsumexp(-1).mean()
        other = torch.autograd.grad(loss, params)
    assert any(not torch.equal(a, b) for a, b in zip(other, results[2][1:], strict=True))
