"""From (source, target) text to token ids and labels: what the loss is computed on.

QLoRA's collator (artidoro/qlora `DataCollatorForCausalLM`, format-spec 5.3) tokenizes
`f"{bos_token}{source}"` and `f"{target}{eos_token}"` separately, each without special tokens and
truncated on the right to `source_max_len` / `target_max_len`, concatenates them, and masks the
source out of the labels with -100 unless `train_on_source`. `encode_example` does the same, with
two deliberate choices:

- **BOS and EOS are ids, not text.** We prepend `bos_id` and append `eos_id` instead of spelling
  the tokens into the string (with some tokenizers "<s>" glued to the text changes how the first
  word splits). The tokenizer encodes the source and the target separately, as QLoRA does, so the
  split at the source/target boundary is QLoRA's ("### Response: " ends with its own space token,
  and a sentencepiece tokenizer gives the target its own leading "▁" as well).
  A tokenizer without BOS gets no BOS; one without EOS is an error (nothing would teach the model
  to stop).
- **EOS always survives truncation.** As in QLoRA, BOS and EOS count inside their maximum: the
  source is at most `max_source_len` ids including BOS, the target at most `max_target_len`
  including EOS. But QLoRA truncates the string that already ends in EOS, so a long target loses
  its EOS and the model learns never to stop on long answers. We truncate the target's text tokens
  to `max_target_len - 1` and then append EOS, so every example ends in an unmasked EOS. The source
  keeps its beginning (BOS, the instruction), as in QLoRA; a long input can lose the
  "### Response:" line, which `truncated` reports.

An example whose target encodes to no token is an error, never a row of all -100 labels (which
would train on nothing and, averaged, on NaN). `InstructionDataset.from_file` reads, validates,
formats and encodes a whole file, naming the file and line of any bad record, and counts and logs
the truncated examples; it is a thin wrapper over `formats.load_dataset`, so it reads every format.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qlora.data.errors import DataError

if TYPE_CHECKING:
    from qlora.tokenizer import Tokenizer

IGNORE_INDEX = -100  # the label value the cross-entropy loss skips (PyTorch's ignore_index)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedExample:
    """One training example: `input_ids` = source ‖ target, `labels` aligned with it."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    line: int | None = field(default=None, compare=False)  # the data file's line it came from (for messages)

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_example(
    tokenizer: Tokenizer,
    source: str,
    target: str,
    *,
    max_source_len: int = 384,
    max_target_len: int = 128,
    train_on_source: bool = False,
) -> EncodedExample:
    """Encode one (source, target) pair; see the module docstring for the rules."""
    if max_source_len < 1:
        raise ValueError(f"max_source_len must be at least 1 (got {max_source_len})")
    if max_target_len < 2:
        raise ValueError(f"max_target_len must be at least 2: one text token and EOS (got {max_target_len})")
    if tokenizer.eos_id is None:
        raise ValueError(f"{tokenizer.source}: the tokenizer has no EOS token; targets must end in one")

    source_ids = tokenizer.encode(source, add_bos=tokenizer.bos_id is not None)
    target_text_ids = tokenizer.encode(target)
    if not target_text_ids:
        raise DataError(
            None,
            None,
            "the target encodes to no tokens, so the example would train on nothing",
            field="output",
        )
    truncated = len(source_ids) > max_source_len or len(target_text_ids) > max_target_len - 1
    source_ids = source_ids[:max_source_len]
    target_ids = target_text_ids[: max_target_len - 1] + [tokenizer.eos_id]

    source_labels = list(source_ids) if train_on_source else [IGNORE_INDEX] * len(source_ids)
    return EncodedExample(
        input_ids=source_ids + target_ids,
        labels=source_labels + target_ids,
        truncated=truncated,
    )


@dataclass
class InstructionDataset:
    """The encoded examples of one data file, in file order."""

    examples: list[EncodedExample]
    num_truncated: int = 0
    source: str = ""
    lines: list[int] = field(default_factory=list)  # the file line of each example

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        tokenizer: Tokenizer,
        *,
        format: str = "alpaca",
        max_source_len: int = 384,
        max_target_len: int = 128,
        train_on_source: bool = False,
    ) -> InstructionDataset:
        """Read, validate, format and encode every record of `path`.

        `format`: a name in `qlora.data.formats.FORMAT_REGISTRY` or "auto" (see `load_dataset`, which
        this wraps). Raises `DataError` (file and line) on the first bad record. Logs how many
        examples were truncated; `num_truncated` holds the count.
        """
        from qlora.data.formats import load_dataset  # formats builds on this module

        examples, info = load_dataset(
            path,
            tokenizer,
            format,
            max_source_len=max_source_len,
            max_target_len=max_target_len,
            train_on_source=train_on_source,
        )
        return cls(examples, info.num_truncated, str(path), info.lines)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> EncodedExample:
        return self.examples[index]

    def __iter__(self) -> Iterator[EncodedExample]:
        return iter(self.examples)
