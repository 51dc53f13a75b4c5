"""Packing without cross-contamination, length-grouped batches, and exact resume of both.

The packing proof runs the real model (stories260K, fp32, CPU): every document inside a pack has
the logits it has alone (block-diagonal mask + positions restarting at 0), and the negative control
(the same row as one plain causal sequence) does not. The loss terms are the same too: a
document's first label is masked in the pack, as it is never predicted alone.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import qlora
from qlora.data import (
    IGNORE_INDEX,
    BatchIterator,
    EncodedExample,
    Pack,
    collate,
    collate_packed,
    count_tokens,
    grouped_epoch_order,
    load_dataset,
    pack_examples,
)
from qlora.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def model(stories260k_dir):
    return qlora.load_model(stories260k_dir, None, compute_dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def documents(stories260k_dir):
    tok = Tokenizer.from_pretrained(stories260k_dir)
    alpaca, _ = load_dataset(FIXTURES / "good.jsonl", tok)  # instruction examples: source masked
    text, _ = load_dataset(FIXTURES / "formats" / "text_good.jsonl", tok)  # every label set, BOS included
    return alpaca + text  # lengths 105, 151, 101, 14, 8


def _loss_sum(logits, labels):
    # [B, T, V] -> the summed next-token loss over labels shifted by one
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")


def test_packed_logits_equal_each_document_alone(model, documents):
    packs = [Pack((documents[0], documents[3], documents[4])), Pack((documents[2], documents[1]))]
    batch = collate_packed(packs, pad_id=0)
    T = max(len(p) for p in packs)
    assert batch["attention_mask"].shape == (2, 1, T, T) and batch["attention_mask"].dtype == torch.bool
    with torch.no_grad():
        packed = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
        naive = model(batch["input_ids"])  # negative control: one causal sequence per row
    total_alone = 0.0
    for row, pack in enumerate(packs):
        start = 0
        for doc in pack.examples:
            n = len(doc)
            with torch.no_grad():
                alone = model(torch.tensor([doc.input_ids]))[0]
            # Same inputs and positions: SDPA sums in a different order over the longer row, so
            # allow float32 rounding (observed max difference ~1e-6).
            torch.testing.assert_close(packed[row, start : start + n], alone, rtol=1e-5, atol=1e-5)
            if start > 0:
                assert (naive[row, start : start + n] - alone).abs().max() > 1e-2
            total_alone += _loss_sum(alone[None], torch.tensor([doc.labels])).item()
            start += n
    torch.testing.assert_close(_loss_sum(packed, batch["labels"]).item(), total_alone, rtol=1e-5, atol=1e-4)


def test_collate_packed_layout(documents):
    a, b = EncodedExample([5, 6, 7], [IGNORE_INDEX, 6, 7]), EncodedExample([8, 9], [8, 9])
    batch = collate_packed([Pack((a, b)), Pack((b,))], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [8, 9, 0, 0, 0]]
    # the first label of every document is masked: it would be predicted from the previous document
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 9, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, -1, -1, -1]]
    assert count_tokens(batch) == 7 and count_tokens(collate([a, b], pad_id=0)) == 5
    mask = batch["attention_mask"][:, 0].int().tolist()
    assert mask[0] == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    assert mask[1] == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    assert collate_packed([Pack((b,))], pad_id=0, pad_to_multiple_of=4)["input_ids"].shape == (1, 4)


def test_pack_examples_fills_deterministically(documents):
    lengths = [len(d) for d in documents]
    packs = pack_examples(documents, 160, seed=1)
    assert pack_examples(documents, 160, seed=1) == packs
    assert all(len(p) <= 160 for p in packs)
    assert sorted(len(e) for p in packs for e in p.examples) == sorted(lengths)  # each example exactly once
    assert len(packs) == 3  # 379 tokens, best fit: 151+8, 105+14, 101 (or an equivalent 3-pack split)
    with pytest.raises(ValueError, match="more than the pack length 150"):
        pack_examples(documents, 150)


def _toy(n):
    return [EncodedExample([i] * (1 + (i * 7) % 13), [i] * (1 + (i * 7) % 13)) for i in range(n)]


def test_group_by_length_batches_similar_lengths():
    examples = _toy(60)
    lengths = [len(e) for e in examples]
    order = grouped_epoch_order(lengths, 4, seed=3, epoch=0, megabatch_mult=5)
    assert sorted(order) == list(range(60)) and order == grouped_epoch_order(lengths, 4, 3, 0, 5)
    assert order != grouped_epoch_order(lengths, 4, 3, 1, 5)
    batches = [order[i : i + 4] for i in range(0, 60, 4)]
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch comes first
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    shuffled = [list(range(60))[i : i + 4] for i in range(0, 60, 4)]
    assert spread < sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in shuffled) / 2
    it = BatchIterator(examples, 4, pad_id=0, seed=3, group_by_length=True, megabatch_mult=5, epochs=1)
    padded = sum(b["attention_mask"].numel() - b["attention_mask"].sum().item() for b in it)
    plain = BatchIterator(examples, 4, pad_id=0, seed=3, epochs=1)
    assert padded < sum(b["attention_mask"].numel() - b["attention_mask"].sum().item() for b in plain) / 2
    # 58 = 2 megabatches of 20 + one of 18: only the epoch's last batch is partial, whatever moved first.
    sizes = [
        len(b["input_ids"])
        for b in BatchIterator(_toy(58), 4, pad_id=0, group_by_length=True, megabatch_mult=5, epochs=1)
    ]
    assert sizes == [4] * 14 + [2]


@pytest.mark.parametrize("mode", ["packed", "grouped", "packed+grouped"])
@pytest.mark.parametrize("consumed", [0, 3, 7, 11])
def test_resume_with_packing_and_grouping_is_exact(mode, consumed):
    def build():
        items = _toy(57)
        if "packed" in mode:
            items = pack_examples(items, 20, seed=5)  # rebuilt from scratch, as a resumed run does
        return BatchIterator(items, 3, pad_id=0, seed=9, group_by_length="grouped" in mode, megabatch_mult=2)

    reference = build()
    for _ in range(consumed):
        next(reference)
    state = reference.state_dict()
    expected = [next(reference) for _ in range(12)]  # crosses an epoch boundary
    resumed = build()
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert ("position_ids" in expected[0]) == ("packed" in mode)


def test_resume_refuses_other_packing_or_grouping():
    state = BatchIterator(pack_examples(_toy(57), 20, seed=5), 3, pad_id=0, seed=9).state_dict()
    with pytest.raises(ValueError, match="saved num_examples is 21"):  # another pack length: other packs
        BatchIterator(pack_examples(_toy(57), 25, seed=5), 3, pad_id=0, seed=9).load_state_dict(state)
    other = _toy(57)
    other[4] = EncodedExample([4, 4], [4, 4])  # same count, one length changed
    with pytest.raises(ValueError, match="saved lengths_digest"):
        BatchIterator(other, 3, pad_id=0, seed=9).load_state_dict(
            BatchIterator(_toy(57), 3, pad_id=0, seed=9).state_dict()
        )
    grouped = BatchIterator(_toy(57), 3, pad_id=0, seed=9, group_by_length=True).state_dict()
    with pytest.raises(ValueError, match="saved group_by_length is True"):
        BatchIterator(_toy(57), 3, pad_id=0, seed=9).load_state_dict(grouped)
    # A state saved before grouping/packing existed (no such keys) still loads into a plain iterator.
    old = {
        k: v for k, v in grouped.items() if k not in ("group_by_length", "megabatch_mult", "packed", "lengths_digest")
    }
    plain = BatchIterator(_toy(57), 3, pad_id=0, seed=9)
    plain.load_state_dict(old)
    assert torch.equal(next(plain)["input_ids"], collate([_toy(57)[i] for i in plain._order[1][:3]], 0)["input_ids"])
