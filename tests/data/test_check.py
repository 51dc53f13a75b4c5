"""`qlora data check`: statistics that are exactly right on a small file, and a failing exit status
(with file and line) for every kind of unfit data."""

from pathlib import Path

import pytest

from qlora.data import IGNORE_INDEX, EncodedExample, check_file, load_dataset
from qlora.data.check import example_problems, main
from qlora.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def test_statistics_are_exact(smollm2):
    path = FIXTURES / "io_duplicate.jsonl"
    report = check_file(path, smollm2)
    examples, _ = load_dataset(path, smollm2)
    assert report.ok and report.format == "input-output"
    assert (report.records, report.examples, report.duplicates, report.truncated) == (3, 3, 1, 0)
    assert report.tokens == sum(len(e) for e in examples)
    assert report.target_tokens == sum(1 for e in examples for label in e.labels if label != IGNORE_INDEX)
    assert report.target_tokens == 3 + 3 + 3  # "Blue." + EOS, "Hi!" + EOS, "Blue." + EOS (SmolLM2 ids)
    assert report.target_fraction == pytest.approx(report.target_tokens / report.tokens)
    truncated = check_file(path, smollm2, max_source_len=2, max_target_len=2)
    # every target loses text tokens but keeps its EOS, so the file is still fit to train on
    assert truncated.ok and truncated.truncated == 3 and truncated.target_tokens == 3 * 2
    assert "OK" in report.render() and "1 duplicates" in report.render()


def test_chat_file_checks_clean(smollm2):
    report = check_file(FIXTURES / "chat_good.jsonl", smollm2)
    assert report.ok and report.format == "chat" and report.target_tokens == 6 + 3


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("io_blank_output.jsonl", "io_blank_output.jsonl:1: field 'output' must be a non-empty string"),
        ("bad_utf8.csv", "bad_utf8.csv:2: invalid UTF-8"),
        ("wrong_header.csv", "wrong_header.csv:1: the header's columns"),
        ("oasst_orphan.jsonl", "oasst_orphan.jsonl:3: parent_id 'zz'"),
        ("chat_not_list.jsonl", "chat_not_list.jsonl:1: field 'messages'"),
    ],
)
def test_malformed_files_fail_with_location(smollm2, name, words):
    report = check_file(FIXTURES / name, smollm2)
    assert not report.ok and len(report.problems) == 1 and words in report.problems[0]
    assert "FAILED" in report.render()


def test_unrenderable_template_fails(stories260k_dir):
    stories = Tokenizer.from_pretrained(stories260k_dir)  # no chat template
    report = check_file(FIXTURES / "chat_good.jsonl", stories)
    assert not report.ok and "chat_good.jsonl:1: the chat template" in report.problems[0]
    assert "cannot render" in report.problems[0]


def test_example_audit_rules():
    eos = 2
    good = EncodedExample([1, 5, 6, 2], [IGNORE_INDEX, IGNORE_INDEX, 6, 2])
    assert example_problems(good, eos, needs_eos=True) == []
    all_masked = EncodedExample([1, 5, 2], [IGNORE_INDEX] * 3)
    assert any("all labels are masked" in p for p in example_problems(all_masked, eos, needs_eos=True))
    masked_eos = EncodedExample([1, 5, 6, 2], [IGNORE_INDEX, IGNORE_INDEX, 6, IGNORE_INDEX])
    problems = example_problems(masked_eos, eos, needs_eos=True)
    assert any("EOS at position 3 ends a trained span but is masked" in p for p in problems)
    assert any("no trained EOS" in p for p in problems)
    no_eos = EncodedExample([1, 5, 6], [IGNORE_INDEX, 5, 6])
    assert example_problems(no_eos, eos, needs_eos=False) == []  # a plain-text block may end anywhere
    assert example_problems(no_eos, eos, needs_eos=True) == ["no trained EOS: the model would not learn to stop"]
    # A masked EOS that ends a *masked* turn (a user turn in chat) is fine.
    user_turn = EncodedExample([1, 5, 2, 7, 2], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7, 2])
    assert example_problems(user_turn, eos, needs_eos=True) == []


def test_main_exit_status(smollm2_gguf, capsys):
    assert main([str(FIXTURES / "io_good.jsonl"), "--model", str(smollm2_gguf)]) == 0
    assert "format input-output, 2 records -> 2 examples" in capsys.readouterr().out
    argv = [str(FIXTURES / "oasst_bad_rank.jsonl"), "--model", str(smollm2_gguf), "--format", "oasst1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "oasst_bad_rank.jsonl:2: field 'rank' must be an integer or null" in err and "FAILED" in err
    assert main([str(FIXTURES / "oasst_messages.jsonl"), "--model", str(smollm2_gguf), "--lang", "de"]) == 0
    assert "11 records -> 1 examples" in capsys.readouterr().out
    assert main([str(FIXTURES / "io_good.jsonl"), "--model", "/no/such/model"]) == 2
    with pytest.raises(SystemExit):
        main([str(FIXTURES / "io_good.jsonl")])  # --model is required
