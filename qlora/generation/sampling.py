"""How the next token is chosen, for every sequence of a batch at once, reproducibly.

`SamplingParams` is one request's choice: greedy (temperature 0) or sampled with temperature, top-k, top-p
and a repetition penalty, a seed, a length limit and stop strings or ids. `next_tokens` applies each row's
own parameters to a batch of logits in one pass of tensor ops (no host round trip, so a CUDA graph can hold
it).

Why the noise is hashed. Sampling draws with the Gumbel-max trick: argmax(logits / T + g) with g = -log(-log u)
is an exact draw from softmax(logits / T) (restricted to the tokens top-k/top-p keep). u is not taken from a
generator shared by the batch but is a hash of (the request's seed, the step, the token id)
(`qlora.lora.dropout.pcg_hash`), so a request's tokens depend on its seed alone: the same with any batch
size, any neighbours, any arrival order, on a CPU or a GPU up to the logits' own rounding.

Greedy ties: argmax takes the lowest token id among equal maxima (torch documents the first occurrence);
the repetition penalty follows transformers (a seen token's logit is divided by the penalty when positive,
multiplied when negative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qlora.lora.dropout import pcg_hash

_UNIT = 2.0**-24  # u = (24 hash bits + 0.5) * 2^-24: never 0 or 1


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings (validated on creation: errors name the field)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    stop: tuple[str, ...] = ()  # the output ends before the first of these strings
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's EOS
    seed: int = 0
    ignore_eos: bool = False  # run to max_new_tokens whatever is generated (benchmarks)

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            problems.append(f"stop must be non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            problems.append(f"stop_token_ids must be token ids, got {self.stop_token_ids!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            problems.append(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class BatchSampling:
    """Per-row sampling parameters of a batch of `rows` slots, as device tensors (updated in place when a
    slot is given to a new request, so a captured graph keeps reading them)."""

    temperature: torch.Tensor  # float32 [rows]; 0 = greedy
    top_p: torch.Tensor  # float32 [rows]
    top_k: torch.Tensor  # int64 [rows]; 0 = off
    penalty: torch.Tensor  # float32 [rows]
    seed: torch.Tensor  # int64 [rows, 2]: two 32-bit words
    seen: torch.Tensor  # bool [rows, vocab]: tokens of the prompt and the output (for the penalty)

    @classmethod
    def empty(cls, rows: int, vocab: int, device: torch.device) -> BatchSampling:
        f32 = dict(dtype=torch.float32, device=device)
        return cls(torch.zeros(rows, **f32), torch.ones(rows, **f32), torch.zeros(rows, dtype=torch.int64,
                   device=device), torch.ones(rows, **f32), torch.zeros(rows, 2, dtype=torch.int64, device=device),
                   torch.zeros(rows, vocab, dtype=torch.bool, device=device))  # fmt: skip

    def rows(self, row: int) -> BatchSampling:
        """Row `row` alone (views: writes reach this batch)."""
        return BatchSampling(*(t[row : row + 1] for t in (self.temperature, self.top_p, self.top_k, self.penalty,
                                                            self.seed, self.seen)))  # fmt: skip

    def assign(self, row: int, params: SamplingParams, prompt_ids: list[int]) -> None:
        """Give slot `row` to a request with `params` whose prompt is `prompt_ids`."""
        self.temperature[row] = params.temperature
        self.top_p[row] = params.top_p
        self.top_k[row] = params.top_k
        self.penalty[row] = params.repetition_penalty
        self.seed[row, 0], self.seed[row, 1] = params.seed & 0xFFFFFFFF, (params.seed >> 32) & 0xFFFFFFFF
        self.seen[row] = False
        if params.repetition_penalty != 1.0 and prompt_ids:
            self.seen[row, torch.tensor(prompt_ids, device=self.seen.device)] = True


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """g [rows, vocab] = -log(-log u), u a hash of (seed [rows, 2], step [rows], token id)."""
    ids = torch.arange(vocab, device=seed.device, dtype=torch.int64)[None]  # [1, V]
    words = 0xFFFFFFFF  # every hash input is kept to 32 bits (pcg_hash multiplies in int64)
    # nested, so that no two (seed, step) pairs or (key, token) pairs share an input (as `seed ^ step` would)
    row_key = pcg_hash((pcg_hash(pcg_hash(seed[:, 0]) ^ seed[:, 1]) + (step & words)) & words)  # [rows]
    h = pcg_hash(pcg_hash(ids) ^ row_key[:, None])  # [rows, V]
    u = ((h >> 8).to(torch.float32) + 0.5) * _UNIT
    return -torch.log(-torch.log(u))


def next_tokens(logits: torch.Tensor, sampling: BatchSampling, step: torch.Tensor, sample: bool = True
                ) -> torch.Tensor:  # fmt: skip
    """The next token of each row [rows] from `logits` [rows, V] (any float dtype; computed in float32) under
    each row's parameters; `step` [rows] is each row's count of tokens generated so far (the noise's index).
    `sample` False: every row is greedy (the caller knows), so the sort for top-k/top-p is skipped."""
    logits = logits.float()
    s = sampling
    penalised = torch.where(logits > 0, logits / s.penalty[:, None], logits * s.penalty[:, None])
    logits = torch.where(s.seen, penalised, logits)
    greedy = logits.argmax(dim=-1)
    if not sample:
        return greedy
    vocab = logits.shape[-1]
    scaled = logits / torch.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    # top-k: keep logits >= the k-th largest (k = 0: all)
    k = torch.where(s.top_k > 0, s.top_k.clamp(max=vocab), vocab)
    ordered, order = scaled.sort(dim=-1, descending=True)
    kth = ordered.gather(-1, (k - 1)[:, None])  # [rows, 1]
    # top-p over the sorted probabilities: keep a token while the mass before it is < top_p
    probs = torch.softmax(ordered, dim=-1)
    before = probs.cumsum(-1) - probs
    keep_sorted = (before < s.top_p[:, None]) & (ordered >= kth)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    noisy = torch.where(keep, scaled + gumbel_noise(s.seed, step, vocab), -torch.inf)
    sampled = noisy.argmax(dim=-1)
    return torch.where(s.temperature > 0, sampled, greedy)
