"""`out += scale * keep * (g @ a)` in one pass: the LoRA adapter's input gradient through its dropout.

Where it sits. With dropout, the adapter's contribution to dL/dx is `keep / (1 - p) * ((g B) A)`:
g B is [N, r], A is [r, in], keep the dropout's mask [N, in]. Unfused that is a GEMM writing
(g B) A as an [N, in] tensor, the dropout's backward reading it with the mask and writing another,
and autograd adding that into the base's gradient g W: 13 bytes moved per [N, in] element. Here
each program multiplies a [BLOCK_M, r] row block of g B by an [r, BLOCK_N] column block of A
(r is small, so the product is a few MMA steps from registers), reads the mask and the base's
gradient once, and writes the sum once: 5 bytes per element (bf16 gradient, bool mask). With the
hashed mask (`qlora.lora.dropout`, `HASHED`) the mask is drawn again from its seed instead: 4 bytes.

Twin: `out.addcmul_(g @ a, keep, value=scale)` (`qlora.ops.add_masked_lowrank_`). The kernel keeps
the product in float32 where the twin rounds it to the compute dtype first, so bf16 results differ
by that rounding (tests/kernels/test_masked_lowrank.py bounds it against a float64 reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora.kernels.hashed_dropout import check_mask, dot_accumulate, dropout_keep
from qlora.kernels.rounding import emulate_rounding, round_to

# tiles: the fastest of bench/masked_lowrank.py at 2,048 tokens (measured: docs/LOG.md, 2026-11-27 (fourth
# session), item 1; the other tiles' figures in docs/design-notes.md)
BLOCK_M = 32
BLOCK_N = 128
NUM_WARPS = 4


@triton.jit(do_not_specialize=["threshold"])  # an argument equal to 1 would become a constant without .to
def _masked_lowrank_add_kernel(
    out_ptr, g_ptr, a_ptr, keep_ptr, seed_ptr, threshold, n_rows, n_cols, scale,
    stride_out, stride_g, stride_a, stride_keep,
    RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, HASHED: tl.constexpr,
    EMULATE: tl.constexpr,
):  # fmt: skip
    ACC: tl.constexpr = tl.float64 if out_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < n_rows, cols < n_cols
    product = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in tl.static_range(0, RANK, BLOCK_R):  # the rank is a compile-time constant (one per model)
        ks = k0 + tl.arange(0, BLOCK_R)
        k_ok = ks < RANK
        g = tl.load(g_ptr + rows[:, None] * stride_g + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptr + ks[:, None] * stride_a + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        product = dot_accumulate(g, a, product, EMULATE)
    ok = row_ok[:, None] & col_ok[None, :]
    if HASHED:  # the mask drawn again from its seed (qlora.lora.dropout), never stored
        keep = dropout_keep(seed_ptr, rows, tl.program_id(1).to(tl.int64) * BLOCK_N, threshold, BLOCK_N).to(ACC)
    else:
        keep = tl.load(keep_ptr + rows[:, None] * stride_keep + cols[None, :], mask=ok, other=0).to(ACC)
    out_at = out_ptr + rows[:, None] * stride_out + cols[None, :]
    total = tl.load(out_at, mask=ok, other=0.0).to(ACC) + product * keep * scale
    tl.store(out_at, round_to(total, out_ptr.dtype.element_ty, EMULATE), mask=ok)


def add_masked_lowrank_(
    out: torch.Tensor, g: torch.Tensor, a: torch.Tensor, keep: torch.Tensor | None, scale: float,
    seed: torch.Tensor | None = None, threshold: int = 0,
) -> torch.Tensor:  # fmt: skip
    """out [N, in] += scale * keep * (g [N, r] @ a [r, in]), in place; keep is a bool mask or a float
    tensor of out's shape, or None with `seed` and `threshold` (the hashed mask, `qlora.lora.dropout`);
    g and a of out's dtype. Rows must be unit-stride along the last dimension."""
    n_rows, n_cols = out.shape
    rank = g.shape[1]
    hashed = keep is None
    if hashed:
        check_mask(seed, threshold, out.device, "add_masked_lowrank_ without a mask")
    if g.shape[0] != n_rows or a.shape != (rank, n_cols) or (not hashed and keep.shape != out.shape):
        raise ValueError(f"add_masked_lowrank_: out {tuple(out.shape)}, g {tuple(g.shape)}, a {tuple(a.shape)}, keep "
                         f"{None if hashed else tuple(keep.shape)} do not line up as [N, in] += [N, r] @ [r, in] * "
                         "[N, in]")  # fmt: skip
    if g.dtype != out.dtype or a.dtype != out.dtype:
        raise ValueError(f"add_masked_lowrank_ needs g and a in out's dtype {out.dtype}, got {g.dtype} and {a.dtype}")
    g, a = g.contiguous(), a.contiguous()
    if hashed:
        keep = seed  # not read (HASHED); any pointer will do
    elif keep.dtype == torch.bool:
        keep = keep.view(torch.uint8)
    for name, t in (("out", out), ("keep", keep)):
        if t.stride(-1) != 1:
            raise ValueError(f"add_masked_lowrank_: {name} must have unit stride along its last dimension")
    block_r = max(16, min(64, triton.next_power_of_2(rank)))
    grid = (triton.cdiv(n_rows, BLOCK_M), triton.cdiv(n_cols, BLOCK_N))
    _masked_lowrank_add_kernel[grid](
        out, g, a, keep, seed if hashed else keep, int(threshold), n_rows, n_cols, float(scale), out.stride(0),
        g.stride(0), a.stride(0), 0 if hashed else keep.stride(0),
        RANK=rank, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=block_r, HASHED=hashed, EMULATE=emulate_rounding(),
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return out
