"""Reading data files of every supported kind into located records: JSON, JSON Lines, CSV/TSV,
Parquet, plain text; and a clear refusal for Hugging Face dataset names.

Every reader returns `SourceRecord`s (a decoded value, the file, the 1-based line where it starts),
so the format layer above can say *where* a record is wrong without knowing the file kind:

- `.json` / `.jsonl`: `qlora.data.alpaca.read_records` (strict JSON, line of each record, BOM).
- `.csv` / `.tsv`: the header row names the fields; each row is a dict of strings, located at the
  file line the row starts on (a quoted field may span lines). A row with more or fewer cells than
  the header, an empty or duplicated header name, bad UTF-8, a NUL byte, a field longer than
  Python's csv limit (`csv.field_size_limit()`, 131,072 characters: the limit is process-wide, so
  we leave it and say so) are `DataError`s with the line.
  Whether the header has the *right* columns is the format's question (`formats.py`), asked once
  with line 1 so the user sees "the header has [...], the format needs [...]".
- `.parquet`: rows through `pyarrow` when it is installed (the "line" is the 1-based row number);
  without pyarrow a `DataError` says to install it or convert the file to JSON Lines. (In the
  environment this was written in pyarrow is not installed, so this branch is untested.)
- `.txt`: the whole file is one plain-text document, `{"text": ...}` at line 1 (for continued
  pretraining; use JSON Lines with a `text` field for many documents).

A path that does not exist and looks like a Hub dataset name ("tatsu-lab/alpaca",
"timdettmers/openassistant-guanaco") is refused with the reason: this engine reads local files
only, and the Hub is not reachable from where it runs; the error says to download the data and
pass the file.
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from qlora.data.alpaca import SourceRecord, read_records, read_text_file, require_file
from qlora.data.errors import DataError

JSON_SUFFIXES = (".json", ".jsonl")
TABLE_SUFFIXES = (".csv", ".tsv")
SUFFIXES = JSON_SUFFIXES + TABLE_SUFFIXES + (".parquet", ".txt")

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def read_any(path: str | os.PathLike) -> list[SourceRecord]:
    """Every record of a supported data file (see the module docstring), located, not validated."""
    path = Path(path)
    name = str(path)
    suffix = path.suffix.lower()
    if not path.exists() and suffix not in SUFFIXES and _HUB_NAME.match(name):
        raise DataError(
            name,
            None,
            "this looks like a Hugging Face dataset name, but only local files can be read "
            "(the Hub is not reachable and the `datasets` package is not used)",
            hint="Download the dataset's data file (JSON, JSON Lines, CSV or Parquet) and pass its path.",
        )
    if suffix in JSON_SUFFIXES:
        return read_records(path)
    if suffix not in SUFFIXES:
        raise DataError(
            name,
            None,
            f"unsupported file type {path.suffix or '(none)'!r}",
            hint="Use .json, .jsonl, .csv, .tsv, .parquet or .txt.",
        )
    require_file(path)
    if suffix in TABLE_SUFFIXES:
        records = _read_table(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        records = _read_parquet(path)
    else:
        text = read_text_file(path)
        records = [SourceRecord({"text": text}, name, 1)] if text.strip() else []
    if not records:
        raise DataError(name, None, "the file holds no records", hint="Point to a file with data.")
    return records


def _read_table(path: Path, delimiter: str) -> list[SourceRecord]:
    name = str(path)
    text = read_text_file(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    start = 1
    kind = "TSV" if delimiter == "\t" else "CSV"
    try:
        header = next(reader, None)
        if header is None:
            return []
        if any(not column.strip() for column in header) or len(set(header)) != len(header):
            raise DataError(
                name,
                1,
                f"the {kind} header {header!r} has an empty or repeated column name",
                hint="The first row must name each column once.",
            )
        records = []
        start = reader.line_num + 1  # the line the next row starts on
        for row in reader:
            if not any(cell.strip() for cell in row):  # blank line
                start = reader.line_num + 1
                continue
            if len(row) != len(header):
                raise DataError(
                    name,
                    start,
                    f"the row has {len(row)} cells but the header has {len(header)} columns {header!r}",
                    hint=f"Quote cells that contain the delimiter {delimiter!r} or line breaks.",
                )
            records.append(SourceRecord(dict(zip(header, row, strict=True)), name, start))
            start = reader.line_num + 1
    except csv.Error as err:
        if "field limit" in str(err):
            limit = csv.field_size_limit()
            raise DataError(name, start, f"a cell of the row starting here is longer than Python's csv reader takes "
                            f"({limit:,} characters)", hint="Store long texts in JSON Lines.") from None  # fmt: skip
        raise DataError(
            name, start, f"malformed {kind} in the row starting here: {err}", hint="Fix the quoting there."
        ) from None
    return records


def _read_parquet(path: Path) -> list[SourceRecord]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            str(path),
            None,
            "reading Parquet needs the `pyarrow` package, which is not installed",
            hint="Install pyarrow, or convert the file to JSON Lines.",
        ) from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises its own error types for a damaged file
        raise DataError(str(path), None, f"cannot read the Parquet file: {err}", hint="Check the file.") from None
    return [SourceRecord(row, str(path), number) for number, row in enumerate(rows, start=1)]
