"""One AdamW step for one parameter, in one pass: p, its gradient and both float32 moments read once.

Where it sits: `qlora.optim.in_backward` updates each layer's adapters during backward, as soon as their
gradients exist, inside the captured CUDA graph of the step. The multi-tensor path (`qlora.optim.adamw`)
takes the learning rate and bias corrections as python numbers, which a graph would freeze at capture;
here they come from a row of float32 coefficients in device memory (`adamw_coefficients`), rewritten
before each replay. One launch per parameter instead of ~8 multi-tensor passes: 22 bytes per bf16
parameter (2 + 2 + 4 + 4 read, 2 + 4 + 4 written) instead of ~100.

The arithmetic is torch's CUDA multi-tensor AdamW op for op (decay first; lerp's two-sided formula;
`v * b2 + (1 - b2) * (g * g)`; sqrt and the division by sqrt(1 - beta2^t) correctly rounded), so it
agrees with the multi-tensor path to a rounding: the compiler may contract a multiply and an add into
one fma, and torch's CPU addcmul multiplies in another order (tests allow ulp-scale differences). A
row whose `apply` is 0 stores nothing.

Twin: `qlora.ops.adamw_step_` with the same row (torch ops on 0-d tensors, capturable too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora.kernels.rounding import emulate_rounding, round_to

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, coef_ptr, n, BLOCK: tl.constexpr, EMULATE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    decay = tl.load(coef_ptr + 0)
    weight = tl.load(coef_ptr + 1)
    beta2 = tl.load(coef_ptr + 2)
    one_minus_beta2 = tl.load(coef_ptr + 3)
    sqrt_bc2 = tl.load(coef_ptr + 4)
    eps = tl.load(coef_ptr + 5)
    neg_step_size = tl.load(coef_ptr + 6)
    stored = tl.where(tl.load(coef_ptr + 7) != 0.0, n, 0)  # elements to store: all, or none for a dry row
    p = tl.load(p_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=inside, other=0.0)
    v = tl.load(v_ptr + offs, mask=inside, other=0.0)
    p = p * decay
    m = tl.where(weight < 0.5, m + weight * (g - m), g - (g - m) * (1.0 - weight))  # torch.lerp
    v = v * beta2 + one_minus_beta2 * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps
    p = p + neg_step_size * tl.div_rn(m, denom)
    store = offs < stored
    tl.store(m_ptr + offs, m, mask=store)
    tl.store(v_ptr + offs, v, mask=store)
    tl.store(p_ptr + offs, round_to(p, p_ptr.dtype.element_ty, EMULATE), mask=store)


def adamw_step_(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                coefficients: torch.Tensor) -> None:  # fmt: skip
    """In place on contiguous p (float32/bf16/fp16), exp_avg and exp_avg_sq (float32, p's numel), given grad
    (p's numel, any float dtype) and an 8-value float32 coefficient row on p's device."""
    n = p.numel()
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.numel() != n or not t.is_contiguous():
            raise ValueError(f"adamw_step_: {name} must be contiguous with {n} elements, got {tuple(t.shape)}")
    if not p.is_contiguous() or exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise ValueError("adamw_step_: p must be contiguous and the moments float32")
    if coefficients.dtype != torch.float32 or coefficients.numel() != 8 or not coefficients.is_contiguous():
        raise ValueError(f"adamw_step_: coefficients must be 8 contiguous float32 values, got "
                         f"{coefficients.dtype} {tuple(coefficients.shape)}")  # fmt: skip
    if n == 0:
        return
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](p, grad, exp_avg, exp_avg_sq, coefficients, n, BLOCK=BLOCK,
                                            EMULATE=emulate_rounding(), num_warps=NUM_WARPS)  # fmt: skip
