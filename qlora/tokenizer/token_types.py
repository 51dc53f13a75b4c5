"""Token types of sentencepiece and llama.cpp vocabularies, and what each becomes in the backend.

Both formats mark each token NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED or BYTE
(sentencepiece_model.proto `SentencePiece.Type`; llama.cpp's `tokenizer.ggml.token_type` uses the
same numbers). CONTROL and UNKNOWN tokens must encode atomically and vanish from `decode`, as in
transformers, so they are registered as special tokens; USER_DEFINED ones as plain added tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def add_typed_tokens(backend: Backend, tokens: Sequence[str], types: Sequence[int], alphabet: set[str] | None) -> None:
    """CONTROL and UNKNOWN tokens become special tokens, USER_DEFINED ones plain added tokens (all
    encode atomically; specials are skipped by decode).

    In a byte-level vocabulary (`alphabet` given) every real token is spelled in the byte
    alphabet; a CONTROL token that is not is a converter's mislabel and would grow the
    vocabulary past the model's embedding if added, so it is skipped (as transformers does).
    """
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, types, strict=True)
        if kind in (CONTROL, UNKNOWN) and t and (alphabet is None or set(t) <= alphabet)
    ]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab(with_added_tokens=True)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, types, strict=True)
        if kind == USER_DEFINED and t in vocab
    ]
    if user:
        backend.add_tokens(user)
