"""Producers (the decoder's norms, SwiGLU) storing their output inside the rows their LoRA readers want
(`qlora.fused`, `qlora.kernels.spare_columns`): the model computes what concatenation computes."""

import functools

import pytest
import torch
from train_fixtures import VOCAB, tiny_qlora_model


def _recorded(fn, calls, *args):
    calls.append(fn(*args))
    return calls[-1]


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["nf4", None])
def test_stored_in_the_readers_rows_the_model_computes_the_same(quant, monkeypatch):
    """A tiny QLoRA model on CUDA: producers (norms, SwiGLU) storing their output inside the LoRA readers'
    wider rows (the decoder block asks its readers for the width and hands it to them) give the loss and
    adapter gradients of concatenation; and they did. Not bit for bit: the adapters' skinny GEMMs read x
    with a wider row stride, and cuBLAS may split their sums otherwise."""
    import qlora.lora.layer

    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3)).cuda()
    results = []
    for wide in (True, False):
        model, params = tiny_qlora_model("cuda", torch.bfloat16, quant=quant)
        used = []
        monkeypatch.setattr(qlora.lora.layer, "rows_of", functools.partial(_recorded, qlora.lora.layer.rows_of, used))
        if not wide:
            monkeypatch.setattr(qlora.lora.layer.LoRALinear, "input_row_width", lambda self, device, dtype: None)
        loss = torch.nn.functional.cross_entropy(model(ids).float().flatten(0, 1), ids.flatten())
        loss.backward()
        results.append((loss.detach(), *[p.grad for p in params]))
        found = sum(rows is not None for rows in used)
        assert found == (6 * 2 * 2 if wide else 0)  # q k v gate up down (not o) x 2 layers x (forward, recompute)
        monkeypatch.undo()
    (want_loss, *want_grads), (got_loss, *got_grads) = results
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-3, atol=0.0)
    # two bf16 layers of backward downstream of last-bit differences: up to 2.5% of a gradient's scale measured
    for want, got in zip(want_grads, got_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2 * float(want.abs().max()))
