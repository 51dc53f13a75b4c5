"""`qlora data check`: statistics that are exactly right on a small file, and a failing exit status
(with file and line) for every kind of unfit data."""

from pathlib import Path

import pytest

from qlora.cli import main as qlora_main
from qlora.data import IGNORE_INDEX, EncodedExample, check_file, load_dataset
from qlora.data.check import example_problems
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


def main(argv):
    return qlora_main(["data", "check", *argv])


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
    assert "cannot load the tokenizer of /no/such/model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main([str(FIXTURES / "io_good.jsonl")])
    assert done.value.code == 2 and "--model / model is required" in capsys.readouterr().err


def test_every_spelling_reaches_the_check(stories260k_dir, tmp_path, capsys):
    """The first parser's flags (FILE, --lang once per language, --format, --max-*-len, --train-on-source) and
    train's own (`--data`, `--data.*`, `--config FILE`) all reach `check_file`."""
    model, oasst = str(stories260k_dir), str(FIXTURES / "oasst_messages.jsonl")
    # --lang before FILE takes one value; both languages are kept (each alone keeps one conversation)
    assert main(["--lang", "de", oasst, "--model", model, "--lang", "en"]) == 0
    assert "11 records -> 2 examples" in capsys.readouterr().out
    assert main(["--data", oasst, "--model", model, "--data.languages", "en"]) == 0
    assert "11 records -> 1 examples" in capsys.readouterr().out
    io = str(FIXTURES / "io_duplicate.jsonl")
    short = ["--format", "input-output", "--max-source-len", "2", "--max-target-len", "2"]
    assert main([io, "--model", model, *short]) == 0
    assert "3 truncated" in capsys.readouterr().out
    assert main([io, "--model", model]) == 0
    assert "0 truncated" in capsys.readouterr().out
    trained = {}
    for flag in ("--train-on-source", "--no-train-on-source"):
        assert main([io, "--model", model, flag]) == 0
        trained[flag] = capsys.readouterr().out.split("tokens (")[1].split("%")[0]
    assert float(trained["--train-on-source"]) == 100.0 > float(trained["--no-train-on-source"])
    story = str(FIXTURES / "story.txt")  # plain text: 12 tokens, one block unless data.block_size says otherwise
    assert main([story, "--model", model, "--data.block_size", "8"]) == 0
    assert "1 records -> 2 examples" in capsys.readouterr().out
    config = tmp_path / "check.yaml"  # a config file, with the flags winning over it
    config.write_text(f"model: {model}\ndata:\n  path: {io}\n  max_source_len: 2\n  max_target_len: 2\n")
    assert main(["--config", str(config)]) == 0
    assert "3 truncated" in capsys.readouterr().out
    assert main(["--config", str(config), "--max-source-len", "384", "--max-target-len", "128"]) == 0
    assert "0 truncated" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["a.jsonl", "--data", "b.jsonl", "--model", "m"], "data.path is given twice, as FILE and as --data"),
        (["--model", "m"], "--data / data.path is required"),
        (["a.jsonl", "--model", "m", "--data.eval_fraction", "0"], "unrecognized arguments: --data.eval_fraction"),
        (["a.jsonl", "--model", "m", "--max-source-len", "0"], "data.max_source_len must be a positive integer, got 0"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2 and message in capsys.readouterr().err


def test_unknown_format_and_strict_config_file(stories260k_dir, tmp_path, capsys):
    io = str(FIXTURES / "io_good.jsonl")
    assert main([io, "--model", str(stories260k_dir), "--format", "alpacca"]) == 2
    assert "unknown data format 'alpacca'; use auto or one of alpaca" in capsys.readouterr().err
    config = tmp_path / "check.yaml"
    config.write_text(f"model: {stories260k_dir}\ndata:\n  path: {io}\n  pack_len: 64\n")  # not a check setting
    with pytest.raises(SystemExit) as done:
        main(["--config", str(config)])
    assert done.value.code == 2 and "check.yaml: unknown key 'data.pack_len'" in capsys.readouterr().err
