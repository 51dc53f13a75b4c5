"""The dispatch point between layers and implementations: Triton kernels or plain-PyTorch twins.

Layers call `ops.dequantize(q, dtype, policy=...)`, `ops.rms_norm(..., policy=...)`, ... and never
ask which device they are on. Each call takes the model's `KernelPolicy` (`qlora.ops.policy`), which
picks:

- the Triton kernel (`qlora.kernels`) when the tensors are on CUDA and Triton is importable;
- otherwise the plain-PyTorch twin: the reference in `qlora.quant` for dequantization, and for the
  fused elementwise ops the same formula the model computes (tests/ops/test_dispatch.py checks the twins
  equal the model's own modules bit for bit, so the two cannot drift apart).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from qlora.kernels import RMS_NORM_MAX_HIDDEN
from qlora.ops.policy import KernelPolicy
from qlora.quant.tensor import QuantizedTensor


class DropoutMask(Protocol):
    """A dropout mask drawn from a seed (`qlora.lora.dropout.HashedDropout`): what the ops need of it."""

    seed: torch.Tensor
    threshold: int
    scale: float

    def keep(self, n_rows: int, n_cols: int) -> torch.Tensor: ...


# --- 4-bit dequantization ---------------------------------------------------------------------
def dequantize(
    q: QuantizedTensor, dtype: torch.dtype, out: torch.Tensor | None = None, *, policy: KernelPolicy
) -> torch.Tensor:
    """The dense weight of `q` in `dtype` (bit-identical whichever implementation runs).

    `out`: where to write it, `q.shape`, possibly a view into a wider matrix (the LoRA forward appends
    the adapter's columns to the weight); the kernel stores there directly when the rows are whole
    quantization blocks, otherwise the weight is dequantized and copied in.
    """
    if policy.uses_kernels(q.device):
        from qlora.kernels.dequantize import dequantize_4bit, row_strided_view_of

        if out is None or out.is_contiguous() or row_strided_view_of(out, q):
            return dequantize_4bit(q, dtype, out=out)
        return out.copy_(dequantize_4bit(q, dtype))  # rows not whole blocks; still the kernel (graph-safe)
    dense = q.dequantize(dtype)
    return dense if out is None else out.copy_(dense)


def reads_4bit_codes(x: torch.Tensor, *, policy: KernelPolicy) -> bool:
    """Whether `matmul_4bit` of this x multiplies straight from the packed codes (the kernel: few rows, a
    kernel device and dtype) rather than dequantizing W first."""
    if not policy.uses_kernels(x.device):
        return False
    from qlora.kernels.matmul_4bit import COMPUTE_DTYPES, MAX_ROWS

    return x.numel() <= MAX_ROWS * x.shape[-1] and x.dtype in COMPUTE_DTYPES


def matmul_4bit(x: torch.Tensor, qweight: QuantizedTensor, *, policy: KernelPolicy) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] in x's dtype, W = `qweight.dequantize(x.dtype)` [N, K] (a decoding step's
    projection). Up to `qlora.kernels.matmul_4bit.MAX_ROWS` rows (leading dimensions flattened) the kernel reads
    the packed codes once and never writes W; more rows, and the twin, dequantize W and multiply (the twin:
    `F.linear(x, qweight.dequantize(x.dtype))`). Each weight is the same bits either way; the fp32 sums are
    added in another order, so results agree to about one rounding of the output (tests/kernels/test_matmul_4bit.py)."""
    if reads_4bit_codes(x, policy=policy):
        from qlora.kernels.matmul_4bit import matmul_4bit as fused

        return fused(x, qweight)
    return F.linear(x, dequantize(qweight, x.dtype, policy=policy))


# --- fused elementwise ops of the decoder (twins: the model's own formulas) ----------------------
# Where a kernel does not cover the inputs (mixed dtypes, e.g. float32 cos/sin with bfloat16
# activations under autocast; rows wider than the RMSNorm kernel holds in registers) the twin runs:
# it promotes dtypes exactly as the model's formula does, so results never depend on the choice.
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None,
    row_width: int | None = None, *, policy: KernelPolicy,
) -> torch.Tensor:  # fmt: skip
    """transformers' LlamaRMSNorm: normalise in float32, cast back to x's dtype, then scale by weight;
    rounded once more to `out_dtype` if given (a float32 residual stream feeding bf16 matmuls).
    `row_width`: a hint, as for `swiglu` (the kernel stores the result inside wider rows; the twin ignores it)."""
    if policy.uses_kernels(x.device) and x.shape[-1] <= RMS_NORM_MAX_HIDDEN:
        from qlora.kernels.rms_norm import rms_norm as fused

        return fused(x, weight, eps, out_dtype, row_width)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(x.dtype)
    return y if out_dtype is None else y.to(out_dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, row_width: int | None = None, *, policy: KernelPolicy) -> torch.Tensor:
    """silu(gate) * up (the Llama MLP's activation).

    `row_width`, a hint: the kernel stores the result as the left columns of a [..., row_width] matrix,
    so that a LoRA consumer can put its adapter columns beside it without copying it
    (`LoRALinear.input_row_width`). The twin ignores it (a copy would cost what it saves)."""
    if policy.uses_kernels(gate.device) and gate.shape == up.shape and gate.dtype == up.dtype:
        from qlora.kernels.swiglu import swiglu as fused

        return fused(gate, up, row_width)
    return F.silu(gate) * up


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, policy: KernelPolicy) -> torch.Tensor:
    """RoPE, rotate_half layout: x [B, heads, T, hd], cos/sin [B|1, T, hd] -> x * cos + rotate_half(x) * sin."""
    if policy.uses_kernels(x.device) and cos.dtype == sin.dtype == x.dtype:
        from qlora.kernels.rotary import apply_rotary as fused

        return fused(x, cos, sin)
    cos, sin = cos[:, None], sin[:, None]  # [B|1, 1, T, hd]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *, policy: KernelPolicy
) -> torch.Tensor:
    """Sum over rows of the float32 cross-entropy of logits [N, V] against labels [N] (ignore_index skipped).

    The Triton path never makes a float32 copy of the logits nor keeps a softmax for backward."""
    if policy.uses_kernels(logits.device):
        from qlora.kernels.cross_entropy import cross_entropy_sum as fused

        return fused(logits, labels, ignore_index)
    return F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=ignore_index)


# --- the LoRA adapter's dropout: its input gradient, and the hashed mask's two products -------------
def add_masked_lowrank_(
    out: torch.Tensor, g: torch.Tensor, a: torch.Tensor, mask: DropoutMask | None, scale: float, *,
    policy: KernelPolicy,
) -> torch.Tensor:  # fmt: skip
    """out [N, in] += scale * drop(g [N, r] @ a [r, in]), in place, through the dropout `mask` (its keep and its
    own scale; None: no dropout, one addmm_). The kernel never writes the [N, in] product nor a mask."""
    if mask is None:
        return out.addmm_(g, a, alpha=scale)
    if policy.uses_kernels(out.device) and out.is_floating_point() and out.stride(-1) == 1:
        from qlora.kernels.masked_lowrank import add_masked_lowrank_ as fused

        return fused(out, g, a, None, scale * mask.scale, seed=mask.seed, threshold=mask.threshold)
    return out.addcmul_(g @ a, mask.keep(*out.shape), value=scale * mask.scale)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_project(x: torch.Tensor, a: torch.Tensor, mask: DropoutMask, *, policy: KernelPolicy) -> torch.Tensor:
    """drop(x) @ a^T, [N, r] in x's dtype: x [N, in] (rows may be strided), a [r, in] in x's dtype,
    drop(x) = mask.keep * x * mask.scale; rounded once. The kernel never writes drop(x)."""
    if policy.uses_kernels(x.device) and x.stride(-1) == 1:
        from qlora.kernels.hashed_dropout import dropout_project as fused

        return fused(x, a, mask.seed, mask.threshold, mask.scale)
    acc = _accumulator(x.dtype)
    dropped = x.to(acc) * mask.keep(*x.shape)
    return (dropped @ a.to(acc).t()).mul_(mask.scale).to(x.dtype)


def dropout_backward(
    g: torch.Tensor, x: torch.Tensor, mask: DropoutMask, out_dtype: torch.dtype = torch.float32,
    grad_x: torch.Tensor | None = None, a: torch.Tensor | None = None, *, policy: KernelPolicy,
) -> torch.Tensor:  # fmt: skip
    """g^T @ drop(x), [r, in] in `out_dtype`: the gradient of the A in `drop(x) @ A^T` given g, its output's
    gradient [N, r]; x [N, in] as for `dropout_project`, g in x's dtype. With `grad_x` [N, in] and `a`
    [r, in], also grad_x += drop(g @ a) in place (the input gradient through the mask; the kernel hashes
    the mask once for both)."""
    if policy.uses_kernels(x.device) and x.stride(-1) == 1 and (grad_x is None or grad_x.stride(-1) == 1):
        from qlora.kernels.hashed_dropout import dropout_backward as fused

        return fused(g, x, mask.seed, mask.threshold, mask.scale, out_dtype, grad_x, a, mask.scale)
    acc = _accumulator(x.dtype)
    keep = mask.keep(*x.shape)
    if grad_x is not None:
        grad_x.addcmul_(g @ a, keep, value=mask.scale)
    return (g.to(acc).t() @ (x.to(acc) * keep)).mul_(mask.scale).to(out_dtype)


# --- the adapter's columns beside a wider matrix's left part -------------------------------------
def copy_into_columns_(
    dst: torch.Tensor, src: torch.Tensor, scale: float = 1.0, *, policy: KernelPolicy
) -> torch.Tensor:
    """dst [R, C]: its first c columns = scale * src [R, c] (rounded once), the rest zero; dst is
    typically the spare columns of a wider matrix (B beside W, h beside x).

    The kernel runs only in graph steps (`KernelPolicy.graph_step_kernels`), where its launch is paid once;
    an eager step is bound by the host's launches, and Triton's launcher costs more host time than the
    kernel saves GPU time (docs/LOG.md, fourth session). Kernel and twin agree bit for bit, so a step
    computes the same either way."""
    if dst.stride(-1) == 1 and dst.is_floating_point() and policy.graph_step_kernels(dst.device):
        from qlora.kernels.columns_copy import copy_into_columns_ as fused

        return fused(dst, src, scale)
    n = src.shape[1]
    dst[:, :n].copy_(src if scale == 1.0 else src.to(torch.float32) * scale)
    dst[:, n:].zero_()
    return dst


# --- one AdamW step whose numbers live in device memory (graph-capturable) --------------------------
def adamw_step_(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                coefficients: torch.Tensor, *, policy: KernelPolicy) -> None:  # fmt: skip
    """AdamW in place on p and its float32 moments (all of p's shape and contiguous), the step's numbers
    taken from `coefficients` (float32 [8] on p's device, `qlora.optim.adamw.adamw_coefficients`).

    Twin: the kernel's formula with torch ops on the row's 0-d tensors (no host read, so it can be
    captured as well); a row whose `apply` is 0 changes nothing."""
    if policy.uses_kernels(p.device):
        from qlora.kernels.adamw import adamw_step_ as fused

        return fused(p, grad, exp_avg, exp_avg_sq, coefficients)
    decay, weight, beta2, one_minus_beta2, sqrt_bc2, eps, neg_step_size, apply = coefficients.unbind()
    g = grad.view(p.shape).float()
    m, v = exp_avg.view(p.shape), exp_avg_sq.view(p.shape)
    w = p.float() * decay
    m_new = torch.lerp(m, g, weight)
    v_new = v * beta2 + one_minus_beta2 * (g * g)
    w = w + neg_step_size * (m_new / (v_new.sqrt() / sqrt_bc2 + eps))
    keep = apply != 0
    m.copy_(torch.where(keep, m_new, m))
    v.copy_(torch.where(keep, v_new, v))
    p.copy_(torch.where(keep, w.to(p.dtype), p))
