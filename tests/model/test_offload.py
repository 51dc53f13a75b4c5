"""`CheckpointOffload` (GPU): checkpointed layer inputs in pinned host memory between forward and backward give
the same loss and gradients bit for bit, less peak GPU memory, and work inside a captured CUDA graph."""

from __future__ import annotations

import pytest
import torch

from qlora.model.config import ModelConfig
from qlora.model.llama import LlamaForCausalLM
from qlora.model.offload import CheckpointOffload
from qlora.train.cuda_graph import CudaGraphStep
from qlora.train.loss import loss_sum_all_rows

pytestmark = pytest.mark.gpu
LAYERS, HIDDEN, VOCAB = 6, 128, 97


def model_and_batch(seed=0, seq=1024):
    cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN,
                               "intermediate_size": 160, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
                               "max_position_embeddings": seq})  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    model.gradient_checkpointing = True
    model.model.embed_tokens.weight.requires_grad_(False)  # as in LoRA training: the inputs are not leaves
    model.train()
    ids = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seed)).cuda()
    return model, ids


def loss_and_grads(model, ids):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    loss = loss_sum_all_rows(model, ids, ids)
    loss.backward()
    torch.cuda.synchronize()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, torch.cuda.max_memory_allocated()


def test_offload_gives_the_same_loss_and_gradients_and_less_memory():
    model, ids = model_and_batch()
    want_loss, want, plain_peak = loss_and_grads(model, ids)
    model.checkpoint_offload = CheckpointOffload(torch.device("cuda"))
    got_loss, got, offload_peak = loss_and_grads(model, ids)
    assert torch.equal(got_loss, want_loss)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    per_layer_input = 2 * 1024 * HIDDEN * 2  # bytes of one [2, 1024, 128] bf16 layer input
    assert model.checkpoint_offload.host_bytes == (LAYERS - 1) * per_layer_input  # all but the last layer's
    # the peak of this tiny model is set by other tensors (logits, attention): the offload must not add to it
    assert offload_peak <= plain_peak + per_layer_input, (plain_peak, offload_peak)


def test_forward_leaves_only_the_last_layer_input_on_the_gpu():
    model, ids = model_and_batch()
    held = []
    for offload in (None, CheckpointOffload(torch.device("cuda"))):
        model.checkpoint_offload = offload
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = loss_sum_all_rows(model, ids, ids)
        torch.cuda.synchronize()
        held.append(torch.cuda.memory_allocated() - before)
        loss.backward()
        model.zero_grad(set_to_none=True)
    per_layer_input = 2 * 1024 * HIDDEN * 2
    assert held[0] - held[1] >= (LAYERS - 1) * per_layer_input, held


def test_backward_reads_the_host_copies():
    """Negative control: zeroing the host copies between forward and backward changes the gradients."""
    model, ids = model_and_batch()
    model.checkpoint_offload = offload = CheckpointOffload(torch.device("cuda"))
    _, want, _ = loss_and_grads(model, ids)
    loss = loss_sum_all_rows(model, ids, ids)
    torch.cuda.synchronize()
    for buffers in offload._host.values():  # each layer's pinned buffers (untyped storages)
        for buffer in buffers:
            buffer.fill_(0)
    loss.backward()
    changed = [n for n, p in model.named_parameters() if p.grad is not None and not torch.equal(p.grad, want[n])]
    assert changed


def test_offload_inside_a_cuda_graph_equals_the_eager_step():
    model, ids = model_and_batch(seq=256)
    params = [p for p in model.parameters() if p.requires_grad]
    want_loss, want, _ = loss_and_grads(model, ids)
    model.checkpoint_offload = CheckpointOffload(torch.device("cuda"))
    step = CudaGraphStep(model, params)
    for _ in range(2):  # the first call captures, then both replay
        step.zero_grad()
        got_loss = step.forward_backward({"input_ids": ids, "labels": ids}, 1.0)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-3, atol=1e-3)
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, want[n], rtol=2e-2, atol=1e-3)


def test_varied_lengths_keep_a_bounded_set_of_host_buffers():
    """Eager steps of many lengths reuse each layer's power-of-two buffers: host memory stays under 4x the
    longest batch's inputs instead of growing with every new length."""
    model, _ = model_and_batch(seq=1024)
    model.checkpoint_offload = offload = CheckpointOffload(torch.device("cuda"))
    for seq in (1024, 300, 700, 512, 129, 1000, 64):
        ids = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seq)).cuda()
        loss_sum_all_rows(model, ids, ids).backward()
        model.zero_grad(set_to_none=True)
    longest = (LAYERS - 1) * 2 * 1024 * HIDDEN * 2
    assert offload.host_bytes < 4 * longest
