"""`BatchIterator.next_step`: the ranks of a job share one global order of micro-batches, so each example is
used exactly once per epoch across them, length grouping and packing keep working, and the saved position
is the same on every rank and at every world size."""

import pytest

from qlora.data.collate import BatchIterator
from qlora.data.encode import IGNORE_INDEX, EncodedExample
from qlora.data.packing import pack_examples


def examples(n):  # example i holds token i + 1 (ids stay clear of the pad id 0), 1-7 tokens long
    return [EncodedExample([i + 1] * (1 + i % 7), [IGNORE_INDEX] + [i + 1] * (i % 7)) for i in range(n)]


def seen(batch):
    """The example ids in a collated batch (pads are 0)."""
    return {int(t) - 1 for t in batch["input_ids"].flatten() if t != 0}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("group_by_length", [False, True])
def test_each_example_once_per_epoch_across_ranks(world, group_by_length):
    n, micro, accum = 48, 2, 2  # 24 micro-batches per epoch = 24 / (accum x world) steps when it divides
    per_step = accum * world
    ranks = [BatchIterator(examples(n), micro, pad_id=0, seed=3, group_by_length=group_by_length)
             for _ in range(world)]  # fmt: skip
    used = []
    for _ in range(24 // per_step):
        for rank, it in enumerate(ranks):
            for batch in it.next_step(per_step, rank, world):
                used.extend(seen(batch))
    assert sorted(used) == list(range(n))
    assert len({str(it.state_dict()) for it in ranks}) == 1  # the same position on every rank


def test_the_ranks_split_what_one_process_takes():
    """Rank r of N gets micro-batches r, r + N, ... of the single-process order: the same examples per step."""
    one = BatchIterator(examples(30), 2, pad_id=0, seed=1)
    two = [BatchIterator(examples(30), 2, pad_id=0, seed=1) for _ in range(2)]
    for _ in range(5):
        whole = [seen(b) for b in one.next_step(4)]
        parts = [[seen(b) for b in it.next_step(4, rank, 2)] for rank, it in enumerate(two)]
        assert parts[0] == whole[0::2] and parts[1] == whole[1::2]
    assert one.state_dict() == two[0].state_dict()


def test_a_position_saved_on_two_ranks_resumes_on_three():
    two = [BatchIterator(examples(36), 2, pad_id=0, seed=5) for _ in range(2)]
    for _ in range(3):
        for rank, it in enumerate(two):
            it.next_step(6, rank, 2)
    state = two[0].state_dict()
    straight = BatchIterator(examples(36), 2, pad_id=0, seed=5)
    straight.next_step(18)
    expected = [seen(b) for b in straight.next_step(6)]
    three = [BatchIterator(examples(36), 2, pad_id=0, seed=5) for _ in range(3)]
    got = []
    for rank, it in enumerate(three):
        it.load_state_dict(state)
        got.append([seen(b) for b in it.next_step(6, rank, 3)])
    assert [got[j % 3][j // 3] for j in range(6)] == expected


def test_packed_items_shard_too():
    packs = pack_examples(examples(40), 14, seed=0)
    assert len(packs) % 2 == 0  # one epoch is whole steps of 2
    world = 2
    ranks = [BatchIterator(packs, 1, pad_id=0, seed=0) for _ in range(world)]
    used = []
    for _ in range(len(packs) // world):
        for rank, it in enumerate(ranks):
            for batch in it.next_step(world, rank, world):
                assert "document_ids" in batch
                used.extend(seen(batch))
    assert sorted(used) == list(range(40))


def test_uneven_share_is_refused():
    with pytest.raises(ValueError, match="shared evenly"):
        BatchIterator(examples(8), 2, pad_id=0).next_step(3, 0, 2)
