"""What a loader hands the `Tokenizer`: the backend it built and what the files say about it.

The loaders (`huggingface_dir`, `gguf_metadata`) return these parts instead of a `Tokenizer`, so
they sit below the interface and `Tokenizer.from_pretrained` can call them without an import cycle.
"""

from __future__ import annotations

from typing import NamedTuple

from tokenizers import Tokenizer as Backend


class TokenizerParts(NamedTuple):
    backend: Backend
    special_tokens: dict[str, str | None]  # "bos"/"eos"/"pad"/"unk" -> spelling, or None
    chat_template: str | None
    add_bos: bool
    source: str  # the directory or file, for error messages
