"""Instruction data: records in files -> (source, target) text -> token ids and labels -> batches.

The layers, each a module:
- `errors`: `DataError`, a problem in the user's data with its file, line and a fix;
- `alpaca`: reading JSON / JSON Lines records (strict, located) and the Alpaca format with QLoRA's
  prompt templates; `FORMATS` is where further formats register;
- `encode`: one (source, target) pair -> `EncodedExample` (QLoRA's collator semantics, EOS always
  kept), and `InstructionDataset.from_file` for a whole file;
- `collate`: padding into tensors (attention mask from lengths, so pad may equal EOS), the seeded
  resumable `BatchIterator` (optionally length-grouped, over examples or packs), and `split_holdout`;
- `readers`: JSON / JSON Lines / CSV / TSV / Parquet / text files -> located records;
- `input_output`, `oasst`, `chat`, `plain_text`: the other formats;
- `formats`: the format registry, detection, and `load_dataset(path, tokenizer, format)`;
- `packing`: several examples per row with a block-diagonal mask and restarting positions;
- `check`: `qlora data check`, the audit of a data file.
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
from qlora.data.check import CheckReport, check_file
from qlora.data.collate import (
    BatchIterator,
    collate,
    count_tokens,
    epoch_order,
    grouped_epoch_order,
    split_holdout,
)
from qlora.data.encode import IGNORE_INDEX, EncodedExample, InstructionDataset, encode_example
from qlora.data.errors import DataError
from qlora.data.formats import FORMAT_REGISTRY, DatasetInfo, load_dataset
from qlora.data.packing import Pack, collate_packed, pack_examples
from qlora.data.readers import read_any

__all__ = [
    "FORMATS",
    "FORMAT_REGISTRY",
    "CheckReport",
    "DatasetInfo",
    "Pack",
    "check_file",
    "collate_packed",
    "count_tokens",
    "grouped_epoch_order",
    "load_dataset",
    "pack_examples",
    "read_any",
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
