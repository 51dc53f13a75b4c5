"""Perplexity of a causal LM on a text, with a sliding window: every token is scored exactly once.

A text is longer than the model's context, so it is cut into windows of `max_length` tokens that
start every `stride` tokens. Scoring each whole window would count the overlapping tokens twice
and score the first tokens of each window with almost no context. So, as transformers' perplexity
guide does, only the tokens a window adds beyond the previous window's end are scored; the overlap
(`max_length - stride` tokens) is context only. With `stride == max_length` the windows are
disjoint (fast, pessimistic); a smaller stride gives each scored token more context.

    ids       t0 t1 t2 t3 t4 t5 t6 t7 t8 t9        (max_length 6, stride 3)
    window 1  t0 t1 t2 t3 t4 t5                    scores t1..t5 (t0 has no predictor)
    window 2           t3 t4 t5 t6 t7 t8           scores t6..t8 (t3..t5: context)
    window 3                    t6 t7 t8 t9        scores t9

Token `i` is scored by the logits at position `i - 1` (next-token prediction), so `N` tokens give
`N - 1` scored tokens when `stride < max_length`. With disjoint windows (`stride == max_length`)
each window's first token has no predictor inside its window and goes unscored, as in the guide.
The result is exp(mean negative log-likelihood over the scored tokens); the NLL is summed in
float64 so that a long text's mean does not drift with the summation order.

Under torchrun each process holds the whole model and scores every N-th window (`qlora.eval.shares`);
the windows' NLLs come back to every rank in order and are summed as one process sums them, so N
processes give the one-process result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qlora.distributed import Runtime
from qlora.eval.shares import in_global_order, share_of
from qlora.tokenizer import Tokenizer


@dataclass(frozen=True)
class PerplexityResult:
    """The mean negative log-likelihood (nats per token) over `tokens` scored tokens, and exp of it."""

    nll: float
    tokens: int
    windows: int

    @property
    def perplexity(self) -> float:
        return float(torch.tensor(self.nll, dtype=torch.float64).exp())

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens, "windows": self.windows}


def window_spans(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of each window over `n_tokens` ids; see the module docstring."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be between 1 and max_length ({max_length}), got {stride}")
    if n_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n_tokens}")
    spans, scored_until = [], 1  # token 0 is never scored: nothing predicts it
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        first = max(scored_until, begin + 1)  # a window's first token has no predictor inside it
        if end > first:
            spans.append((begin, end, first))
            scored_until = end
        if end == n_tokens:
            break
    return spans


@torch.no_grad()
def perplexity(model, ids: list[int] | torch.Tensor, *, max_length: int = 1024, stride: int = 512,
               runtime: Runtime | None = None) -> PerplexityResult:  # fmt: skip
    """Sliding-window perplexity of `model` (logits [1, T, V] from `model(ids[None])`) on the token ids.

    With a distributed `runtime` (every rank holding the whole model and the same ids) rank r scores windows
    r, r + N, ... and every rank returns the result of all windows: a collective, every rank calls it."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    runtime = runtime or Runtime()
    device = _model_device(model)
    spans = window_spans(ids.numel(), max_length, stride)
    mine = [window_nll(model, ids, span, device) for span in share_of(spans, runtime)]
    total = torch.zeros((), dtype=torch.float64)
    for nll in in_global_order(mine, len(spans), runtime):  # summed in window order, as one process sums
        total += nll
    count = sum(end - first for _, end, first in spans)
    return PerplexityResult(nll=float(total / count), tokens=count, windows=len(spans))


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, span: tuple[int, int, int], device: torch.device) -> float:
    """The summed NLL (nats, float64) of the tokens window `span` = (begin, end, first) scores."""
    begin, end, first = span
    window = ids[begin:end].to(device)[None]  # [1, T]
    logits = model(window)[0].float()  # [T, V]
    # position p predicts token p + 1; score tokens first..end-1, i.e. positions first-1..end-2
    pred = logits[first - begin - 1 : end - begin - 1]  # [n, V]
    target = window[0, first - begin : end - begin]  # [n]
    return float(F.cross_entropy(pred, target, reduction="sum").double())


def text_ids(tokenizer: Tokenizer, path: str | Path, max_tokens: int | None) -> list[int]:
    """The text's ids (BOS first if the checkpoint's tokenizer adds one), cut to `max_tokens`."""
    text = Path(path).read_text(encoding="utf-8")  # universal newlines: WikiText's CRLF reads as "\n"
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    ids = bos + tokenizer.encode(text)
    return ids[:max_tokens] if max_tokens else ids


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
