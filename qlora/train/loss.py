"""The causal-LM loss, computed from hidden states only where a label exists.

Logits are the largest tensor of a finetuning step: [tokens, vocab] in float32 is 4 GiB for
8,192 tokens of a 128K vocabulary. Two things keep them small:

- only positions with a label (not -100) go through `lm_head`: with the prompt masked, as
  instruction tuning does by default, that is often a minority of the tokens;
- those rows go through `lm_head` and the float32 cross-entropy in chunks, each under activation
  checkpointing, so backward recomputes one chunk's logits at a time instead of keeping them all.

`loss_sum` returns the *sum* of token losses and the number of tokens. The loop divides by the
token count of the whole accumulated batch, so micro-batches with different numbers of target
tokens give exactly the loss (and gradient) of one big batch: token-weighted accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora import ops
from qlora.ops import KernelPolicy, policy_of

IGNORE_INDEX = -100


def _chunk_ce_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, policy: KernelPolicy
) -> torch.Tensor:
    logits = F.linear(hidden, weight)  # [n, H] @ [H, V] -> [n, V]
    # float32 softmax inside; the Triton path never makes a float32 copy of the logits
    return ops.cross_entropy_sum(logits, labels, policy=policy)


def loss_sum(model, batch: dict[str, torch.Tensor], chunk_rows: int = 2048) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled positions, number of those positions)."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    # Packed batches carry a block-diagonal [B, 1, T, T] mask and per-document position_ids.
    hidden = model.hidden_states(input_ids, attention_mask=batch.get("attention_mask"),
                                 position_ids=batch.get("position_ids"))  # [B, T, H]  # fmt: skip
    targets = labels[:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE_INDEX  # [B, T-1]
    rows = hidden[:, :-1][keep]  # [N, H]: only labelled positions reach lm_head
    wanted = targets[keep]  # [N]
    n = int(wanted.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph connected; contributes nothing
    weight, policy = model.lm_head.weight, policy_of(model)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_rows):
        part = slice(start, start + chunk_rows)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce_sum, rows[part], weight, wanted[part], policy, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(rows[part], weight, wanted[part], policy)
    return total, n


def loss_sum_all_rows(model, input_ids: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 2048) -> torch.Tensor:
    """The same sum as `loss_sum`, with every position sent through `lm_head` (ignored ones contribute 0).

    Shapes depend only on the input shape and nothing is read back to the host, which is what a
    CUDA graph needs (`qlora.train.cuda_graph`); the price is lm_head FLOPs on unlabelled rows.
    Right-padded batches need no attention mask here: under the causal mask a real token never
    attends to the pads that follow it, and the pads' own positions carry label -100.
    """
    hidden = model.hidden_states(input_ids)  # [B, T, H]
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [B*(T-1), H]
    targets = labels[:, 1:].reshape(-1)  # [B*(T-1)]
    weight, policy = model.lm_head.weight, policy_of(model)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_rows):
        part = slice(start, start + chunk_rows)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce_sum, rows[part], weight, targets[part], policy, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(rows[part], weight, targets[part], policy)
    return total


class StepLoss(nn.Module):
    """`loss_sum` as a module's forward: what DDP and FSDP wrap, so that their hooks run around the whole
    forward (embeddings, layers, norm and lm_head). `model` is the `LlamaForCausalLM`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **rest: torch.Tensor) -> tuple[torch.Tensor, int]:
        return loss_sum(self.model, {"input_ids": input_ids, "labels": labels, **rest})
