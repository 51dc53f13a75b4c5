"""Instruction data: records in files -> (source, target) text -> token ids and labels -> batches.

The layers, each a module:
- `errors`: `DataError`, a problem in the user's data with its file, line and a fix;
- `alpaca`: reading JSON / JSON Lines records (strict, located) and the Alpaca format with QLoRA's
  prompt templates; `FORMATS` is where further formats register;
- `encode`: one (source, target) pair -> `EncodedExample` (QLoRA's collator semantics, EOS always
  kept), and `InstructionDataset.from_file` for a whole file;
- `collate`: padding into tensors (attention mask from lengths, so pad may equal EOS), the seeded
  resumable `BatchIterator`, and `split_holdout`.
"""

from qlora.data.alpaca import (
    FORMATS,
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    Format,
    SourceRecord,
    detect_format,
    format_alpaca,
    get_format,
    load_records,
    read_records,
    validate_alpaca,
)
from qlora.data.collate import BatchIterator, collate, epoch_order, split_holdout
from qlora.data.encode import IGNORE_INDEX, EncodedExample, InstructionDataset, encode_example
from qlora.data.errors import DataError

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "PROMPT_NO_INPUT",
    "PROMPT_WITH_INPUT",
    "BatchIterator",
    "DataError",
    "EncodedExample",
    "Format",
    "InstructionDataset",
    "SourceRecord",
    "collate",
    "detect_format",
    "encode_example",
    "epoch_order",
    "format_alpaca",
    "get_format",
    "load_records",
    "read_records",
    "split_holdout",
    "validate_alpaca",
]
