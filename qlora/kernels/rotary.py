"""Fused rotary position embedding (RoPE), forward and backward, bit-exact to the model's formula.

Twin: `qlora.model.llama.apply_rotary` (the `rotate_half` layout: a head's first half pairs with
its second half), for x [B, heads, T, hd] and cos/sin [B|1, T, hd] in x's dtype:

    y1 = x1 * c1 - x2 * s1        y2 = x2 * c2 + x1 * s2          (halves of the last dimension)

Torch rounds each product to x's dtype and then the sum, so the kernel does the same (each
product of two bf16/fp16 values is exact in fp32, so the rounded results agree bit for bit), and it
is compiled with `enable_fp_fusion=False` so fp32 inputs are not contracted into an FMA either.
The backward is the transposed rotation with the same roundings as autograd's:

    dx1 = dy1 * c1 + dy2 * s2     dx2 = dy2 * c2 - dy1 * s1

One program takes one (batch, position) and a group of heads, so cos/sin are read once for all of
them; x may be any strided view (the model passes q/k transposed from [B, T, heads, hd]) and the
output keeps x's memory layout. cos/sin get no gradient (they come from integer positions).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora.kernels.rounding import emulate_rounding, round_to

HEADS_PER_PROGRAM = 8  # 8 heads x 128 x bf16 = 4 KB of x per program: 16-byte vector loads with one warp (PTX checked)


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr, T, H, HALF,
    sxb, sxh, sxt, sxd, syb, syh, syt, syd, scb, sct, scd, ssb, sst, ssd,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32  # float64: for gradcheck
    bt = tl.program_id(0).to(tl.int64)
    b, t = bt // T, bt % T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    d = tl.arange(0, BLOCK_HALF)  # [BLOCK_HALF]
    d_ok = d < HALF
    c1 = tl.load(cos_ptr + b * scb + t * sct + d * scd, mask=d_ok, other=0.0).to(ACC)
    c2 = tl.load(cos_ptr + b * scb + t * sct + (d + HALF) * scd, mask=d_ok, other=0.0).to(ACC)
    s1 = tl.load(sin_ptr + b * ssb + t * sst + d * ssd, mask=d_ok, other=0.0).to(ACC)
    s2 = tl.load(sin_ptr + b * ssb + t * sst + (d + HALF) * ssd, mask=d_ok, other=0.0).to(ACC)
    ok = (heads[:, None] < H) & d_ok[None, :]
    x_row = x_ptr + b * sxb + t * sxt + heads[:, None].to(tl.int64) * sxh
    x1 = tl.load(x_row + d[None, :] * sxd, mask=ok, other=0.0).to(ACC)
    x2 = tl.load(x_row + (d[None, :] + HALF) * sxd, mask=ok, other=0.0).to(ACC)
    dtype = x_ptr.dtype.element_ty
    if BACKWARD:  # the transposed rotation: sin of the *other* half, opposite signs
        y1 = round_to(x1 * c1[None, :], dtype, EMULATE).to(ACC) + round_to(
            x2 * s2[None, :], dtype, EMULATE).to(ACC)  # fmt: skip
        y2 = round_to(x2 * c2[None, :], dtype, EMULATE).to(ACC) - round_to(
            x1 * s1[None, :], dtype, EMULATE).to(ACC)  # fmt: skip
    else:
        y1 = round_to(x1 * c1[None, :], dtype, EMULATE).to(ACC) - round_to(
            x2 * s1[None, :], dtype, EMULATE).to(ACC)  # fmt: skip
        y2 = round_to(x2 * c2[None, :], dtype, EMULATE).to(ACC) + round_to(
            x1 * s2[None, :], dtype, EMULATE).to(ACC)  # fmt: skip
    y_row = y_ptr + b * syb + t * syt + heads[:, None].to(tl.int64) * syh
    tl.store(y_row + d[None, :] * syd, round_to(y1, dtype, EMULATE), mask=ok)
    tl.store(y_row + (d[None, :] + HALF) * syd, round_to(y2, dtype, EMULATE), mask=ok)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    B, H, T, hd = x.shape
    y = torch.empty_like(x)  # same strides as x (dense views keep their layout)
    cos = cos.expand(B, T, hd)  # a broadcast batch gets stride 0
    sin = sin.expand(B, T, hd)
    half = hd // 2
    grid = (B * T, triton.cdiv(H, HEADS_PER_PROGRAM))
    _rotary_kernel[grid](x, cos, sin, y, T, H, half, *x.stride(), *y.stride(), *cos.stride(), *sin.stride(),
                         BLOCK_H=HEADS_PER_PROGRAM, BLOCK_HALF=triton.next_power_of_2(half), BACKWARD=backward,
                         EMULATE=emulate_rounding(), num_warps=1 if half <= 64 else 2,
                         enable_fp_fusion=False)  # fmt: skip
    return y


class RotaryFunction(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin for x [B, heads, T, hd], cos/sin [B|1, T, hd] (gradient to x only)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] % 2:
            raise ValueError(f"rotary embedding takes x [batch, heads, seq, even head_dim], got {tuple(x.shape)}")
        B, _, T, hd = x.shape
        for name, t in (("cos", cos), ("sin", sin)):
            if t.dim() != 3 or t.shape[0] not in (1, B) or tuple(t.shape[1:]) != (T, hd) or t.dtype != x.dtype:
                raise ValueError(f"rotary {name} must be {x.dtype} [1 or {B}, {T}, {hd}], got {t.dtype} "
                                 f"{tuple(t.shape)}")  # fmt: skip
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, backward=True), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [B, heads, T, hd] with cos/sin [B|1, T, hd] (see the module docstring)."""
    return RotaryFunction.apply(x, cos, sin)
