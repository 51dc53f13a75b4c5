"""Alpaca records: QLoRA's prompt templates byte for byte, strict reading, located errors.

Every malformed fixture in `fixtures/` must raise `DataError` naming the file, the line (and the
array index for `.json`), the field, and a fix; the good fixtures must load to exactly the records
they hold (a reader that rejected everything would fail those).
"""

from pathlib import Path

import pytest

from qlora.data import (
    FORMATS,
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    DataError,
    detect_format,
    format_alpaca,
    load_records,
    read_records,
)

FIXTURES = Path(__file__).parent / "fixtures"

# format-spec 5.3, written out again here so that a typo in the module cannot pass.
SPEC_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response: "
)
SPEC_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nName a color.\n\n### Response: "
)


def test_templates_match_the_qlora_script_exactly():
    source, target = format_alpaca({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})
    assert (source, target) == (SPEC_WITH_INPUT, "5")
    source, target = format_alpaca({"instruction": "Name a color.", "input": "", "output": "Blue."})
    assert (source, target) == (SPEC_NO_INPUT, "Blue.")
    assert source.endswith("### Response: ")  # the trailing space is part of the format
    # No input key at all is the no-input template too.
    assert format_alpaca({"instruction": "Name a color.", "output": "Blue."})[0] == SPEC_NO_INPUT


def test_template_choice_follows_qlora_and_values_are_not_reformatted():
    # QLoRA tests `input != ""`: a lone space selects the with-input template.
    assert format_alpaca({"instruction": "x", "input": " ", "output": "y"})[0].startswith(
        PROMPT_WITH_INPUT.split("{instruction}")[0]
    )
    # Braces in the data are text, not format fields; the output is returned unchanged.
    source, target = format_alpaca({"instruction": "Print {x}", "input": "{input}", "output": " {y}\n"})
    assert "### Instruction:\nPrint {x}\n\n### Input:\n{input}\n\n" in source
    assert target == " {y}\n"
    assert PROMPT_NO_INPUT.count("{") == 1


def test_good_files_load_exactly():
    expected = [
        {"instruction": "Name a color.", "input": "", "output": "Blue."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ]
    assert load_records(FIXTURES / "good.jsonl") == expected
    assert load_records(FIXTURES / "good.json") == expected
    assert load_records(FIXTURES / "bom.jsonl") == [expected[2]]


def test_records_know_their_lines():
    assert [r.line for r in read_records(FIXTURES / "good.jsonl")] == [1, 3, 4]
    json_records = read_records(FIXTURES / "good.json")
    assert [(r.line, r.index) for r in json_records] == [(2, 0), (7, 1), (9, 2)]


def test_shared_alpaca_sample_loads(shared_dir):
    records = load_records(shared_dir / "data" / "instruct" / "alpaca_en_demo.json")
    assert len(records) == 999
    assert sum(1 for r in records if r["input"]) == 412
    assert all(set(r) == {"instruction", "input", "output"} for r in records)


# (fixture, line, array index, field, words the message must contain)
MALFORMED = [
    ("invalid_json.jsonl", 3, None, None, "invalid JSON"),
    ("invalid_json.json", 4, None, None, "invalid JSON"),
    ("bad_utf8.jsonl", 2, None, None, "invalid UTF-8"),
    ("missing_output.jsonl", 2, None, "output", "missing field 'output'"),
    ("missing_instruction.json", 3, 1, "instruction", "missing field 'instruction'"),
    ("mistyped_output.jsonl", 2, None, "output", "field 'output' must be a non-empty string (got int)"),
    ("mistyped_instruction.json", 1, 1, "instruction", "must be a non-empty string (got list)"),
    ("mistyped_input.jsonl", 1, None, "input", "field 'input' must be a string or null (got list)"),
    ("empty_output.jsonl", 3, None, "output", "(got an empty string)"),
    ("blank_output.json", 4, 2, "output", "(got a blank string)"),
    ("non_object.jsonl", 2, None, None, "must be a JSON object"),
    ("non_object.json", 3, 1, None, "must be a JSON object with 'instruction' and 'output' (got str)"),
    ("not_array.json", 1, None, None, "expected a JSON array"),
    ("trailing_data.json", 2, None, None, "unexpected data after"),
]


@pytest.mark.parametrize(("name", "line", "index", "field", "words"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_input_is_a_located_data_error(name, line, index, field, words):
    path = FIXTURES / name
    with pytest.raises(DataError) as caught:
        load_records(path)
    err = caught.value
    assert isinstance(err, ValueError)
    assert (err.path, err.line, err.index, err.field) == (str(path), line, index, field)
    text = str(err)
    assert text.startswith(f"{path}:{line}: ")
    assert words in text
    assert err.hint and text.endswith(err.hint)


def test_error_message_format():
    path = FIXTURES / "mistyped_output.jsonl"
    with pytest.raises(DataError) as caught:
        load_records(path)
    assert str(caught.value) == (
        f"{path}:2: field 'output' must be a non-empty string (got int). Fix the record or remove it."
    )
    with pytest.raises(DataError) as caught:
        load_records(FIXTURES / "missing_instruction.json")
    assert "missing_instruction.json:3: record 1 of the array: missing field 'instruction'." in str(caught.value)


@pytest.mark.parametrize("name", ["empty_array.json", "blank.jsonl", "records.txt", "no_such_file.jsonl"])
def test_files_without_records_are_errors(name):
    with pytest.raises(DataError) as caught:
        load_records(FIXTURES / name)
    assert caught.value.path == str(FIXTURES / name)


def test_format_registry_and_detection():
    assert set(FORMATS) == {"alpaca"}
    assert detect_format({"instruction": "a", "output": "b"}) == "alpaca"
    assert detect_format({"text": "### Human: hi ### Assistant: hello"}) is None
    assert detect_format(["instruction", "output"]) is None
    with pytest.raises(ValueError, match="unknown data format 'oasst1'"):
        load_records(FIXTURES / "good.jsonl", format="oasst1")
