"""The LoRA dropout's mask as a hash of (seed, row, column): drawn again wherever it is needed, never stored.

Why. `torch.native_dropout` over an adapter's input x [N, in] writes the dropped copy and a bool mask
(5 bytes per element), which the `xd A^T` GEMM reads again and backward keeps: a measurable share of a
step (measured: docs/LOG.md, 2026-11-27 (sixth session)). A mask that is a pure function of a seed and
the element's position is applied on the fly by the kernels that read x anyway: `xd A^T` (forward and
checkpoint recompute), `(g B)^T xd` (A's gradient) and the masked input gradient
(`qlora.kernels.masked_lowrank`). Nothing [N, in] is written or saved: backward keeps x and the seed.

The mask. For the column pair (2k, 2k + 1) of row i, with seed (s0, s1), all arithmetic on 32-bit
unsigned integers, one hash gives both columns' draws (its low and high 16 bits):

    h = pcg(pcg(i ^ s0) + pcg(k ^ s1));  keep[i, 2k] = (h & 0xFFFF) >= t,  keep[i, 2k + 1] = (h >> 16) >= t

with t = round(p * 2^16); `pcg` is the PCG integer hash of Jarzynski and Olano, "Hash Functions for
GPU Rendering" (JCGT 2020), nested per dimension. Two draws per hash because the hash, not memory,
bounds the kernels (docs/LOG.md, 2026-11-27 (sixth session), item 1). Kept elements are scaled by
1 / (1 - t / 2^16), so the expectation is exact. The seed is two 32-bit words from torch's generator
on x's device (`HashedDropout.draw`): `torch.manual_seed` governs it, a checkpoint's recompute draws
the same one, a CUDA graph a new one at every replay. This is the adapter's only dropout, on every
path and device (`qlora.lora.layer`); `HashedDropout.keep` is the twin (torch integer ops).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

THRESHOLD_BITS = 16  # each draw: 16 bits of a hash
_MASK32 = 0xFFFFFFFF
PCG_MULTIPLIER, PCG_INCREMENT, PCG_OUTPUT_MULTIPLIER = 747796405, 2891336453, 277803737  # Jarzynski & Olano 2020


def pcg_hash(v: torch.Tensor) -> torch.Tensor:
    """The PCG hash of 32-bit values held in an int64 tensor (results in [0, 2^32))."""
    state = (v * PCG_MULTIPLIER + PCG_INCREMENT) & _MASK32
    word = (((state >> ((state >> 28) + 4)) ^ state) * PCG_OUTPUT_MULTIPLIER) & _MASK32
    return (word >> 22) ^ word


@dataclass(frozen=True)
class HashedDropout:
    """One dropout mask: its seed (int64 [2] holding two 32-bit words, on the data's device) and p."""

    seed: torch.Tensor
    p: float

    def __post_init__(self):
        if not 0.0 < self.p < 1.0:
            raise ValueError(f"dropout probability must be in (0, 1), got {self.p}")
        if self.seed.dtype != torch.int64 or self.seed.shape != (2,):
            raise ValueError(f"dropout seed must be an int64 tensor of shape (2,), got {self.seed.dtype} "
                             f"{tuple(self.seed.shape)}")  # fmt: skip

    @classmethod
    def draw(cls, p: float, device: torch.device | str) -> HashedDropout:
        """A fresh mask: two 32-bit words from torch's generator on `device` (no host read, graph-safe)."""
        return cls(torch.randint(0, 2**32, (2,), dtype=torch.int64, device=device), p)

    @property
    def threshold(self) -> int:
        """Elements whose 16-bit draw is below this are dropped."""
        return round(self.p * 2**THRESHOLD_BITS)

    @property
    def scale(self) -> float:
        """1 / the exact keep probability: kept elements are multiplied by it."""
        return 1.0 / (1.0 - self.threshold / 2**THRESHOLD_BITS)

    def keep(self, n_rows: int, n_cols: int) -> torch.Tensor:
        """The bool mask [n_rows, n_cols] (True: kept), computed with torch ops: the kernels' twin."""
        seed = self.seed.to(torch.int64) & _MASK32
        device = self.seed.device
        n_pairs = (n_cols + 1) // 2
        row_key = pcg_hash(torch.arange(n_rows, device=device, dtype=torch.int64) ^ seed[0])
        pair_key = pcg_hash(torch.arange(n_pairs, device=device, dtype=torch.int64) ^ seed[1])
        h = pcg_hash((row_key[:, None] + pair_key[None, :]) & _MASK32)  # [rows, pairs]
        draws = torch.stack((h & 0xFFFF, h >> 16), dim=-1).reshape(n_rows, 2 * n_pairs)  # columns 2k, 2k + 1
        return draws[:, :n_cols] >= self.threshold

    def multipliers(self, n_rows: int, n_cols: int, dtype: torch.dtype) -> torch.Tensor:
        """keep * scale as `dtype` [n_rows, n_cols]: what the dropout multiplies its input by."""
        return self.keep(n_rows, n_cols).to(dtype) * self.scale
