"""`dst[:, :c] = scale * src; dst[:, c:] = 0` for a few columns of a wider matrix, in one vectorised pass.

Where it sits: the LoRA forward writes the adapter's B (float32, scaled, as bf16) into the spare
columns of the dequantized weight `[W | B]`, and h into those of its input `[x | h]`
(`qlora.lora.matmul`). Both are narrow ([rows, r + pad]) and strided (rows in + r + pad apart):
torch's copy takes its generic element-by-element kernel for such a destination (measured: docs/LOG.md,
2026-11-27 (fourth session), item 3), while here each program stores whole rows of the block with
16-byte vectors. The scale rides along for free, so h needs no separate multiply.

Twin: `dst[:, :c].copy_(src * scale); dst[:, c:].zero_()` (`qlora.ops.copy_into_columns_`); both
round `float32(src) * scale` once to dst's dtype, so they agree bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora.kernels.rounding import emulate_rounding, round_to

BLOCK_ROWS = 32
NUM_WARPS = 4


@triton.jit
def _columns_copy_kernel(dst_ptr, src_ptr, n_rows, n_src_cols, n_dst_cols, dst_row_stride, src_row_stride, scale,
                         BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    in_dst = (rows[:, None] < n_rows) & (cols[None, :] < n_dst_cols)
    from_src = in_dst & (cols[None, :] < n_src_cols)
    src = tl.load(src_ptr + rows[:, None] * src_row_stride + cols[None, :], mask=from_src, other=0.0)
    value = src.to(tl.float32) * scale
    tl.store(dst_ptr + rows[:, None] * dst_row_stride + cols[None, :],
             round_to(value, dst_ptr.dtype.element_ty, EMULATE), mask=in_dst)  # fmt: skip


def copy_into_columns_(dst: torch.Tensor, src: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """dst [R, C] (unit column stride, any row stride): its first c columns = scale * src [R, c], the rest 0."""
    n_rows, n_dst_cols = dst.shape
    if src.dim() != 2 or src.shape[0] != n_rows or src.shape[1] > n_dst_cols:
        raise ValueError(f"copy_into_columns_: src {tuple(src.shape)} does not fit the left columns of dst "
                         f"{tuple(dst.shape)}")  # fmt: skip
    if dst.stride(1) != 1:
        raise ValueError("copy_into_columns_: dst must have unit stride along its last dimension")
    src = src if src.stride(-1) == 1 else src.contiguous()
    grid = (triton.cdiv(n_rows, BLOCK_ROWS),)
    _columns_copy_kernel[grid](dst, src, n_rows, src.shape[1], n_dst_cols, dst.stride(0), src.stride(0), float(scale),
                               BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=triton.next_power_of_2(n_dst_cols),
                               EMULATE=emulate_rounding(), num_warps=NUM_WARPS)  # fmt: skip
    return dst
