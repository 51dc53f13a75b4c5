"""Byte-level BPE (GPT-2 style: SmolLM, Llama 3, Qwen2) as a `tokenizers` backend.

Text is split by a family's pre-tokenizer, each piece's UTF-8 bytes are spelled in GPT-2's
256-character byte alphabet, and BPE merges run over that spelling. llama.cpp names the split in
`tokenizer.ggml.pre`; `GGUF_PRE_TOKENIZERS` maps each name we know to the split it stands for (an
unknown name is an error at the caller, where transformers silently falls back to GPT-2's split).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from qlora.tokenizer.token_types import add_typed_tokens

# The split each llama.cpp `tokenizer.ggml.pre` name stands for, before byte-level BPE. These are
# the published pre-tokenizer patterns of those model families (their tokenizer.json files).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split() -> pre_tokenizers.PreTokenizer:
    # SmolLM/StarCoder: each digit on its own, then GPT-2's split (their tokenizer.json).
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _regex_split(pattern: str):
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return build


GGUF_PRE_TOKENIZERS = {
    "gpt2": _gpt2_split,
    "smollm": _digits_then_gpt2_split,
    "llama-bpe": _regex_split(_LLAMA3_SPLIT),
    "llama3": _regex_split(_LLAMA3_SPLIT),
    "llama-v3": _regex_split(_LLAMA3_SPLIT),
    "qwen2": _regex_split(_QWEN2_SPLIT),
}


def byte_level_backend(tokens: Sequence[str], types: Sequence[int], merges: list[tuple[str, str]], pre: str) -> Backend:
    """Byte-level BPE over `tokens` (ids in order) with `merges`, split by `GGUF_PRE_TOKENIZERS[pre]`."""
    byte_to_char = byte_level_alphabet()
    alphabet = set(byte_to_char.values())
    # A token spelled outside the byte alphabet (raw text) is respelled byte by byte.
    spelled = [t if set(t) <= alphabet else "".join(byte_to_char[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None))
    backend.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    add_typed_tokens(backend, tokens, types, alphabet)
    return backend


@functools.cache
def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-character map: printable Latin-1 bytes stand for themselves; the others
    (controls, space, 0x7F-0xA0, 0xAD) take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
