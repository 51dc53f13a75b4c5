"""The QLoRA script's own record shape: `{"input": str, "output": str}` (format `input-output`).

This is what artidoro/qlora trains on for a local file (format-spec 5.3: "Local .json/.jsonl/.csv/
.tsv files: format default input-output") and what its evaluation sets look like
(`oa_questions.jsonl`: `input` = "### Human: ... ### Assistant:", `output` = the answer). The
source is `input` as written (it may be empty: then the source is BOS alone, which is how QLoRA
trains on whole Guanaco conversations), the target is `output`; both are strings, `output` must
not be blank. `input` may be null (read as ""), since CSV and Parquet exports write it so.
"""

from __future__ import annotations

from typing import Any

from qlora.data.alpaca import SourceRecord, _describe, require_text


def matches_input_output(value: Any) -> bool:
    return isinstance(value, dict) and "input" in value and "output" in value


def validate_input_output(record: SourceRecord) -> dict[str, str]:
    """The record as {"input", "output"} strings, or a located `DataError`."""
    value = record.value
    if not isinstance(value, dict):
        raise record.error(f"a record must be a JSON object with 'input' and 'output' (got {_describe(value)})")
    output = require_text(record, value, "output")
    if value.get("input") is None and "input" in value:
        return {"input": "", "output": output}
    return {"input": require_text(record, value, "input", allow_empty=True), "output": output}


def format_input_output(record: dict) -> tuple[str, str]:
    return record["input"], record["output"]
