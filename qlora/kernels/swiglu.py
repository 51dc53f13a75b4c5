"""Fused SwiGLU activation `silu(gate) * up`, forward and backward, in one pass over memory each.

Twin: `F.silu(gate) * up`, as `qlora.model.llama.MLP` computes it. Unfused, autograd keeps
`silu(gate)` as an extra [tokens, intermediate] tensor and runs five elementwise kernels; here the
forward reads gate and up and writes y, and the backward recomputes silu(gate) from gate (saved
anyway) and writes both gradients in one pass. Roundings are placed where torch places them, so
bf16 results differ from the twin only by exp/division rounding inside silu:

    s  = dtype(g / (1 + exp(-g)))                  y  = dtype(s * u)
    ds = dtype(dy * u)                             du = dtype(dy * s)
    dg = dtype(ds * sig * (1 + g * (1 - sig)))     with sig = 1 / (1 + exp(-g))   (all in fp32)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora.kernels.rounding import emulate_rounding, round_to
from qlora.kernels.spare_columns import left_columns

BLOCK = 2048
ROW_BLOCK = 1024  # the row-strided store: one program per 1024 columns of a row (11008 = 10.75 blocks)
NUM_WARPS = 8


@triton.jit
def _swiglu_forward_kernel(g_ptr, u_ptr, y_ptr, n, d, y_row_stride, BLOCK: tl.constexpr, ROW_STRIDED: tl.constexpr,
                           EMULATE: tl.constexpr):  # fmt: skip
    ACC: tl.constexpr = tl.float64 if g_ptr.dtype.element_ty == tl.float64 else tl.float32  # float64: for gradcheck
    if ROW_STRIDED:  # one block of one row per program; rows of y are y_row_stride apart (a wider matrix)
        blocks_per_row = tl.cdiv(d, BLOCK)
        row = tl.program_id(0).to(tl.int64) // blocks_per_row
        cols = (tl.program_id(0) % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < d
        offs = row * d + cols
        y_at = row * y_row_stride + cols
    else:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        y_at = offs
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(ACC)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(ACC)
    s = round_to(g / (1.0 + tl.exp(-g)), g_ptr.dtype.element_ty, EMULATE).to(ACC)
    tl.store(y_ptr + y_at, round_to(s * u, y_ptr.dtype.element_ty, EMULATE), mask=ok)


@triton.jit
def _swiglu_backward_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr, EMULATE: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if g_ptr.dtype.element_ty == tl.float64 else tl.float32  # float64: for gradcheck
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(ACC)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(ACC)
    sig = 1.0 / (1.0 + tl.exp(-g))
    s = round_to(g / (1.0 + tl.exp(-g)), g_ptr.dtype.element_ty, EMULATE).to(ACC)
    ds = round_to(dy * u, g_ptr.dtype.element_ty, EMULATE).to(ACC)
    tl.store(dg_ptr + offs, round_to(ds * sig * (1.0 + g * (1.0 - sig)), dg_ptr.dtype.element_ty, EMULATE), mask=ok)
    tl.store(du_ptr + offs, round_to(dy * s, du_ptr.dtype.element_ty, EMULATE), mask=ok)


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up for two tensors of one shape and dtype."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, row_width: int | None = None) -> torch.Tensor:
        if gate.shape != up.shape or gate.dtype != up.dtype:
            raise ValueError(f"swiglu needs gate and up of one shape and dtype, got {gate.dtype} "
                             f"{tuple(gate.shape)} and {up.dtype} {tuple(up.shape)}")  # fmt: skip
        gate, up = gate.contiguous(), up.contiguous()
        d = gate.shape[-1]
        if row_width is not None and row_width < d:
            raise ValueError(f"swiglu: row_width {row_width} is narrower than the rows ({d})")
        if row_width is None or row_width == d:
            y = wide = torch.empty_like(gate)
        else:  # y is the left columns of a [..., row_width] matrix whose spare columns its consumer fills
            wide = torch.empty(*gate.shape[:-1], row_width, dtype=gate.dtype, device=gate.device)
            y = left_columns(wide, d)
        n = gate.numel()
        strided = wide is not y
        block = ROW_BLOCK if strided else BLOCK
        grid = (n // d * triton.cdiv(d, block) if strided else triton.cdiv(n, block),)
        _swiglu_forward_kernel[grid](gate, up, wide, n, d, wide.shape[-1], BLOCK=block, ROW_STRIDED=strided,
                                     EMULATE=emulate_rounding(), num_warps=NUM_WARPS)  # fmt: skip
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_backward_kernel[(triton.cdiv(n, BLOCK),)](dy, gate, up, dg, du, n, BLOCK=BLOCK,
                                                          EMULATE=emulate_rounding(), num_warps=NUM_WARPS)  # fmt: skip
        return dg, du, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, row_width: int | None = None) -> torch.Tensor:
    """silu(gate) * up, fused (see the module docstring). `row_width`: store the result as the left
    columns of a [..., row_width] matrix (a LoRA consumer puts its adapter columns beside it)."""
    return SwiGLUFunction.apply(gate, up, row_width)
