"""The one dispatch point between layers and implementations: Triton kernels or plain-PyTorch twins.

Layers call `ops.dequantize(q, dtype)`, `ops.rms_norm(...)`, ... and never ask which device they
are on. For each call this module picks:

- the Triton kernel (`qlora.kernels`) when the tensors are on CUDA and Triton is importable;
- otherwise the plain-PyTorch twin: the reference in `qlora.quant` for dequantization, and for the
  fused elementwise ops the same formula the model computes (tests/kernels/test_ops.py checks the
  twins equal the model's own modules bit for bit, so the two cannot drift apart).

The choice can be forced, for a whole process by the environment variable `QLORA_KERNELS`
(`auto`, the default; `torch` for the twins everywhere; `triton` to require the kernels and fail
loudly where they cannot run) or for a block of code by `use_implementation(...)`, which wins
over the variable. `triton` on a CPU tensor runs the kernel in Triton's interpreter when
TRITON_INTERPRET=1 is set (how the CPU tests exercise this dispatch); `auto` never does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F

from qlora.kernels import RMS_NORM_MAX_HIDDEN, interpreting, triton_importable
from qlora.quant.tensor import QuantizedTensor



class DropoutMask(Protocol):
    """A dropout mask drawn from a seed (`qlora.lora.dropout.HashedDropout`): what the ops need of it."""

    seed: torch.Tensor
    threshold: int
    scale: float

    def keep(self, n_rows: int, n_cols: int) -> torch.Tensor: ...


ENV_VAR = "QLORA_KERNELS"
CHOICES = ("auto", "torch", "triton")
_ALIASES = {"reference": "torch"}  # the quant floor calls the twin "the reference"
# The innermost `use_implementation` choice, for the whole process: not thread-local, because the
# backward of CUDA tensors runs on autograd's own device threads (a thread-local choice would not
# reach them, and a checkpointed layer would be recomputed with other kernels than its forward ran).
# list.append / list.pop are atomic, so opening and closing blocks needs no lock.
_forced: list[str] = []
_graph_paths: list[bool] = []  # non-empty inside `graph_paths()`; process-wide for the same reason


@contextlib.contextmanager
def graph_paths() -> Iterator[None]:
    """Inside, ops take the paths a captured CUDA graph takes, in eager code too: for the warm-up runs
    before a capture (`qlora.train.cuda_graph`), so the graph's kernels compile, and their buffers are
    allocated, outside the capture, and the warm-ups run what the graph will."""
    _graph_paths.append(True)
    try:
        yield
    finally:
        _graph_paths.pop()


def in_graph_step(device: torch.device | str) -> bool:
    """True while `device`'s current stream is capturing a CUDA graph, or inside `graph_paths()`."""
    if _graph_paths:
        return True
    device = torch.device(device)
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def use_implementation(name: str) -> Iterator[None]:
    """Force "torch" (alias "reference"), "triton" or "auto" while the block runs, in every thread of the
    process (so the backward passes run inside the block see it too); overrides QLORA_KERNELS."""
    choice = _ALIASES.get(name, name)
    if choice not in CHOICES:
        raise ValueError(f"implementation must be one of {CHOICES} (or 'reference'), got {name!r}")
    _forced.append(choice)
    try:
        yield
    finally:
        _forced.pop()


def requested_implementation() -> str:
    """The choice in force ("auto", "torch" or "triton"): innermost `use_implementation`, else $QLORA_KERNELS."""
    forced = _forced[-1:]  # one slice: safe against a block closing on another thread
    if forced:
        return forced[0]
    raw = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    choice = _ALIASES.get(raw, raw)
    if choice not in CHOICES:
        raise ValueError(f"environment variable {ENV_VAR}={raw!r}: expected one of {CHOICES}")
    return choice


def implementation_for(device: torch.device | str) -> str:
    """What an op on a tensor on `device` runs: "triton" or "torch"."""
    device_type = torch.device(device).type
    choice = requested_implementation()
    if choice == "torch":
        return "torch"
    runnable = triton_importable() and (device_type == "cuda" or (device_type == "cpu" and interpreting()))
    if choice == "triton":
        if not runnable:
            why = f"tensors are on {device_type} (Triton needs CUDA, or TRITON_INTERPRET=1 for CPU tensors)"
            if not triton_importable():
                why = "triton is not installed"
            raise RuntimeError(f"{ENV_VAR}/use_implementation asked for the Triton kernels, but {why}")
        return "triton"
    return "triton" if runnable and device_type == "cuda" else "torch"


# --- 4-bit dequantization ---------------------------------------------------------------------
def dequantize(q: QuantizedTensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight of `q` in `dtype` (bit-identical whichever implementation runs).

    `out`: where to write it, `q.shape`, possibly a view into a wider matrix (the LoRA forward appends
    the adapter's columns to the weight); the kernel stores there directly when the rows are whole
    quantization blocks, otherwise the weight is dequantized and copied in.
    """
    if implementation_for(q.device) == "triton":
        from qlora.kernels.dequantize import dequantize_4bit, row_strided_view_of

        if out is None or out.is_contiguous() or row_strided_view_of(out, q):
            return dequantize_4bit(q, dtype, out=out)
        return out.copy_(dequantize_4bit(q, dtype))  # rows not whole blocks; still the kernel (graph-safe)
    dense = q.dequantize(dtype)
    return dense if out is None else out.copy_(dense)


# --- fused elementwise ops of the decoder (twins: the model's own formulas) ----------------------
# Where a kernel does not cover the inputs (mixed dtypes, e.g. float32 cos/sin with bfloat16
# activations under autocast; rows wider than the RMSNorm kernel holds in registers) the twin runs:
# it promotes dtypes exactly as the model's formula does, so results never depend on the choice.
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None,
    row_width: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """transformers' LlamaRMSNorm: normalise in float32, cast back to x's dtype, then scale by weight;
    rounded once more to `out_dtype` if given (a float32 residual stream feeding bf16 matmuls).
    `row_width`: a hint, as for `swiglu` (the kernel stores the result inside wider rows; the twin ignores it)."""
    if implementation_for(x.device) == "triton" and x.shape[-1] <= RMS_NORM_MAX_HIDDEN:
        from qlora.kernels.rms_norm import rms_norm as fused

        return fused(x, weight, eps, out_dtype, row_width)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(x.dtype)
    return y if out_dtype is None else y.to(out_dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, row_width: int | None = None) -> torch.Tensor:
    """silu(gate) * up (the Llama MLP's activation).

    `row_width`, a hint: the kernel stores the result as the left columns of a [..., row_width] matrix,
    so that a LoRA consumer can put its adapter columns beside it without copying it
    (`LoRALinear.input_row_width`). The twin ignores it (a copy would cost what it saves)."""
    if implementation_for(gate.device) == "triton" and gate.shape == up.shape and gate.dtype == up.dtype:
        from qlora.kernels.swiglu import swiglu as fused

        return fused(gate, up, row_width)
    return F.silu(gate) * up


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, rotate_half layout: x [B, heads, T, hd], cos/sin [B|1, T, hd] -> x * cos + rotate_half(x) * sin."""
    if implementation_for(x.device) == "triton" and cos.dtype == sin.dtype == x.dtype:
        from qlora.kernels.rotary import apply_rotary as fused

        return fused(x, cos, sin)
    cos, sin = cos[:, None], sin[:, None]  # [B|1, 1, T, hd]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sum over rows of the float32 cross-entropy of logits [N, V] against labels [N] (ignore_index skipped).

    The Triton path never makes a float32 copy of the logits nor keeps a softmax for backward."""
    if implementation_for(logits.device) == "triton":
        from qlora.kernels.cross_entropy import cross_entropy_sum as fused

        return fused(logits, labels, ignore_index)
    return F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=ignore_index)


# --- the LoRA adapter's dropout: its input gradient, and the hashed mask's two products -------------
def add_masked_lowrank_(
    out: torch.Tensor, g: torch.Tensor, a: torch.Tensor, keep: torch.Tensor | DropoutMask, scale: float
) -> torch.Tensor:
    """out [N, in] += scale * keep * (g [N, r] @ a [r, in]), in place (keep: the dropout's bool mask, or
    its float multipliers with scale 1, or a `DropoutMask`, whose own scale is then applied too).
    The kernel never writes the [N, in] product (nor, hashed, reads a mask)."""
    hashed = not isinstance(keep, torch.Tensor)
    if implementation_for(out.device) == "triton" and out.is_floating_point() and out.stride(-1) == 1:
        from qlora.kernels.masked_lowrank import add_masked_lowrank_ as fused

        if hashed:
            return fused(out, g, a, None, scale * keep.scale, seed=keep.seed, threshold=keep.threshold)
        return fused(out, g, a, keep, scale)
    if hashed:
        keep, scale = keep.keep(*out.shape), scale * keep.scale
    return out.addcmul_(g @ a, keep, value=scale)


def graph_step_kernels(device: torch.device | str) -> bool:
    """Whether the kernels that pay only in graph steps run now on `device`: where the kernels run, in
    graph steps (`in_graph_step`: every training step on CUDA replays one) or when "triton" is forced.
    In an eager CUDA step each such kernel costs ~70 us of Triton's Python launcher, and an eager step
    is host-bound, so the twins (or torch's own ops) run there instead. Two users:
    `copy_into_columns_` (kernel and twin agree bit for bit), and the LoRA dropout (`qlora.lora`): the
    hashed mask (`qlora.lora.dropout`) where this holds, torch's dropout otherwise (7B 4 x 512 eager:
    2,841 -> 2,123 tokens/s with the hashed mask, H100, docs/LOG.md sixth session); the mask is chosen
    per forward and kept for its backward and recompute, so a step never mixes the two."""
    if implementation_for(device) != "triton":
        return False
    return requested_implementation() == "triton" or in_graph_step(device)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_project(x: torch.Tensor, a: torch.Tensor, mask: DropoutMask) -> torch.Tensor:
    """drop(x) @ a^T, [N, r] in x's dtype: x [N, in] (rows may be strided), a [r, in] in x's dtype,
    drop(x) = mask.keep * x * mask.scale; rounded once. The kernel never writes drop(x)."""
    if implementation_for(x.device) == "triton" and x.stride(-1) == 1:
        from qlora.kernels.hashed_dropout import dropout_project as fused

        return fused(x, a, mask.seed, mask.threshold, mask.scale)
    acc = _accumulator(x.dtype)
    dropped = x.to(acc) * mask.keep(*x.shape)
    return (dropped @ a.to(acc).t()).mul_(mask.scale).to(x.dtype)


def dropout_backward(
    g: torch.Tensor, x: torch.Tensor, mask: DropoutMask, out_dtype: torch.dtype = torch.float32,
    grad_x: torch.Tensor | None = None, a: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """g^T @ drop(x), [r, in] in `out_dtype`: the gradient of the A in `drop(x) @ A^T` given g, its output's
    gradient [N, r]; x [N, in] as for `dropout_project`, g in x's dtype. With `grad_x` [N, in] and `a`
    [r, in], also grad_x += drop(g @ a) in place (the input gradient through the mask; the kernel hashes
    the mask once for both)."""
    if implementation_for(x.device) == "triton" and x.stride(-1) == 1 and (grad_x is None or grad_x.stride(-1) == 1):
        from qlora.kernels.hashed_dropout import dropout_backward as fused

        return fused(g, x, mask.seed, mask.threshold, mask.scale, out_dtype, grad_x, a, mask.scale)
    acc = _accumulator(x.dtype)
    keep = mask.keep(*x.shape)
    if grad_x is not None:
        grad_x.addcmul_(g @ a, keep, value=mask.scale)
    return (g.to(acc).t() @ (x.to(acc) * keep)).mul_(mask.scale).to(out_dtype)


# --- the adapter's columns beside a wider matrix's left part -------------------------------------
def copy_into_columns_(dst: torch.Tensor, src: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """dst [R, C]: its first c columns = scale * src [R, c] (rounded once), the rest zero; dst is
    typically the spare columns of a wider matrix (B beside W, h beside x).

    The kernel runs only in graph steps (`graph_step_kernels`), where its launch is paid once: it saves
    ~3 us of GPU time a copy, while Triton's Python launcher costs ~70 us of host time a call, and an
    eager step is host-bound (docs/LOG.md, fourth session). Kernel and twin agree bit for bit, so a step
    computes the same either way."""
    if dst.stride(-1) == 1 and dst.is_floating_point() and graph_step_kernels(dst.device):
        from qlora.kernels.columns_copy import copy_into_columns_ as fused

        return fused(dst, src, scale)
    n = src.shape[1]
    dst[:, :n].copy_(src if scale == 1.0 else src.to(torch.float32) * scale)
    dst[:, n:].zero_()
    return dst


# --- one AdamW step whose numbers live in device memory (graph-capturable) --------------------------
def adamw_step_(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                coefficients: torch.Tensor) -> None:  # fmt: skip
    """AdamW in place on p and its float32 moments (all of p's shape and contiguous), the step's numbers
    taken from `coefficients` (float32 [8] on p's device, `qlora.optim.adamw.adamw_coefficients`).

    Twin: the kernel's formula with torch ops on the row's 0-d tensors (no host read, so it can be
    captured as well); a row whose `apply` is 0 changes nothing."""
    if implementation_for(p.device) == "triton":
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
