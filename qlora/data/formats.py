"""The data-format registry, format detection, and `load_dataset`: a file -> encoded examples.

Formats (name: fields of a record -> what is trained):

- `alpaca`: instruction, input?, output -> QLoRA's Alpaca prompt, target `output` (`alpaca.py`);
- `oasst1`: OASST message rows or trees -> one Guanaco thread per tree, whole text (`oasst.py`);
- `chat`: messages -> the model's chat template, loss on assistant turns (`chat.py`);
- `input-output`: input, output -> source `input`, target `output` (`input_output.py`);
- `guanaco`: text "### Human: ...### Assistant: ..." -> whole text (`oasst.py`);
- `text`: text (or a `.txt` file) -> fixed-length blocks, every token trained (`plain_text.py`).

Detection (`format="auto"`) looks at the first record's fields and takes the first format in the
order above that matches (Alpaca before input-output, since an Alpaca record also has `input` and
`output`; Guanaco text before plain text, since both have `text`). Every record is then validated
against that format, so a record of another shape further down is an error at its line, never a
silent mix. The choice is logged (and returned in `DatasetInfo.format`, with `detected`). For a
CSV/TSV file the header is checked once against the format's required columns, so a wrong header is
one error at line 1 that lists both.

Record formats (one record -> one example) share one path: validate, render (source, target),
`encode_example`. `oasst1` reads the whole file before it can build threads; `text` yields several
blocks per record; `chat` renders through the template. All errors are `DataError`s located at the
record's file and line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from qlora.data import chat, input_output, oasst, plain_text
from qlora.data.alpaca import SourceRecord, format_alpaca, matches_alpaca, validate_alpaca
from qlora.data.encode import EncodedExample, encode_example
from qlora.data.errors import DataError
from qlora.data.readers import TABLE_SUFFIXES, read_any

if TYPE_CHECKING:
    from qlora.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeOptions:
    """How examples are cut and masked; one set for every format."""

    max_source_len: int = 384
    max_target_len: int = 128
    train_on_source: bool = False
    languages: frozenset[str] | None = None  # oasst1: keep threads whose root prompt has one of these
    block_size: int | None = None  # text: tokens per block (default max_source_len + max_target_len)


Encoded = list[tuple[EncodedExample, int]]  # each example with the file line it came from


@dataclass(frozen=True)
class DataFormat:
    """A data format: its name, the fields that identify it, and how a file of it is encoded."""

    name: str
    required: tuple[str, ...]  # the columns a CSV/TSV header must have
    matches: Callable[[Any], bool]
    encode: Callable[[list[SourceRecord], Tokenizer, EncodeOptions], Encoded]


def _located(record: SourceRecord, make: Callable[[], Any]) -> Any:
    try:
        return make()
    except DataError as err:
        if err.path is not None:
            raise
        raise err.at(record.path, record.line, record.index) from None


def _pair_format(validate, render) -> Callable[[list[SourceRecord], Tokenizer, EncodeOptions], Encoded]:
    def encode(records: list[SourceRecord], tokenizer: Tokenizer, options: EncodeOptions) -> Encoded:
        out = []
        for record in records:
            source, target = render(validate(record))
            example = _located(
                record,
                lambda s=source, t=target: encode_example(
                    tokenizer,
                    s,
                    t,
                    max_source_len=options.max_source_len,
                    max_target_len=options.max_target_len,
                    train_on_source=options.train_on_source,
                ),
            )
            out.append((example, record.line))
        return out

    return encode


def _encode_oasst(records: list[SourceRecord], tokenizer: Tokenizer, options: EncodeOptions) -> Encoded:
    threads = oasst.build_threads(oasst.read_messages(records), options.languages)
    if not threads:
        where = records[0].path if records else None
        langs = "" if options.languages is None else f" in languages {sorted(options.languages)}"
        raise DataError(where, None, f"no conversation thread with an assistant reply{langs}", hint="Check the data.")
    out = []
    for thread in threads:
        root = thread[0].record
        example = _located(
            root,
            lambda t=thread: encode_example(
                tokenizer,
                "",
                oasst.render_thread(t),
                max_source_len=options.max_source_len,
                max_target_len=options.max_target_len,
                train_on_source=options.train_on_source,
            ),
        )
        out.append((example, root.line))
    return out


def _encode_chat(records: list[SourceRecord], tokenizer: Tokenizer, options: EncodeOptions) -> Encoded:
    max_len = options.max_source_len + options.max_target_len
    out = []
    for record in records:
        messages = chat.validate_chat(record)["messages"]
        example = _located(
            record,
            lambda m=messages: chat.encode_chat(tokenizer, m, max_len=max_len, train_on_source=options.train_on_source),
        )
        out.append((example, record.line))
    return out


def _encode_text(records: list[SourceRecord], tokenizer: Tokenizer, options: EncodeOptions) -> Encoded:
    block_size = options.block_size or options.max_source_len + options.max_target_len
    out = []
    for record in records:
        text = plain_text.validate_text(record)["text"]
        blocks = _located(record, lambda t=text: plain_text.encode_document(tokenizer, t, block_size=block_size))
        out.extend((block, record.line) for block in blocks)
    return out


FORMAT_REGISTRY: dict[str, DataFormat] = {
    f.name: f
    for f in (
        DataFormat("alpaca", ("instruction", "output"), matches_alpaca, _pair_format(validate_alpaca, format_alpaca)),
        DataFormat("oasst1", ("message_id", "parent_id", "role", "text"), oasst.matches_oasst, _encode_oasst),
        DataFormat("chat", ("messages",), chat.matches_chat, _encode_chat),
        DataFormat(
            "input-output",
            ("input", "output"),
            input_output.matches_input_output,
            _pair_format(input_output.validate_input_output, input_output.format_input_output),
        ),
        DataFormat(
            "guanaco", ("text",), oasst.matches_guanaco, _pair_format(oasst.validate_guanaco, oasst.format_guanaco)
        ),
        DataFormat("text", ("text",), plain_text.matches_text, _encode_text),
    )
}


def detect(record: Any) -> str | None:
    """The first registered format whose fields `record` has (see the module docstring), or None."""
    return next((name for name, fmt in FORMAT_REGISTRY.items() if fmt.matches(record)), None)


@dataclass
class DatasetInfo:
    """What `load_dataset` read: for the log, the data check and the checkpoint's metadata."""

    path: str
    format: str
    detected: bool  # True when the format was detected, False when named
    num_records: int
    num_examples: int
    num_truncated: int
    lines: list[int] = field(default_factory=list)  # the file line each example came from


def load_dataset(
    path: str | os.PathLike,
    tokenizer: Tokenizer,
    format: str = "auto",
    *,
    max_source_len: int = 384,
    max_target_len: int = 128,
    train_on_source: bool = False,
    languages: set[str] | frozenset[str] | None = None,
    block_size: int | None = None,
) -> tuple[list[EncodedExample], DatasetInfo]:
    """Read `path`, detect or check its format, encode every example (see the module docstring).

    Raises `DataError` (file and line) on the first bad record; logs the format and the truncation
    count.
    """
    if format != "auto" and format not in FORMAT_REGISTRY:
        raise ValueError(f"unknown data format {format!r}; known formats: auto, {', '.join(FORMAT_REGISTRY)}")
    records = read_any(path)
    name = str(path)
    is_table = str(path).lower().endswith(TABLE_SUFFIXES)
    if format == "auto":
        chosen = detect(records[0].value)
        if chosen is None:
            what = sorted(records[0].value) if isinstance(records[0].value, dict) else type(records[0].value).__name__
            raise DataError(
                name,
                1 if is_table else records[0].line,
                f"the header's columns {list(records[0].value)} match no data format"
                if is_table
                else f"cannot tell the data format from the first record's fields ({what})",
                hint="Name the format (" + ", ".join(FORMAT_REGISTRY) + ") or fix the field names.",
            )
    else:
        chosen = format
    fmt = FORMAT_REGISTRY[chosen]
    if is_table:
        header = list(records[0].value)
        missing = [c for c in fmt.required if c not in header]
        if missing:
            raise DataError(
                name,
                1,
                f"the header has columns {header} but the {chosen} format needs {list(fmt.required)} "
                f"(missing {missing})",
                field=missing[0],
                hint="Rename the columns in the first row.",
            )
    logger.info("%s: data format %s (%s)", name, chosen, "detected from the fields" if format == "auto" else "named")
    options = EncodeOptions(
        max_source_len, max_target_len, train_on_source, None if languages is None else frozenset(languages), block_size
    )
    encoded = fmt.encode(records, tokenizer, options)
    examples = [replace(example, line=line) for example, line in encoded]
    info = DatasetInfo(
        name,
        chosen,
        format == "auto",
        len(records),
        len(examples),
        sum(e.truncated for e in examples),
        [line for _, line in encoded],
    )
    if info.num_truncated and chosen == "text":
        block = block_size or max_source_len + max_target_len
        logger.warning(
            "%s: %d of %d blocks come from documents cut into blocks of %d tokens",
            name,
            info.num_truncated,
            info.num_examples,
            block,
        )
    elif info.num_truncated:
        limits = (
            f"total > {max_source_len + max_target_len}"
            if chosen == "chat"
            else (f"source > {max_source_len} or target > {max_target_len}")
        )
        logger.warning(
            "%s: %d of %d examples truncated (%s tokens)", name, info.num_truncated, info.num_examples, limits
        )
    return examples, info
