"""Evaluation over the processes of a torchrun job: which items this rank scores, and the scores put back in order.

Under torchrun `qlora eval` runs one process per GPU and every process holds the whole model: evaluation
splits the work, never the model (a model that one GPU trains in 4 bits, one GPU can score). Rank r of N
scores items r, r + N, r + 2N, ... of the full list: the perplexity's windows, MMLU's questions. Interleaved
rather than in contiguous blocks because MMLU's questions come grouped by subject, and a subject's prompts
are alike in length: every rank gets some of each subject, so the ranks finish at about the same time.

`in_global_order` puts every rank's per-item scores back at their places in the full list with one
`all_reduce` (sum): each place is owned by exactly one rank and the others add 0.0, so the sum is exact and
every rank ends up with the list one process would have made, in the same order. What is computed from it
(the float64 sum of the NLLs, MMLU's per-subject accuracies) then runs as in one process, so N processes give
the one-process report bit for bit whenever each item's own score is the same. It is for a perplexity window
(one forward of the same tokens); an MMLU question may share its padded batch with other questions than in
one process, which can move its logits by float rounding (an argmax changes only on an exact near-tie).
A world of one (not launched by torchrun) takes every item and communicates nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from qlora.distributed import Runtime

T = TypeVar("T")


def share_of(items: Sequence[T], runtime: Runtime) -> list[T]:
    """This rank's items: r, r + N, r + 2N, ... of `items` (all of them in a world of one)."""
    return list(items[runtime.rank :: runtime.world_size])


def placed(share_values: Sequence[float], count: int, rank: int, world_size: int) -> list[float]:
    """`count` zeros with rank `rank`'s values at the places `share_of` took its items from."""
    places = range(rank, count, world_size)
    if len(share_values) != len(places):
        raise ValueError(f"rank {rank} of {world_size}: {len(share_values)} values for its share of "
                         f"{len(places)} of {count} items")  # fmt: skip
    full = [0.0] * count
    for place, value in zip(places, share_values, strict=True):
        full[place] = float(value)
    return full


def in_global_order(share_values: Sequence[float], count: int, runtime: Runtime) -> list[float]:
    """The scores of all `count` items in their original order, on every rank, from each rank's share's scores
    (`share_of`'s order). A collective: every rank calls it, with the same `count`."""
    if count == 0:
        return []
    return runtime.all_reduce(placed(share_values, count, runtime.rank, runtime.world_size))
