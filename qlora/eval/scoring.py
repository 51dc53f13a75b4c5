"""Next-token logits of a few candidate tokens at the end of each prompt: the multiple-choice scorer.

MMLU (the letters A-D) and the local-model judge (the verdicts 1/2/3) both ask one question: at
the position that predicts the first token after the prompt, which candidate does the model rank
highest? That position is the prompt's last token (logits at position p predict token p + 1), so
for a right-padded batch it is `length - 1` of each row, never the last column of the batch.

This is the QLoRA code's rule: it takes the logits one before the first non-ignored label, i.e. the
last source token. A candidate is `tokenizer("A", add_special_tokens=False).input_ids[0]` there:
the first id of the candidate encoded alone (with a sentencepiece Llama vocabulary that is "▁A",
with a byte-level BPE one "A" without the space), which is also the id QLoRA's training target
"A</s>" starts with. A vocabulary too small to hold "▁A" (stories260K's 512 pieces: "▁" + "A")
makes the letters share a first id; that is an error, not a silent 25%.

Our decoder's hidden states are put through lm_head at the answer positions only (for a 49k vocabulary
the full [batch, length, vocab] logits would cost about a fifth of the forward and most of its
memory); any other model is called whole and indexed. A test checks both ways agree.

Prompts longer than `max_length` keep their last `max_length` tokens, so the answer position
survives (QLoRA truncates on the right, which for a prompt longer than its 2,048-token limit would
score the wrong position; MMLU 5-shot prompts stay far below that).
"""

from __future__ import annotations

import torch

from qlora.tokenizer import Tokenizer


class ScoringError(ValueError):
    """Candidates that the next-token protocol cannot tell apart with this tokenizer."""


def candidate_ids(tokenizer: Tokenizer, candidates: tuple[str, ...], prefix: str = "") -> list[int]:
    """The first token id of each candidate encoded alone (the QLoRA code's `abcd_idx`).

    `prefix=" "` encodes " A" instead: the token a byte-level BPE model writes after "Answer:"
    (lm-evaluation-harness' choice). With sentencepiece vocabularies both give "▁A".
    """
    ids = []
    for c in candidates:
        encoded = tokenizer.encode(prefix + c)
        if not encoded:
            raise ScoringError(f"candidate {prefix + c!r} encodes to no tokens with {tokenizer.source}")
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        shown = [tokenizer.id_to_token(i) for i in ids]
        raise ScoringError(f"{tokenizer.source}: candidates {candidates} begin with the same token ({shown}); the "
                         "next-token protocol cannot tell them apart with this vocabulary")  # fmt: skip
    return ids


def divergent_candidates(tokenizer: Tokenizer, candidates: tuple[str, ...]) -> tuple[list[int], list[int]]:
    """(shared prefix ids, first differing id of each candidate): how to score candidates whose
    encodings start alike. stories260K encodes "1" as "▁" "1": the prompt gets "▁" appended and the
    digits are compared at the next position. Raises when no single position tells them apart."""
    encoded = [tokenizer.encode(c) for c in candidates]
    n = 0
    while all(len(e) > n + 1 for e in encoded) and len({e[n] for e in encoded}) == 1:
        n += 1
    ids = [e[n] if len(e) > n else -1 for e in encoded]
    if -1 in ids or len(set(ids)) != len(ids):
        shown = [[tokenizer.id_to_token(i) for i in e] for e in encoded]
        raise ScoringError(f"{tokenizer.source}: candidates {candidates} encode as {shown}; no single position "
                         "tells them apart")  # fmt: skip
    return encoded[0][:n], ids


def encode_prompts(tokenizer: Tokenizer, prompts: list[str], add_bos: bool = True) -> list[list[int]]:
    """Ids of each prompt, BOS first when the tokenizer has one and `add_bos` (QLoRA prefixes it)."""
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    return [bos + tokenizer.encode(p) for p in prompts]


@torch.no_grad()
def last_position_logits(
    model, prompts_ids: list[list[int]], candidates: list[int], *, batch_size: int = 8, max_length: int = 2048,
    pad_id: int = 0,
) -> torch.Tensor:  # fmt: skip
    """[N, len(candidates)] float32 logits at each prompt's last position (see the module docstring)."""
    if not prompts_ids:
        return torch.zeros(0, len(candidates))
    device = next(model.parameters()).device
    cand = torch.tensor(candidates, device=device)
    order = sorted(range(len(prompts_ids)), key=lambda i: len(prompts_ids[i]))  # similar lengths share a batch
    out = torch.empty(len(prompts_ids), len(candidates))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        seqs = [prompts_ids[i][-max_length:] for i in rows]
        if any(len(s) == 0 for s in seqs):
            raise ValueError("an empty prompt has no answer position")
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):  # right padding: real tokens at 0..len-1
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)  # the answer position of each row
        batch = torch.arange(len(seqs), device=device)
        if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
            # only the answer positions reach lm_head: [B, H] @ [H, V], not [B, T, V] logits
            hidden = model.hidden_states(ids.to(device), attention_mask=mask.to(device))  # [B, T, H]
            picked = model.lm_head(hidden[batch, last])  # [B, V]
        else:
            picked = model(ids.to(device), attention_mask=mask.to(device))[batch, last]  # [B, T, V] -> [B, V]
        out[rows] = picked[:, cand].float().cpu()
    return out
