"""Special tokens: which spellings are BOS, EOS, PAD and UNK, checked against the vocabulary.

A BOS or EOS that is not in the vocabulary is an error; a PAD or UNK is dropped with a warning
(transformers would add it as a new id past the model's embedding). The named tokens are
registered as special tokens of the backend, so "<|im_end|>" written in text encodes to its single
id, as in transformers (chat templates rely on it), and `decode` can skip them.
"""

from __future__ import annotations

import logging
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

SPECIAL_NAMES = ("bos", "eos", "pad", "unk")
logger = logging.getLogger(__name__)


def register_special_tokens(
    backend: Backend, special_tokens: dict[str, str | None], source: str
) -> dict[str, tuple[str | None, int | None]]:
    """{name: (spelling, id)} for each of `SPECIAL_NAMES`, the named ones registered in `backend`.

    Adding a token that is already in the vocabulary keeps its id. `source` (file or directory)
    prefixes the error and warning messages.
    """
    resolved: dict[str, tuple[str | None, int | None]] = {}
    for name in SPECIAL_NAMES:
        token = special_tokens.get(name)
        token_id = None if token is None else backend.token_to_id(token)
        if token is not None and token_id is None:
            if name in ("bos", "eos"):
                raise ValueError(
                    f"{source}: the {name} token {token!r} is not in the vocabulary. "
                    "Fix the tokenizer files, or pass a checkpoint whose special tokens exist."
                )
            # transformers would add it as a new id past the model's embedding; we go without.
            logger.warning("%s: the %s token %r is not in the vocabulary; treating it as absent", source, name, token)
            token = None
        resolved[name] = (token, token_id)
    # Special tokens encode atomically and are skipped by decode.
    already = {t.content for t in backend.get_added_tokens_decoder().values()}
    named = [token for token, _ in resolved.values() if token is not None]
    missing = [t for t in dict.fromkeys(named) if t not in already]
    if missing:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in missing])
    return resolved


def token_spelling(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
