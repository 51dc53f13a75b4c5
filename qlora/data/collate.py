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

Length grouping (`group_by_length=True`, QLoRA's `--group_by_length`, i.e. transformers'
`LengthGroupedSampler`): the epoch's seeded permutation is cut into megabatches of
`batch_size * megabatch_mult` (50, as transformers), each sorted by length, longest first, and cut
into batches; the longest example moves into the first batch so an out-of-memory shows at the
first step. Batches hold similar lengths (little padding) and the order is still a pure
function of (seed, epoch), so resuming is exact.

The items may be `Pack`s (`packing.py`) instead of examples: the batch is then made by
`collate_packed` (block-diagonal 4D mask, restarting positions). Packs are a pure function of
(examples, pack length, seed), so a resumed run rebuilds them and the saved position applies.
The state records a digest of the item lengths, so resuming on other data (or other packing) is
refused rather than silently off by some examples.

`split_holdout` sets aside a deterministic, seeded held-out set (QLoRA: `eval_dataset_size` records,
seed 42) when a dataset has no evaluation file; both parts keep file order.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

from qlora.data.encode import IGNORE_INDEX, EncodedExample
from qlora.data.packing import Pack, collate_packed

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


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a batch from `collate` or `collate_packed`."""
    if "document_ids" in batch:
        return int((batch["document_ids"] >= 0).sum())
    return int(batch["attention_mask"].sum())


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order in which epoch `epoch` visits the examples: a pure function of its arguments."""
    order = list(range(num_examples))
    if shuffle:
        random.Random(f"qlora.data:{seed}:{epoch}").shuffle(order)
    return order


def grouped_epoch_order(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, megabatch_mult: int = 50
) -> list[int]:
    """Epoch `epoch`'s order with similar lengths batched together (see the module docstring)."""
    order = epoch_order(len(lengths), seed, epoch, shuffle=True)
    size = batch_size * megabatch_mult
    megabatches = [
        sorted(order[i : i + size], key=lambda j: lengths[j], reverse=True) for i in range(0, len(order), size)
    ]
    # The longest example to the front (swapped with the first, longest, element of megabatch 0), as
    # transformers does: moving single elements keeps every batch boundary at a multiple of batch_size.
    longest = max(range(len(megabatches)), key=lambda m: lengths[megabatches[m][0]])
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [i for m in megabatches for i in m]


def _lengths_digest(items: Sequence) -> str:
    lengths = ",".join(str(len(item)) for item in items)
    return hashlib.sha256(lengths.encode()).hexdigest()[:16]


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
        group_by_length: bool = False,
        megabatch_mult: int = 50,
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
        self.group_by_length = group_by_length
        self.megabatch_mult = megabatch_mult
        self.packed = bool(examples) and isinstance(examples[0], Pack)
        self._digest = _lengths_digest(examples)
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
        self.last_step: list[int] = []  # the items (indices into `examples`) of the last `next_step`, all ranks'

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self._collate(self._next_indices())

    def next_step(self, count: int, rank: int = 0, world_size: int = 1) -> list[dict[str, torch.Tensor]]:
        """The next `count` batches of the one global order, of which this rank collates and returns its
        share: batches j = rank, rank + world_size, ... (`count` a multiple of `world_size`). Every rank
        advances by all `count`, so the position (`state_dict`) is the same on every rank and equal to a
        single process's that took all `count`: each example is seen once per epoch across the ranks, and
        a run resumes on any number of processes."""
        if count % world_size:
            raise ValueError(f"{count} batches cannot be shared evenly by {world_size} ranks")
        chosen = [self._next_indices() for _ in range(count)]
        self.last_step = [i for indices in chosen for i in indices]
        return [self._collate(indices) for indices in chosen[rank::world_size]]

    def _next_indices(self) -> list[int]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        if self._order is None or self._order[0] != self.epoch:
            if self.group_by_length:
                lengths = [len(item) for item in self.examples]
                order = grouped_epoch_order(lengths, self.batch_size, self.seed, self.epoch, self.megabatch_mult)
            else:
                order = epoch_order(len(self.examples), self.seed, self.epoch, self.shuffle)
            self._order = (self.epoch, order)
        start = self.index * self.batch_size
        self.index += 1
        return self._order[1][start : start + self.batch_size]

    def _collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        chosen = [self.examples[i] for i in indices]
        if self.packed:
            return collate_packed(chosen, self.pad_id, self.pad_to_multiple_of)
        return collate(chosen, self.pad_id, self.pad_to_multiple_of)

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
            "group_by_length": self.group_by_length,
            "megabatch_mult": self.megabatch_mult,
            "packed": self.packed,
            "lengths_digest": self._digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position. The data and batching settings must be the same."""
        defaults = {"group_by_length": False, "megabatch_mult": 50, "packed": False}  # states saved before these
        ours_all = self.state_dict()
        for key in ("seed", "num_examples", "batch_size", "shuffle", "drop_last", *defaults, "lengths_digest"):
            ours = ours_all[key]
            if key == "lengths_digest" and key not in state:
                continue
            if state.get(key, defaults.get(key)) != ours:
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
