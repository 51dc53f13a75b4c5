"""A tokenizer from a `.gguf` file's metadata (`tokenizer.ggml.*`), as llama.cpp stores it.

For `model == "gpt2"` we build byte-level BPE from the tokens and merges, with the pre-tokenizer
the `pre` name stands for (`byte_level.GGUF_PRE_TOKENIZERS`; an unknown name is an error). For
`model == "llama"` (sentencepiece vocabularies) we build sentencepiece BPE, merges recovered from
the scores as transformers does, prefix scheme "first" (transformers) unless the file says
`add_space_prefix = false` (then none; llama.cpp honours the flag, transformers ignores it). The
file names its special-token ids itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qlora.tokenizer.byte_level import GGUF_PRE_TOKENIZERS, byte_level_backend
from qlora.tokenizer.parts import TokenizerParts
from qlora.tokenizer.sentencepiece_bpe import recover_merges, sentencepiece_backend
from qlora.tokenizer.token_types import NORMAL, UNKNOWN

# Sentencepiece GGUFs of these architectures need more than the generic build (transformers has
# special cases for them); refuse rather than tokenize subtly wrong.
_UNSUPPORTED_SENTENCEPIECE_ARCHITECTURES = ("gemma", "gemma2", "gemma3", "gemma4", "phi3")


def read_gguf(path: Path) -> TokenizerParts:
    """The tokenizer parts of the GGUF file `path`; errors name the file and the metadata key."""
    import gguf  # heavy import, only needed here

    from qlora.checkpoint_io.gguf_file import check_gguf_layout

    check_gguf_layout(Path(path))  # the reader trusts the header's counts: a hostile one would hang it
    reader = gguf.GGUFReader(path)

    def meta(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    kind = meta("tokenizer.ggml.model")
    tokens = meta("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise ValueError(f"{path}: the GGUF metadata has no tokenizer (tokenizer.ggml.model / tokens)")
    types = meta("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores = meta("tokenizer.ggml.scores")
    for key, values in (("token_type", types), ("scores", scores)):
        if values is not None and len(values) != len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{key} has {len(values)} entries for {len(tokens)} tokens")
    merges = meta("tokenizer.ggml.merges")
    architecture = meta("general.architecture")
    if kind == "gpt2":
        pre = meta("tokenizer.ggml.pre", "gpt2")
        if merges is None:
            raise ValueError(f"{path}: a byte-level BPE GGUF needs tokenizer.ggml.merges")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(
                f"{path}: unknown GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre). Supported: "
                f"{sorted(GGUF_PRE_TOKENIZERS)}. Use the model's Hugging Face directory (tokenizer.json)."
            )
        backend = byte_level_backend(tokens, types, _split_merges(path, merges), pre)
    elif kind == "llama":
        if architecture in _UNSUPPORTED_SENTENCEPIECE_ARCHITECTURES:
            raise ValueError(
                f"{path}: sentencepiece GGUF tokenizers of architecture {architecture!r} are not "
                "supported. Use the model's Hugging Face directory (tokenizer.json) instead."
            )
        if merges is None and scores is None:
            raise ValueError(f"{path}: a sentencepiece GGUF needs tokenizer.ggml.scores or .merges")
        vocab = {t: i for i, t in enumerate(tokens)}
        if merges is not None:
            pairs = _split_merges(path, merges)
        else:  # transformers: by score, best first; longer left piece first on ties
            score_of = dict(zip(tokens, scores, strict=True))
            pairs = recover_merges(
                tokens, vocab, key=lambda merged, left, right: (-score_of[merged], -len(left), -len(right))
            )
        prepend = "never" if meta("tokenizer.ggml.add_space_prefix") is False else "first"
        backend = sentencepiece_backend(vocab, pairs, types, prepend)
    else:
        raise ValueError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2' byte-level "
            "BPE, 'llama' sentencepiece BPE). Use the model's Hugging Face directory instead."
        )

    special = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        token_id = meta(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{key}_token_id = {token_id} is outside the vocabulary")
        special[name] = None if token_id is None else tokens[token_id]
    if special["unk"] is None and UNKNOWN in types:
        special["unk"] = tokens[types.index(UNKNOWN)]
    add_bos = meta("tokenizer.ggml.add_bos_token")
    return TokenizerParts(
        backend,
        special_tokens=special,
        chat_template=meta("tokenizer.chat_template"),
        add_bos=(kind == "llama") if add_bos is None else add_bos,
        source=str(path),
    )


def _split_merges(path: Path, merges: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for number, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}: tokenizer.ggml.merges[{number}] = {merge!r} is not 'left right'")
        pairs.append((parts[0], parts[1]))
    return pairs
