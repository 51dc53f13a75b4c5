"""Fused RMSNorm, forward and backward, with transformers' LlamaRMSNorm rounding order.

Twin: `qlora.model.llama.RMSNorm` (and `qlora.ops`' copy of its formula):

    h = fp32(x) * rsqrt(mean(fp32(x)^2) + eps)        (fp32)
    y = weight * h.to(x.dtype)                          (promoted dtype of weight and x,
                                                         or rounded once to `out_dtype` if given)

One program normalises a row held whole in registers (hidden sizes up to 16K fit), so x is read
once and y written once; the per-row 1/rms is saved for backward (4 bytes a row) instead of h.
Backward, with the cast treated as autograd does (its gradient passes straight through):

    dh = fp32(dy * weight)                              (rounded to x.dtype first, as autograd does)
    dx = rstd * (dh - h * mean(dh * h))
    dweight = sum over rows of dy * h.to(x.dtype)

Each backward program walks a stripe of rows and keeps its dweight partial sum in fp32 registers;
the partials [programs, D] are summed by torch. dweight is computed only when weight needs a gradient
(norm weights are frozen in QLoRA). Results are not bit-identical to torch (the row sum is reduced
in another order), so the tests state tolerances.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora.kernels import RMS_NORM_MAX_HIDDEN as MAX_HIDDEN
from qlora.kernels.rounding import emulate_rounding, round_to
from qlora.kernels.spare_columns import left_columns


@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, D, y_row_stride, eps, BLOCK_D: tl.constexpr,
                             EMULATE: tl.constexpr):  # fmt: skip
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32  # float64: for gradcheck
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=ok, other=0.0).to(ACC)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    h = round_to(x * rstd, x_ptr.dtype.element_ty, EMULATE).to(ACC)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(ACC)
    tl.store(y_ptr + row * y_row_stride + cols, round_to(w * h, y_ptr.dtype.element_ty, EMULATE), mask=ok)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_backward_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, D,
    ROWS_PER_PROGRAM: tl.constexpr, BLOCK_D: tl.constexpr, WANT_DW: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32  # float64: for gradcheck
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_D], dtype=ACC)
    for i in range(ROWS_PER_PROGRAM):
        row = pid.to(tl.int64) * ROWS_PER_PROGRAM + i
        if row < n_rows:
            x = tl.load(x_ptr + row * D + cols, mask=ok, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + row * D + cols, mask=ok, other=0.0).to(ACC)
            rstd = tl.load(rstd_ptr + row)
            h = x * rstd
            dh = round_to(dy * w, x_ptr.dtype.element_ty, EMULATE).to(ACC)
            dx = rstd * (dh - h * (tl.sum(dh * h, axis=0) / D))
            tl.store(dx_ptr + row * D + cols, round_to(dx, dx_ptr.dtype.element_ty, EMULATE), mask=ok)
            if WANT_DW:
                dw += dy * round_to(h, x_ptr.dtype.element_ty, EMULATE).to(ACC)
    if WANT_DW:
        tl.store(dw_partial_ptr + pid.to(tl.int64) * D + cols, dw, mask=ok)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_shape(D: int) -> tuple[int, int]:
    block = triton.next_power_of_2(D)
    return block, max(1, min(16, block // 256))


class RMSNormFunction(torch.autograd.Function):
    """y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype) over the last dimension."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None,
                row_width: int | None = None) -> torch.Tensor:  # fmt: skip
        D = x.shape[-1]
        if weight.shape != (D,):
            raise ValueError(f"RMSNorm weight of shape {tuple(weight.shape)} for inputs of last dimension {D}")
        if D > MAX_HIDDEN:
            raise ValueError(f"fused RMSNorm holds a row in registers: hidden size {D} > {MAX_HIDDEN}")
        x2 = x.reshape(-1, D).contiguous()  # [rows, D]
        out_dtype = out_dtype or torch.promote_types(weight.dtype, x.dtype)
        if row_width is not None and row_width < D:
            raise ValueError(f"rms_norm: row_width {row_width} is narrower than the rows ({D})")
        # row_width: y is the left columns of a [rows, row_width] matrix whose spare columns its consumer fills
        wide = torch.empty(x2.shape[0], row_width or D, dtype=out_dtype, device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=_accumulator(x.dtype), device=x.device)
        block, warps = _launch_shape(D)
        _rms_norm_forward_kernel[(x2.shape[0],)](x2, weight, wide, rstd, D, wide.shape[1], eps, BLOCK_D=block,
                                                 EMULATE=emulate_rounding(), num_warps=warps)  # fmt: skip
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        if wide.shape[1] == D:
            return wide.view(x.shape)
        return left_columns(wide.view(*x.shape[:-1], wide.shape[1]), D)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, D = x2.shape
        dy2 = dy.reshape(n_rows, D).contiguous()
        dx = torch.empty_like(x2)
        want_dw = ctx.needs_input_grad[1]
        # a power of two (capped), so few distinct values compile whatever the token count
        rows_per_program = min(64, triton.next_power_of_2(triton.cdiv(n_rows, 4 * _sm_count(x2.device))))
        programs = triton.cdiv(n_rows, rows_per_program)
        dw_partial = torch.empty((programs, D) if want_dw else (1,), dtype=_accumulator(x2.dtype), device=x2.device)
        block, warps = _launch_shape(D)
        _rms_norm_backward_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw_partial, n_rows, D,
                                               ROWS_PER_PROGRAM=rows_per_program, BLOCK_D=block, WANT_DW=want_dw,
                                               EMULATE=emulate_rounding(), num_warps=warps)  # fmt: skip
        dw = dw_partial.sum(0).to(weight.dtype) if want_dw else None
        return dx.view(ctx.x_shape), dw, None, None, None


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None,
             row_width: int | None = None) -> torch.Tensor:  # fmt: skip
    """Fused RMSNorm over the last dimension of `x` (see the module docstring for the exact formula).
    `row_width`: store the result as the left columns of a [..., row_width] matrix (for the adapter
    columns of the LoRA projections that read it; `qlora.kernels.spare_columns`)."""
    return RMSNormFunction.apply(x, weight, eps, out_dtype, row_width)
