"""Sentencepiece-style BPE as a `tokenizers` backend (Llama 1/2, TinyLlama, llama2.c's stories).

What transformers' `LlamaTokenizer` builds from a sentencepiece vocabulary: BPE over the pieces
with byte fallback, a `Metaspace` pre-tokenizer ("▁" for spaces) whose prefix scheme the caller
picks, no normalizer. Sentencepiece stores pieces and scores, not merges, so the merges are
recovered from the vocabulary; the callers choose the ranking (by id or by score) that
transformers uses for their source.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from qlora.tokenizer.token_types import add_typed_tokens


def recover_merges(pieces: Sequence[str], vocab: dict[str, int], key) -> list[tuple[str, str]]:
    """Every split of every piece into two pieces of the vocabulary, sorted by `key`.

    A sentencepiece BPE model stores pieces and scores, not merges; each way of writing a piece
    as the concatenation of two pieces is a merge, ranked by `key(merged, left, right)`. The
    sort is stable over (piece order, then left/right ids), which fixes the order of ties.
    """
    found = []
    for merged in dict.fromkeys(pieces):
        local = [(merged[:i], merged[i:]) for i in range(1, len(merged))]
        local = [(l, r) for l, r in local if l in vocab and r in vocab]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        found.extend((merged, l, r) for l, r in local)
    found.sort(key=lambda item: key(*item))
    return [(l, r) for _, l, r in found]


def sentencepiece_backend(
    vocab: dict[str, int], merges: list[tuple[str, str]], types: Sequence[int], prepend: str
) -> Backend:
    """Sentencepiece-style BPE: byte fallback, `Metaspace` ("▁" for spaces), no normalizer."""
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prepend != "never":
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    id_to_piece = {i: piece for piece, i in vocab.items()}
    add_typed_tokens(backend, [id_to_piece.get(i, "") for i in range(len(types))], types, None)
    return backend
