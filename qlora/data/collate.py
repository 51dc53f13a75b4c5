"""From encoded examples to batches: padding, a resumable shuffled order, a held-out split.

`collate` right-pads a list of `EncodedExample`s into `input_ids`, `labels` and `attention_mask`
tensors (int64, shape [batch, length]). Padding positions get `pad_id` in `input_ids`, -100 in
`labels` and 0 in the attention mask. The mask is built from the example *lengths*: QLoRA computes
it as `input_ids != pad_token_id`, which silently masks every real EOS when the pad token is the EOS
token (SmolLM2 ships pad = eos = "<|im_end|>"; a common fallback for tokenizers without a pad).
`pad_to_multiple_of` rounds the length up (tensor-core friendly shapes).

`BatchIterator` yields batches in a seeded order that is a pure function of (seed, epoch): each
epoch is a fresh permutation drawn from `random.Random("qlora.data:{seed}:{epoch}")` (string seeds
are hashed with SHA-512 by Python, so the order is the same across runs, machines and
PYTHONHASHSEED). Its whole state is the position (epoch, batches already yielded in that epoch):
`state_dict()` / `load_state_dict()` save and restore it, and a restored iterator yields exactly the
batches the original would have yielded next, which is what "train N, save, resume, train N equals
train 2N" needs. It runs for `epochs` epochs, or forever when `epochs` is None (training loops
count steps, not epochs).

`split_holdout` sets aside a deterministic, seeded held-out set (QLoRA: `eval_dataset_size` records,
seed 42) when a dataset has no evaluation file; both parts keep file order.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

from qlora.data.encode import IGNORE_INDEX, EncodedExample

T = TypeVar("T")


def collate(
    examples: Sequence[EncodedExample], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad `examples` into `input_ids`, `labels`, `attention_mask` (int64, [batch, length])."""
    if not examples:
        raise ValueError("collate needs at least one example")
    if not isinstance(pad_id, int) or isinstance(pad_id, bool):
        raise ValueError(
            f"pad_id must be an int (got {pad_id!r}); a tokenizer without a pad token can pad with its EOS id"
        )
    length = max(len(example.input_ids) for example in examples)
    if pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        if len(example.labels) != n:
            raise ValueError(f"example {row}: {n} input ids but {len(example.labels)} labels")
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order in which epoch `epoch` visits the examples: a pure function of its arguments."""
    order = list(range(num_examples))
    if shuffle:
        random.Random(f"qlora.data:{seed}:{epoch}").shuffle(order)
    return order


class BatchIterator:
    """Seeded, shuffled, resumable batches of collated examples (see the module docstring)."""

    def __init__(
        self,
        examples: Sequence[EncodedExample],
        batch_size: int,
        *,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        pad_to_multiple_of: int | None = None,
        epochs: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
        self.examples = examples
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pad_to_multiple_of = pad_to_multiple_of
        self.epochs = epochs
        n = len(examples)
        self.batches_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{n} examples make no batch of {batch_size}"
                + (" with drop_last" if drop_last else "")
                + "; lower the batch size or add data"
            )
        self.epoch = 0
        self.index = 0  # batches already yielded in `epoch`
        self._order: tuple[int, list[int]] | None = None

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, epoch_order(len(self.examples), self.seed, self.epoch, self.shuffle))
        start = self.index * self.batch_size
        chosen = self._order[1][start : start + self.batch_size]
        self.index += 1
        return collate([self.examples[i] for i in chosen], self.pad_id, self.pad_to_multiple_of)

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_examples": len(self.examples),
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position. The data and batching settings must be the same."""
        for key in ("seed", "num_examples", "batch_size", "shuffle", "drop_last"):
            ours = self.state_dict()[key]
            if state.get(key) != ours:
                raise ValueError(
                    f"cannot resume the batch order: the saved {key} is {state.get(key)!r} but this "
                    f"iterator has {ours!r}. Resume with the same data and batch settings."
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
            raise ValueError(f"invalid saved position epoch={epoch}, index={index}")
        self.epoch, self.index = epoch, index


def split_holdout(examples: Sequence[T], holdout: int | float, seed: int = 42) -> tuple[list[T], list[T]]:
    """(train, held_out): `holdout` examples (an int) or that fraction (a float in (0, 1),
    rounded up), chosen by a seeded permutation; both parts keep the input order."""
    n = len(examples)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)):
        raise TypeError(f"holdout must be a count or a fraction (got {holdout!r})")
    if isinstance(holdout, float):
        if not 0.0 < holdout < 1.0:
            raise ValueError(f"a holdout fraction must be in (0, 1) (got {holdout})")
        count = math.ceil(holdout * n)
    else:
        count = holdout
    if not 0 < count < n:
        raise ValueError(
            f"cannot hold out {count} of {n} examples: need at least one in each part. "
            "Lower the held-out size or provide an evaluation file."
        )
    order = list(range(n))
    random.Random(f"qlora.holdout:{seed}").shuffle(order)
    held = set(order[:count])
    train = [examples[i] for i in range(n) if i not in held]
    held_out = [examples[i] for i in range(n) if i in held]
    return train, held_out
