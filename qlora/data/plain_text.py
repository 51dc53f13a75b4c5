"""Plain text for continued pretraining: documents -> fixed-length blocks, every token trained.

A record is `{"text": str}` (JSON Lines, CSV, Parquet) or a whole `.txt` file. Each document is
encoded as BOS (if the tokenizer has one) + text + EOS, so the model learns where documents begin
and end, then cut into consecutive blocks of `block_size` tokens; the last block of a document is
shorter (never padded here: `collate` pads, or packing fills it with other documents). Blocks never
span two documents, which is why they are made per document rather than from one concatenated
stream (the Hugging Face `run_clm` way): with packing, blocks of different documents share a row
but not attention (`packing.py`).

Labels equal the ids (the loss is on every token; the first token of a block is never predicted,
since the loss shifts by one). A document cut into several blocks counts as truncated: the later
blocks lose the context of the earlier ones, and the log should say how often that happens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlora.data.alpaca import SourceRecord, _describe, require_text
from qlora.data.encode import EncodedExample
from qlora.data.errors import DataError

if TYPE_CHECKING:
    from qlora.tokenizer import Tokenizer


def matches_text(value: Any) -> bool:
    return isinstance(value, dict) and "text" in value


def validate_text(record: SourceRecord) -> dict[str, str]:
    value = record.value
    if not isinstance(value, dict):
        raise record.error(f"a record must be a JSON object with 'text' (got {_describe(value)})")
    return {"text": require_text(record, value, "text")}


def encode_document(tokenizer: Tokenizer, text: str, *, block_size: int) -> list[EncodedExample]:
    """The blocks of one document (see the module docstring)."""
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 (got {block_size})")
    if tokenizer.eos_id is None:
        raise ValueError(f"{tokenizer.source}: the tokenizer has no EOS token to end documents with")
    body = tokenizer.encode(text)
    if not body:
        raise DataError(None, None, "the text encodes to no tokens", field="text")
    ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + body + [tokenizer.eos_id]
    cut = len(ids) > block_size
    blocks = [ids[i : i + block_size] for i in range(0, len(ids), block_size)]
    return [EncodedExample(block, list(block), cut) for block in blocks]
