"""Alpaca instruction records: reading them from JSON / JSON Lines, checking them, and turning
each into the (source prompt, target) pair the model is trained on.

An Alpaca record is `{"instruction": str, "input": str (optional, may be ""), "output": str}`.
`format_alpaca` renders it with the two prompt templates of the original QLoRA script
(artidoro/qlora `qlora.py`, ALPACA_PROMPT_DICT; format-spec 5.3), byte for byte, including the
trailing space after "### Response:". The with-input template is chosen exactly when QLoRA chooses
it: `input` is a non-empty string (a single space counts). The target is `output`, unchanged.

Reading is strict because silent skipping hides broken data: invalid JSON, bad UTF-8, a record
that is not an object, a missing, mistyped or empty (blank) `instruction` or `output`, or an
`input` that is neither a string nor null are all `DataError`s naming the file and the line. For a
`.json` file (one top-level array) we walk the array with `JSONDecoder.raw_decode`, so each record
knows the line it starts on and the error names it together with the record's index. A leading
UTF-8 byte-order mark is accepted; blank lines in JSON Lines are skipped; unknown extra fields are
ignored (many Alpaca variants carry a `text` or `id` column). Hostile files get the same treatment:
a directory, an unreadable file, an empty one, a NUL byte (a binary or UTF-16 file), JSON nested
past Python's recursion limit or a number of thousands of digits are each a `DataError` with the
file and (where there is one) the line; reading is linear in the file's size (`read_text_file`).

The file reader (`read_records`) knows nothing about Alpaca. The other formats and file kinds now
live beside it: `readers.read_any` reads every file kind (JSON/JSON Lines through `read_records`,
CSV/TSV, Parquet, text) and `formats.FORMAT_REGISTRY` is the registry the loader uses (detection,
whole-file encoders). `FORMATS` here is the original per-record registry, kept for its callers
(`load_records`); it holds Alpaca only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora.data.errors import DataError

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: "
)

SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class SourceRecord:
    """One decoded JSON value and where it came from."""

    value: Any
    path: str
    line: int  # 1-based line where the record starts
    index: int | None = None  # position in a top-level JSON array; None for JSON Lines

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(self.path, self.line, message, field=field, index=self.index)


# ---------------------------------------------------------------------------------------- reading


def read_records(path: str | os.PathLike) -> list[SourceRecord]:
    """Every record of a `.json` (top-level array) or `.jsonl` file, located, not yet validated."""
    path = Path(path)
    name = str(path)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(
            name,
            None,
            f"unsupported file type {path.suffix or '(none)'!r}",
            hint="Use .json (an array of objects) or .jsonl (one object per line).",
        )
    text = read_text_file(path)
    if not text.strip():
        raise DataError(name, None, "the file is empty", hint="Point to a file with data.")
    if path.suffix.lower() == ".jsonl":
        records = _read_json_lines(text, name)
    else:
        records = _read_json_array(text, name)
    if not records:
        raise DataError(name, None, "the file holds no records", hint="Point to a file with data.")
    return records


def require_file(path: Path) -> None:
    """A DataError naming `path` unless it is a file: a directory and a missing path say which."""
    if path.is_dir():
        raise DataError(str(path), None, "is a directory, not a data file", hint="Pass the data file inside it.")
    if not path.is_file():
        raise DataError(str(path), None, "no such file", hint="Check the path.")


def read_text_file(path: Path) -> str:
    """The UTF-8 text of the data file `path` (see `_decode_utf8`); a directory, a missing or unreadable file is a
    DataError naming it."""
    name = str(path)
    require_file(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(name, None, f"cannot read the file ({err.strerror or err})", hint="Check its permissions.") \
            from None  # fmt: skip
    return _decode_utf8(data, name)


def _decode_utf8(data: bytes, name: str) -> str:
    """`data` as text without a leading BOM; bad UTF-8 or a NUL byte is a DataError with line and byte offset."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise DataError(
            name,
            data.count(b"\n", 0, nul) + 1,
            f"NUL byte at file offset {nul}: this is not a text file (binary, or UTF-16/32)",
            hint="Re-save the file as UTF-8 text.",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            name,
            line,
            f"invalid UTF-8 (byte 0x{data[err.start]:02x} at file offset {err.start})",
            hint="Re-save the file as UTF-8.",
        ) from None
    return text.removeprefix("\ufeff")


def _read_json_lines(text: str, name: str) -> list[SourceRecord]:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                name,
                number,
                f"invalid JSON at column {err.colno}: {err.msg}",
                hint="Each line must hold one complete JSON object.",
            ) from None
        except (RecursionError, ValueError) as err:
            raise _unreadable_json(name, number, None, err) from None
        records.append(SourceRecord(value, name, number))
    return records


def _read_json_array(text: str, name: str) -> list[SourceRecord]:
    decoder = json.JSONDecoder()
    length = len(text)

    def skip_space(position: int) -> int:
        while position < length and text[position] in " \t\r\n":
            position += 1
        return position

    def line_of(position: int) -> int:
        return text.count("\n", 0, position) + 1

    def fail(position: int, message: str, index: int | None = None) -> DataError:
        return DataError(
            name,
            line_of(position),
            message,
            index=index,
            hint="A .json file must hold one JSON array of objects; use .jsonl for one object per line.",
        )

    position = skip_space(0)
    if position >= length or text[position] != "[":
        raise fail(position, "expected a JSON array ('[') at the top level")
    position = skip_space(position + 1)
    records: list[SourceRecord] = []
    if position < length and text[position] == "]":
        position += 1
    else:
        # Lines are counted incrementally: each record's line from the previous one's.
        counted_to, line = 0, 1
        while True:
            index = len(records)
            line += text.count("\n", counted_to, position)
            counted_to = position
            try:
                value, end = decoder.raw_decode(text, position)
            except json.JSONDecodeError as err:
                raise DataError(
                    name,
                    err.lineno,
                    f"invalid JSON at column {err.colno} (in record {index}): {err.msg}",
                    hint="Fix the JSON syntax there.",
                ) from None
            except (RecursionError, ValueError) as err:
                raise _unreadable_json(name, line, index, err) from None
            records.append(SourceRecord(value, name, line, index))
            position = skip_space(end)
            if position < length and text[position] == ",":
                position = skip_space(position + 1)
                continue
            if position < length and text[position] == "]":
                position += 1
                break
            raise fail(position, f"expected ',' or ']' after record {index}")
    position = skip_space(position)
    if position < length:
        raise fail(position, "unexpected data after the top-level array")
    return records


def _unreadable_json(name: str, line: int, index: int | None, err: Exception) -> DataError:
    """The DataError for JSON that is valid but beyond Python's json: nesting past the recursion limit (a
    RecursionError), or an integer of more digits than Python converts (a ValueError, sys.get_int_max_str_digits)."""
    deep = isinstance(err, RecursionError)
    what = "is nested too deeply to read" if deep else "holds a number of more digits than Python reads"
    return DataError(name, line, f"the JSON value starting here {what}", index=index,
                     hint="Flatten or fix the record.")  # fmt: skip


# ----------------------------------------------------------------------------------------- Alpaca


def _describe(value: Any) -> str:
    if isinstance(value, str) and not value.strip():
        return "a blank string" if value else "an empty string"
    return "null" if value is None else type(value).__name__


def require_text(record: SourceRecord, value: dict, field: str, *, allow_empty: bool = False) -> str:
    """`value[field]` as a string, or a located `DataError`: missing, not a string, or blank (unless allowed)."""
    if field not in value:
        raise record.error(f"missing field '{field}'", field)
    item = value[field]
    if not isinstance(item, str) or (not allow_empty and not item.strip()):
        kind = "a string" if allow_empty else "a non-empty string"
        raise record.error(f"field '{field}' must be {kind} (got {_describe(item)})", field)
    return item


def validate_alpaca(record: SourceRecord) -> dict[str, str]:
    """The record as {"instruction", "input", "output"} strings, or a `DataError` saying what is wrong."""
    value = record.value
    if not isinstance(value, dict):
        raise record.error(f"a record must be a JSON object with 'instruction' and 'output' (got {_describe(value)})")
    clean = {}
    for field in ("instruction", "output"):
        if field not in value:
            raise record.error(f"missing field '{field}'", field)
        item = value[field]
        if not isinstance(item, str) or not item.strip():
            raise record.error(f"field '{field}' must be a non-empty string (got {_describe(item)})", field)
        clean[field] = item
    extra = value.get("input")
    if extra is not None and not isinstance(extra, str):
        raise record.error(f"field 'input' must be a string or null (got {_describe(extra)})", "input")
    clean["input"] = extra or ""
    return clean


def matches_alpaca(value: Any) -> bool:
    return isinstance(value, dict) and "instruction" in value and "output" in value


def format_alpaca(record: dict) -> tuple[str, str]:
    """(source prompt, target) of an Alpaca record, with QLoRA's templates."""
    template = PROMPT_WITH_INPUT if record.get("input", "") != "" else PROMPT_NO_INPUT
    source = template.format(instruction=record["instruction"], input=record.get("input", ""))
    return source, record["output"]


# ---------------------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Format:
    """A data format: does a record look like it, check it, render it as (source, target)."""

    name: str
    matches: Callable[[Any], bool]
    validate: Callable[[SourceRecord], dict]
    render: Callable[[dict], tuple[str, str]]


FORMATS: dict[str, Format] = {
    "alpaca": Format("alpaca", matches_alpaca, validate_alpaca, format_alpaca),
}


def detect_format(record: Any) -> str | None:
    """The name of the first format in `FORMATS` whose fields `record` has, or None."""
    return next((name for name, fmt in FORMATS.items() if fmt.matches(record)), None)


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown data format {name!r}; known formats: {sorted(FORMATS)}")
    return FORMATS[name]


def load_records(path: str | os.PathLike, format: str = "alpaca") -> list[dict]:
    """Read and validate every record of `path` (see the module docstring for what is checked)."""
    fmt = get_format(format)
    return [fmt.validate(record) for record in read_records(path)]
