"""MMLU: the data readers, the prompt format, and a scorer proven on a model whose answers are known.

The oracle model below puts a high logit on the right letter only at each prompt's last position
(the answer position), on a wrong letter one position earlier, and on another wrong letter on every
position after it (padding). So a scorer that reads any neighbouring position scores 0, not 100%.
"""

import pytest
import torch
from torch import nn

from qlora.eval.mmlu import evaluate_mmlu, score_predictions
from qlora.eval.mmlu_data import (
    LETTERS,
    MMLUDataError,
    MMLUExample,
    examples_from_csv,
    examples_from_qlora_json,
    load_examples,
    subject_header,
)
from qlora.eval.scoring import candidate_ids, encode_prompts
from qlora.tokenizer import Tokenizer


class AnswerOracle(nn.Module):
    """Logits [B, T, V]: +10 on the right letter at the answer position, wrong letters elsewhere."""

    def __init__(self, answers_by_ids: dict[tuple[int, ...], int], letter_ids: list[int], vocab: int):
        super().__init__()
        self.answers, self.letters, self.vocab = answers_by_ids, letter_ids, vocab
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the scorer a device

    def forward(self, ids, attention_mask):
        B, T = ids.shape
        logits = torch.zeros(B, T, self.vocab)
        for row in range(B):
            n = int(attention_mask[row].sum())
            assert bool(attention_mask[row, :n].all()), "expected right padding"
            answer = self.answers[tuple(ids[row, :n].tolist())]
            logits[row, n - 1, self.letters[answer]] = 10.0
            if n >= 2:
                logits[row, n - 2, self.letters[(answer + 1) % 4]] = 10.0
            logits[row, n:, self.letters[(answer + 2) % 4]] = 10.0
        return logits


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    """SmolLM2's byte-level BPE: A-D are single tokens (stories260K's 512 pieces split "A" as "▁" "A")."""
    return Tokenizer.from_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def mmlu_csv(shared_dir):
    return shared_dir / "data/mmlu/cais-mmlu-csv"


@pytest.fixture(scope="module")
def qlora_json(shared_dir):
    return shared_dir / "data/mmlu/qlora/zero_shot_mmlu_val.json"


def oracle_for(examples, tokenizer, max_length=2048):
    letters = candidate_ids(tokenizer, LETTERS)
    ids = encode_prompts(tokenizer, [e.prompt for e in examples])
    answers = {tuple(i[-max_length:]): e.answer for i, e in zip(ids, examples, strict=True)}
    assert len(answers) == len(examples), "prompts must be distinct for the oracle to tell them apart"
    return AnswerOracle(answers, letters, tokenizer.vocab_size), ids, letters


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_oracle_answers_are_read_at_the_answer_position(mmlu_csv, tokenizer, batch_size):
    examples = examples_from_csv(mmlu_csv, shots=1, subjects=["anatomy", "virology"])[::9]  # varied lengths
    oracle, ids, letters = oracle_for(examples, tokenizer)
    result = evaluate_mmlu(oracle, tokenizer, examples, batch_size=batch_size)
    assert result.micro_accuracy == 1.0 and result.accuracy == 1.0
    assert result.predictions == [e.answer for e in examples]
    # negative control: the oracle does punish a reader one position off, on either side
    with torch.no_grad():
        for i, e in zip(ids, examples, strict=True):
            mask = torch.ones(1, len(i) + 1, dtype=torch.long)
            mask[0, -1] = 0
            logits = oracle(torch.tensor([i + [0]]), mask)[0][:, letters]
            assert int(logits[len(i) - 2].argmax()) != e.answer and int(logits[len(i)].argmax()) != e.answer


def test_lm_head_on_answer_positions_only_equals_the_full_forward(stories260k_dir):
    """The fast path (hidden states -> lm_head at the answer positions) == indexing full logits."""
    import qlora
    from qlora.eval.scoring import last_position_logits

    model = qlora.load_model(stories260k_dir, "nf4", compute_dtype=torch.float32, device="cpu")

    class WholeForwardOnly(nn.Module):  # hides hidden_states/lm_head: the generic path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, attention_mask):
            return self.inner(ids, attention_mask=attention_mask)

    prompts = [[1, 5, 9, 30, 7], [1, 44], [1, 3, 3, 3, 3, 3, 3, 100], [1, 8, 200]]
    fast = last_position_logits(model, prompts, [5, 17, 300], batch_size=3)
    slow = last_position_logits(WholeForwardOnly(model), prompts, [5, 17, 300], batch_size=3)
    torch.testing.assert_close(fast, slow)
    with torch.no_grad():  # and both equal the unpadded single-prompt forward
        torch.testing.assert_close(fast[2], model(torch.tensor([prompts[2]]))[0, -1, [5, 17, 300]])


def test_truncated_prompts_keep_their_answer_position(mmlu_csv, tokenizer):
    examples = examples_from_csv(mmlu_csv, shots=5, subjects=["high_school_us_history"])[:4]
    oracle, ids, _ = oracle_for(examples, tokenizer, max_length=300)
    assert all(len(i) > 300 for i in ids)
    result = evaluate_mmlu(oracle, tokenizer, examples, batch_size=2, max_length=300)
    assert result.micro_accuracy == 1.0


def test_letter_ids_are_the_first_token_of_each_letter_alone(tokenizer, stories260k_dir):
    ids = candidate_ids(tokenizer, LETTERS)
    assert [tokenizer.id_to_token(i) for i in ids] == ["A", "B", "C", "D"]  # QLoRA: tokenizer("A")[0]
    spaced = candidate_ids(tokenizer, LETTERS, prefix=" ")
    assert [tokenizer.decode([i]) for i in spaced] == [" A", " B", " C", " D"] and spaced != ids
    with pytest.raises(ValueError, match="cannot tell them apart"):
        candidate_ids(Tokenizer.from_pretrained(stories260k_dir), LETTERS)


def test_accuracy_is_the_unweighted_mean_over_subjects():
    examples = [MMLUExample("a", "p0", 0)] + [MMLUExample("b", f"p{i}", 1) for i in range(1, 4)]
    result = score_predictions(examples, [0, 2, 2, 2])
    assert result.per_subject == {"a": 1.0, "b": 0.0}
    assert result.accuracy == 0.5 and result.micro_accuracy == 0.25


def test_qlora_json_reads_and_our_header_is_theirs(qlora_json):
    examples = examples_from_qlora_json(qlora_json)
    assert len(examples) == 1531 and len({e.subject for e in examples}) == 57
    for e in examples:
        assert e.prompt.startswith(subject_header(e.subject)) and e.prompt.endswith("\nD. " + e.prompt.split(
            "\nD. ")[-1]) and e.prompt.endswith("Answer:")  # fmt: skip
    assert {e.answer for e in examples} == {0, 1, 2, 3}


def test_csv_prompts_zero_and_five_shot(mmlu_csv):
    (first, *_) = examples_from_csv(mmlu_csv, shots=0, subjects=["anatomy"])
    assert first.prompt == (
        "The following are multiple choice questions (with answers) about  anatomy.\n\n"
        "A lesion causing compression of the facial nerve at the stylomastoid foramen will cause ipsilateral\n"
        "A. paralysis of the facial muscles.\nB. paralysis of the facial muscles and loss of taste.\n"
        "C. paralysis of the facial muscles, loss of taste and lacrimation.\n"
        "D. paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.\nAnswer:"
    )
    assert first.answer == 0
    five = examples_from_csv(mmlu_csv, shots=5, subjects=["anatomy"])
    assert len(five) == 135
    p = five[0].prompt
    assert p.count("\nAnswer: ") == 5 and p.endswith(first.prompt[len(subject_header("anatomy")) :])
    dev_first = "What is the embryological origin of the hyoid bone?\nA. The first pharyngeal arch"
    assert p.index(dev_first) == len(subject_header("anatomy"))  # dev examples in file order, right after the header
    assert "\nAnswer: D\n\n" in p  # the dev answer index 3 written as its letter


def test_bad_files_are_named_with_their_line(tmp_path):
    d = tmp_path / "mmlu"
    (d / "test").mkdir(parents=True)
    (d / "test" / "x_test.csv").write_text("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,7\n")
    with pytest.raises(MMLUDataError, match=r"x_test.csv:2: answer '7'"):
        examples_from_csv(d, shots=0)
    (d / "test" / "x_test.csv").write_text("q,a,b,c,d,A\n")  # headerless, letter answers: accepted
    assert examples_from_csv(d, shots=0)[0].answer == 0
    with pytest.raises(MMLUDataError, match="no \\*_dev.csv"):
        examples_from_csv(d, shots=5)
    j = tmp_path / "mmlu.json"
    j.write_text('{"subject": "s", "input": "q", "output": "A"}\n{"subject": "s", "input": "q"}\n')
    with pytest.raises(MMLUDataError, match=r"mmlu.json:2: record lacks \['output'\]"):
        examples_from_qlora_json(j)
    with pytest.raises(MMLUDataError, match="not found"):
        load_examples(tmp_path / "nope")


def test_limit_keeps_the_first_questions_of_each_subject(mmlu_csv):
    full = load_examples(mmlu_csv, shots=0, subjects=["anatomy", "virology"])
    limited = load_examples(mmlu_csv, shots=0, subjects=["anatomy", "virology"], limit_per_subject=3)
    assert limited == [e for e in full if e.subject == "anatomy"][:3] + [e for e in full if e.subject == "virology"][:3]


@pytest.mark.slow
def test_nf4_smollm2_scores_qlora_json_and_csv(smollm2_gguf, qlora_json, mmlu_csv, tokenizer):
    import qlora

    model = qlora.load_model(smollm2_gguf, "nf4", compute_dtype=torch.float32, device="cpu")
    subjects = ["abstract_algebra", "college_physics"]
    zs = evaluate_mmlu(model, tokenizer, load_examples(qlora_json, subjects=subjects))
    assert set(zs.per_subject) == set(subjects) and zs.questions == 11 + 11
    fs = evaluate_mmlu(model, tokenizer, load_examples(mmlu_csv, shots=5, subjects=subjects)[:16], batch_size=4)
    assert 0.0 <= fs.accuracy <= 1.0 and fs.questions == 16
