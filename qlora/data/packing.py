"""Packing: several short examples in one row, without cross-contamination.

Padding a batch of short instruction examples to its longest wastes most of the compute. Packing
puts several examples ("documents") end to end in one row of at most `pack_len` tokens. Done
naively (one long causal sequence) it changes what the model computes: a document attends to the
ones before it, and its positions continue from them. `collate_packed` prevents both:

- `attention_mask`: bool [B, 1, T, T], True = may attend, block-diagonal: a query attends only to
  keys of its own document (the model ANDs it with causality). A padding position attends only to
  itself (a row with no True would be a softmax over nothing).
- `position_ids`: [B, T], restarting at 0 at each document (padding: 0).
- `labels`: each document's labels, with -100 at every document's first position. The loss shifts
  by one (position t predicts label t+1), so the label at a document's first position would be
  predicted from the previous document's last token; masking it makes a pack's loss terms exactly
  those of its documents alone (a lone example's first label is never predicted either).
  Padding: -100.
- `document_ids`: [B, T] int64, the document index of each position within its row, -1 for
  padding: the real-token count is `(document_ids >= 0).sum()` (a 4D mask cannot be summed for
  it), and it is what a varlen attention kernel's `cu_seqlens` is built from. Not a model input.

So every document's logits in a pack equal its logits alone (tests/data/test_packing.py proves it
on stories260K), and the loss is the same sum of terms as without packing.

`pack_examples` fills packs best-fit (the fullest pack that still has room; O(log n) a step) in a
seeded shuffled order (a pure function of the examples,
`pack_len` and `seed`, so a resumed run rebuilds the same packs), each pack keeping its documents'
order. An example longer than `pack_len` is an error (truncate with the length limits first).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qlora.data.encode import IGNORE_INDEX, EncodedExample


@dataclass(frozen=True)
class Pack:
    """Documents that share one row."""

    examples: tuple[EncodedExample, ...]

    def __len__(self) -> int:
        return sum(len(e) for e in self.examples)


def pack_examples(examples: Sequence[EncodedExample], pack_len: int, seed: int = 0) -> list[Pack]:
    """Best-fit packing of `examples` (in a seeded order) into packs of at most `pack_len` tokens."""
    if pack_len < 1:
        raise ValueError(f"pack_len must be at least 1 (got {pack_len})")
    order = list(range(len(examples)))
    random.Random(f"qlora.pack:{seed}").shuffle(order)
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted: best fit = first with room >= n
    for i in order:
        n = len(examples[i])
        if n > pack_len:
            raise ValueError(
                f"example {i} has {n} tokens, more than the pack length {pack_len}; "
                "raise the pack length or lower max_source_len/max_target_len"
            )
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(i)
        else:
            room, b = pack_len, len(bins)
            bins.append([i])
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return [Pack(tuple(examples[i] for i in b)) for b in bins]


def collate_packed(
    packs: Sequence[Pack], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """`input_ids`, `labels`, `position_ids`, `document_ids` (int64 [B, T]), bool [B, 1, T, T] `attention_mask`."""
    if not packs:
        raise ValueError("collate_packed needs at least one pack")
    length = max(len(p) for p in packs)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    B = len(packs)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)
    labels = torch.full((B, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, length), dtype=torch.long)
    document = torch.full((B, length), -1, dtype=torch.long)  # document index per position, -1 = pad
    for row, pack in enumerate(packs):
        start = 0
        for d, example in enumerate(pack.examples):
            n = len(example)
            if len(example.labels) != n:
                raise ValueError(f"pack {row}, document {d}: {n} input ids but {len(example.labels)} labels")
            input_ids[row, start : start + n] = torch.tensor(example.input_ids, dtype=torch.long)
            labels[row, start : start + n] = torch.tensor(example.labels, dtype=torch.long)
            labels[row, start] = IGNORE_INDEX  # not predicted from the previous document
            position_ids[row, start : start + n] = torch.arange(n)
            document[row, start : start + n] = d
            start += n
    same = document[:, :, None] == document[:, None, :]  # [B, T, T]
    real = document >= 0
    eye = torch.eye(length, dtype=torch.bool)[None]  # [1, T, T]
    mask = (same & real[:, :, None]) | (eye & ~real[:, :, None])  # pads attend to themselves only
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": mask[:, None],
        "position_ids": position_ids,
        "document_ids": document,
    }
