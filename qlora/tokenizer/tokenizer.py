"""The `Tokenizer` interface the data layer and the evaluation code use: ids, text, chat.

It wraps a `tokenizers.Tokenizer` (the backend, built by `huggingface_dir` or `gguf_metadata`).
`encode` never adds BOS/EOS unless asked: the data layer decides, and appends ids, never the
spelling "<s>". `decode` is lossless: no "clean up tokenization spaces" (transformers 5 ignores that
option for BPE too). Chat messages render with the checkpoint's template (`chat_template`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from qlora.tokenizer.chat_template import compile_chat_template
from qlora.tokenizer.gguf_metadata import read_gguf
from qlora.tokenizer.huggingface_dir import LOOKED_FOR, read_directory
from qlora.tokenizer.special_tokens import SPECIAL_NAMES, register_special_tokens


class Tokenizer:
    """A checkpoint's tokenizer. Build it with `Tokenizer.from_pretrained(directory or .gguf)`.

    Attributes: `bos_id`, `eos_id`, `pad_id`, `unk_id` (None where the tokenizer has none),
    `bos_token`/`eos_token`/... (their spellings), `vocab_size` (ids it can produce, added tokens
    included), `chat_template` (jinja2 source or None), `add_bos` (whether the checkpoint's own
    tokenizer prepends BOS by default; informative: `encode` only adds what it is asked to).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        special_tokens: dict[str, str | None] | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
        source: str = "",
    ) -> None:
        self._backend = backend
        self.source = source
        self.chat_template = chat_template
        self.add_bos = bool(add_bos)
        resolved = register_special_tokens(backend, special_tokens or {}, source)
        for name, (token, token_id) in resolved.items():
            setattr(self, f"{name}_token", token)
            setattr(self, f"{name}_id", token_id)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None

    # ----------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a Hugging Face model directory or a `.gguf` file (see `huggingface_dir`, `gguf_metadata`)."""
        path = Path(path)
        if path.is_file() and path.suffix.lower() == ".gguf":
            return cls(**read_gguf(path)._asdict())
        if path.is_dir():
            return cls(**read_directory(path)._asdict())
        if path.is_file():
            raise ValueError(f"{path}: expected a model directory or a .gguf file")
        raise FileNotFoundError(f"{path}: no such directory or .gguf file (looked for {LOOKED_FOR})")

    # ------------------------------------------------------------------------------ text and ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, with no special tokens unless asked (BOS/EOS appended as ids)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            ids.insert(0, self._require("bos"))
        if add_eos:
            ids.append(self._require("eos"))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are dropped unless `skip_special_tokens=False`."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def _require(self, name: str) -> int:
        token_id = getattr(self, f"{name}_id")
        if token_id is None:
            raise ValueError(f"{self.source}: this tokenizer has no {name} token")
        return token_id

    # ---------------------------------------------------------------------------- chat templates

    def apply_chat_template(
        self, messages: Sequence[dict], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the checkpoint's template.

        Keys whose value is None are dropped from each message (as transformers does: templates
        test for presence). The special-token spellings (`bos_token`, `eos_token`, ...) are
        template variables; `variables` are passed to the template and override them.
        """
        if self.chat_template is None:
            raise ValueError(
                f"{self.source}: this tokenizer has no chat template (none in tokenizer_config.json, "
                "chat_template.jinja or the GGUF metadata). Use a chat model or a plain-text format."
            )
        if not messages:
            raise ValueError("apply_chat_template needs at least one message")
        clean = []
        for message in messages:
            if not isinstance(message, dict):
                raise TypeError(f"a chat message must be a dict, got {type(message).__name__}")
            clean.append({k: v for k, v in message.items() if v is not None})
        context: dict[str, Any] = {
            f"{n}_token": getattr(self, f"{n}_token") for n in SPECIAL_NAMES if getattr(self, f"{n}_token") is not None
        }
        context.update(variables)
        return compile_chat_template(self.chat_template).render(
            messages=clean,
            tools=context.pop("tools", None),
            documents=context.pop("documents", None),
            add_generation_prompt=add_generation_prompt,
            **context,
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )
