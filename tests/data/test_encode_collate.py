"""Encoding (QLoRA collator semantics), padding, the resumable batch order and the held-out split.

The pinned ids below were computed once with transformers 5.23.0's own tokenizers:

    tok = AutoTokenizer.from_pretrained(<stories260K dir>)          # or (..., gguf_file=<SmolLM2>)
    source, target = format_alpaca(record)
    SRC = [tok.bos_token_id] + tok.encode(source, add_special_tokens=False)
    TGT = tok.encode(target, add_special_tokens=False) + [tok.eos_token_id]

and the mask boundary checked by hand: the last source ids decode to "### Response: " (stories260K
ends on 410 "▁", SmolLM2 on 216 "Ġ", the prompt's trailing space), the first target id starts the
output ("Blue" = 23390 in SmolLM2; "▁B" = 368 in stories260K; "▁" 410 + "5" 480), and the last is EOS.
"""

import logging
from pathlib import Path

import pytest
import torch

from qlora.data import (
    IGNORE_INDEX,
    BatchIterator,
    DataError,
    EncodedExample,
    InstructionDataset,
    collate,
    encode_example,
    epoch_order,
    format_alpaca,
    split_holdout,
)
from qlora.tokenizer import Tokenizer

NO_INPUT = {"instruction": "Name a color.", "input": "", "output": "Blue."}
WITH_INPUT = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}

# fmt: off
# Shared by both stories260K prompts: BOS + "Below is an instruction that describes a task"
_ST_HEAD = [1, 368, 411, 421, 327, 410, 293, 261, 416, 322, 356, 420, 425, 429, 413, 417, 289, 351, 279, 406,
            429, 325, 430, 406, 261, 259, 412, 419, 433]
_ST_TAIL = [13, 13, 38, 38, 38, 410, 461, 406, 427, 289, 372, 467, 410]  # "\n\n### Response: "
PINNED = {
    ("stories260K", "no_input"): (
        _ST_HEAD + [426, 410, 448, 420, 275, 411, 261, 410, 276, 419, 427, 289, 372, 351, 261, 339, 420, 414, 427,
                    325, 294, 411, 421, 422, 280, 287, 427, 305, 413, 406, 265, 410, 276, 456, 425, 411, 356, 426,
                    13, 13, 38, 38, 38, 359, 416, 356, 420, 425, 429, 413, 417, 289, 467, 13, 458, 314, 411, 261,
                    280, 414, 421, 304, 426] + _ST_TAIL,
        [368, 421, 425, 411, 426, 2],
    ),
    ("stories260K", "with_input"): (
        _ST_HEAD + [432, 282, 412, 315, 266, 335, 261, 416, 322, 427, 323, 351, 282, 420, 414, 435, 292, 406, 272,
                    425, 420, 413, 386, 280, 289, 413, 411, 444, 413, 426, 410, 448, 420, 275, 411, 261, 410, 276,
                    419, 427, 289, 372, 351, 261, 339, 420, 414, 427, 325, 294, 411, 421, 422, 280, 287, 427, 305,
                    413, 406, 265, 410, 276, 456, 425, 411, 356, 426, 13, 13, 38, 38, 38, 359, 416, 356, 420, 425,
                    429, 413, 417, 289, 467, 13, 447, 418, 418, 265, 297, 425, 423, 430, 285, 419, 426, 13, 13, 38,
                    38, 38, 359, 416, 427, 323, 467, 13, 479, 269, 410, 472] + _ST_TAIL,
        [410, 480, 2],
    ),
    ("smollm2", "no_input"): (
        [1, 19798, 314, 354, 5785, 338, 6601, 253, 3856, 30, 9517, 253, 2426, 338, 13674, 32873, 260, 3116, 30,
         198, 198, 3757, 20880, 42, 198, 5820, 253, 2380, 30, 198, 198, 3757, 14212, 42, 216],
        [23390, 30, 2],
    ),
    ("smollm2", "with_input"): (
        [1, 19798, 314, 354, 5785, 338, 6601, 253, 3856, 28, 20054, 351, 354, 3007, 338, 2433, 2030, 2468, 30,
         9517, 253, 2426, 338, 13674, 32873, 260, 3116, 30, 198, 198, 3757, 20880, 42, 198, 7684, 260, 2966, 30,
         198, 198, 3757, 18100, 42, 198, 34, 284, 216, 35, 198, 198, 3757, 14212, 42, 216],
        [37, 2],
    ),
}
# fmt: on
RECORDS = {"no_input": NO_INPUT, "with_input": WITH_INPUT}


@pytest.mark.parametrize(("model", "kind"), list(PINNED), ids=[f"{m}-{k}" for m, k in PINNED])
def test_pinned_ids_and_label_mask(request, model, kind):
    tok = request.getfixturevalue("stories" if model == "stories260K" else "smollm2")
    src, tgt = PINNED[(model, kind)]
    example = encode_example(tok, *format_alpaca(RECORDS[kind]))
    assert example.input_ids == src + tgt
    assert example.labels == [IGNORE_INDEX] * len(src) + tgt
    assert not example.truncated
    # The boundary: the last source position is masked, the first target position is not.
    boundary = len(src)
    assert example.labels[boundary - 1] == IGNORE_INDEX and example.labels[boundary] == tgt[0] != IGNORE_INDEX
    assert tok.decode(tgt).strip() == RECORDS[kind]["output"]
    assert tok.decode(src).endswith("### Response: ")
    # EOS present, last, and trained on.
    assert example.input_ids[-1] == example.labels[-1] == tok.eos_id


def test_train_on_source_labels_everything(stories):
    example = encode_example(stories, *format_alpaca(NO_INPUT), train_on_source=True)
    assert example.labels == example.input_ids
    assert IGNORE_INDEX not in example.labels


def test_truncation_keeps_eos_and_counts_inside_the_maximum(smollm2):
    source, _ = format_alpaca(NO_INPUT)
    long_target = "one two three four five six seven"
    text_ids = smollm2.encode(long_target)
    assert len(text_ids) == 7
    example = encode_example(smollm2, source, long_target, max_source_len=10, max_target_len=4)
    assert example.truncated
    assert example.input_ids == [smollm2.bos_id] + smollm2.encode(source)[:9] + text_ids[:3] + [smollm2.eos_id]
    assert example.labels == [IGNORE_INDEX] * 10 + text_ids[:3] + [smollm2.eos_id]
    # Exactly at the limits (7 text ids + EOS = 8; BOS + source) nothing is truncated.
    n_source = 1 + len(smollm2.encode(source))
    exact = encode_example(smollm2, source, long_target, max_source_len=n_source, max_target_len=8)
    assert not exact.truncated and exact.input_ids[-8:] == text_ids + [smollm2.eos_id]
    one_less = encode_example(smollm2, source, long_target, max_source_len=n_source, max_target_len=7)
    assert one_less.truncated and one_less.input_ids[-1] == smollm2.eos_id


def test_empty_target_is_an_error_never_all_masked(stories):
    with pytest.raises(DataError, match="target encodes to no tokens"):
        encode_example(stories, "prompt", "")
    with pytest.raises(ValueError, match="max_target_len must be at least 2"):
        encode_example(stories, "prompt", "x", max_target_len=1)


def test_tokenizer_without_eos_is_refused(stories):
    from tokenizers import Tokenizer as Backend

    no_eos = Tokenizer(Backend.from_str(stories._backend.to_str()), special_tokens={"bos": "<s>"}, source="t")
    with pytest.raises(ValueError, match="no EOS token"):
        encode_example(no_eos, "a", "b")


def test_collate_pad_equal_to_eos_keeps_the_eos_attended(smollm2):
    assert smollm2.pad_id == smollm2.eos_id  # SmolLM2 ships pad = eos = <|im_end|>
    long = encode_example(smollm2, *format_alpaca(WITH_INPUT))
    short = encode_example(smollm2, *format_alpaca(NO_INPUT))
    batch = collate([short, long], smollm2.pad_id)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(t.dtype == torch.long and t.shape == (2, len(long)) for t in batch.values())
    n = len(short)
    assert batch["input_ids"][0, :n].tolist() == short.input_ids
    assert batch["input_ids"][0, n:].eq(smollm2.pad_id).all()
    assert batch["labels"][0, :n].tolist() == short.labels
    assert batch["labels"][0, n:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long) - n)
    assert batch["attention_mask"][1].eq(1).all()
    # Negative control: QLoRA's `input_ids != pad_id` would hide every EOS from attention.
    naive = batch["input_ids"] != smollm2.pad_id
    assert not naive[1, -1] and not naive[0, n - 1]


def test_collate_pads_to_a_multiple():
    examples = [EncodedExample([5, 6, 7], [IGNORE_INDEX, 6, 7]), EncodedExample([8], [8])]
    batch = collate(examples, pad_id=0, pad_to_multiple_of=8)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [8, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist()[1] == [8] + [IGNORE_INDEX] * 7
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 1]
    with pytest.raises(ValueError, match="pad_id must be an int"):
        collate(examples, pad_id=None)


def _toy_examples(n):
    return [EncodedExample([i] * (1 + i % 5), [i] * (1 + i % 5)) for i in range(n)]


def _ids(batch):
    return batch["input_ids"][:, 0].tolist()  # each toy example is identified by its first id


def test_batch_order_is_seeded_and_covers_each_epoch_once():
    examples = _toy_examples(23)
    a = BatchIterator(examples, 4, pad_id=0, seed=3, epochs=2)
    b = BatchIterator(examples, 4, pad_id=0, seed=3, epochs=2)
    first = [_ids(x) for x in a]
    assert first == [_ids(x) for x in b]
    assert len(first) == 2 * 6 and len(first[5]) == 3  # 23 = 5 * 4 + 3, last batch partial
    epoch0 = sorted(i for batch in first[:6] for i in batch)
    assert epoch0 == list(range(23))
    assert first[:6] != first[6:]  # each epoch is a fresh permutation
    other_seed = [_ids(x) for x in BatchIterator(examples, 4, pad_id=0, seed=4, epochs=2)]
    assert other_seed != first
    assert epoch_order(23, 3, 0, shuffle=False) == list(range(23))


@pytest.mark.parametrize("consumed", [0, 2, 5, 6, 7, 13])
def test_batch_iterator_resumes_exactly(consumed):
    examples = _toy_examples(23)
    reference = BatchIterator(examples, 4, pad_id=0, seed=11)
    for _ in range(consumed):
        next(reference)
    state = reference.state_dict()
    expected = [next(reference) for _ in range(9)]

    resumed = BatchIterator(examples, 4, pad_id=0, seed=11)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert resumed.state_dict() == reference.state_dict()


def test_batch_iterator_refuses_a_state_from_other_data():
    state = BatchIterator(_toy_examples(23), 4, pad_id=0, seed=11).state_dict()
    with pytest.raises(ValueError, match="saved num_examples is 23"):
        BatchIterator(_toy_examples(22), 4, pad_id=0, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="saved seed is 11"):
        BatchIterator(_toy_examples(23), 4, pad_id=0, seed=12).load_state_dict(state)
    with pytest.raises(ValueError, match="make no batch"):
        BatchIterator(_toy_examples(3), 4, pad_id=0, drop_last=True)


def test_split_holdout_is_deterministic_disjoint_and_ordered():
    items = list(range(100))
    train, held = split_holdout(items, 10, seed=42)
    assert len(held) == 10 and len(train) == 90
    assert sorted(train + held) == items and not set(train) & set(held)
    assert train == sorted(train) and held == sorted(held)
    assert split_holdout(items, 10, seed=42) == (train, held)
    assert split_holdout(items, 10, seed=7)[1] != held
    assert len(split_holdout(items, 0.05, seed=42)[1]) == 5
    assert len(split_holdout(items, 0.001, seed=42)[1]) == 1  # a fraction rounds up
    for bad in (0, 100, 1.0, 0.0):
        with pytest.raises(ValueError, match="hold out|fraction"):
            split_holdout(items, bad)


def test_dataset_from_file_counts_truncation_and_locates_errors(stories, tmp_path, caplog):
    fixtures = Path(__file__).parent / "fixtures"
    dataset = InstructionDataset.from_file(fixtures / "good.jsonl", stories)
    assert len(dataset) == 3 and dataset.num_truncated == 0 and dataset.lines == [1, 3, 4]
    assert dataset[0] == encode_example(stories, *format_alpaca(NO_INPUT))

    with caplog.at_level(logging.WARNING, logger="qlora.data.encode"):
        short = InstructionDataset.from_file(fixtures / "good.json", stories, max_source_len=100, max_target_len=4)
    # stories260K source lengths (BOS included) are 105, 151, 101: all three exceed 100.
    assert [e.truncated for e in short] == [True, True, True]
    assert "3 of 3 examples truncated" in caplog.text
    # Targets: "Blue." is 5 text ids, cut to 3 + EOS; "5" (2) and "Hi!" (3) fit whole.
    assert [len(e) for e in short] == [100 + 4, 100 + 3, 100 + 4]
    fits = InstructionDataset.from_file(fixtures / "good.json", stories, max_source_len=151, max_target_len=6)
    assert fits.num_truncated == 0
    assert InstructionDataset.from_file(fixtures / "good.json", stories, max_source_len=150).num_truncated == 1
    assert all(e.input_ids[-1] == e.labels[-1] == stories.eos_id for e in short)

    with pytest.raises(DataError) as caught:
        InstructionDataset.from_file(fixtures / "blank_output.json", stories)
    assert (caught.value.line, caught.value.index) == (4, 2)


def test_shared_alpaca_sample_encodes(stories, shared_dir):
    dataset = InstructionDataset.from_file(shared_dir / "data" / "instruct" / "alpaca_en_demo.json", stories)
    assert len(dataset) == 999
    assert dataset.num_truncated == sum(e.truncated for e in dataset) > 0
    for example in dataset:
        assert example.input_ids[-1] == stories.eos_id == example.labels[-1]
        assert len(example) <= 384 + 128 and example.labels[0] == IGNORE_INDEX
