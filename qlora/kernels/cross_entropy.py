"""Cross-entropy over the vocabulary straight from 16-bit logits: no float32 copy, no softmax tensor.

Twin: `F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=-100)`, which is
what `qlora.train.loss` computes per chunk. That twin materialises the logits a second time in
float32 and autograd keeps the float32 log-softmax for backward: for a chunk of 2,048 rows of a
128,256-token vocabulary that is 2 x 1 GiB on top of the 0.5 GiB bf16 logits. Here:

- forward, one program per row, walks the vocabulary in tiles with an online softmax (running
  max m and running sum s of exp(x - m), rescaled when m grows), in float32 registers, and keeps
  only the row's log-sum-exp (4 bytes a row) and its loss. The vocabulary size is a compile-time
  constant (one compile per model; Triton 3.6's interpreter cannot loop to a runtime bound);
- backward walks the row again and writes `(softmax - onehot(label)) * grad` directly in the
  logits' dtype: the only [rows, vocab] tensor it allocates is the gradient itself.

Labels equal to `ignore_index` contribute zero loss and zero gradient; other labels outside
[0, vocab) are refused with an error, as torch does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora.kernels.rounding import emulate_rounding, round_to

IGNORE_INDEX = -100
BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _ce_forward_kernel(logits_ptr, labels_ptr, loss_ptr, lse_ptr, V: tl.constexpr, stride_row, ignore_index,
                       BLOCK_V: tl.constexpr):  # fmt: skip
    ACC: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32  # gradcheck
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), ACC)
    s = tl.full([], 0.0, ACC)
    for start in range(0, V, BLOCK_V):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    label = tl.load(labels_ptr + row)
    keep = label != ignore_index
    target = tl.load(base + tl.where(keep, label, 0)).to(ACC)
    tl.store(loss_ptr + row, tl.where(keep, lse - target, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _ce_backward_kernel(logits_ptr, labels_ptr, lse_ptr, grad_ptr, dlogits_ptr, V: tl.constexpr, stride_row,
                        ignore_index, BLOCK_V: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    ACC: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32  # gradcheck
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row)
    scale = tl.where(label != ignore_index, tl.load(grad_ptr), 0.0)  # d(sum of losses)/d(this row's loss)
    lse = tl.load(lse_ptr + row)
    for start in range(0, V, BLOCK_V):
        ok = start + cols < V
        x = tl.load(logits_ptr + row * stride_row + start + cols, mask=ok, other=0.0).to(ACC)
        p = tl.exp(x - lse)
        d = (p - tl.where(start + cols == label, 1.0, 0.0)) * scale
        tl.store(dlogits_ptr + row * V + start + cols, round_to(d, dlogits_ptr.dtype.element_ty, EMULATE), mask=ok)


class CrossEntropySumFunction(torch.autograd.Function):
    """Sum over rows of -log softmax(logits)[label] from logits [N, V]: float32 (float64 for float64 logits)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, block_v: int) -> torch.Tensor:
        if logits.dim() != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(f"cross_entropy_sum takes logits [N, V] and labels [N], got {tuple(logits.shape)} "
                             f"and {tuple(labels.shape)}")  # fmt: skip
        N, V = logits.shape
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        labels = labels.contiguous()
        # The label check reads a flag on the host; under CUDA-graph capture a host read is not allowed (and
        # the graph's inputs are checked before each replay instead, `qlora.train.cuda_graph`).
        if not (logits.is_cuda and torch.cuda.is_current_stream_capturing()):
            bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
            if bool(bad.any()):
                raise IndexError(f"label {int(labels[bad][0])} is outside the vocabulary [0, {V}) "
                                 f"(and is not ignore_index {ignore_index})")  # fmt: skip
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32  # float64: for gradcheck
        loss = torch.empty(N, dtype=acc, device=logits.device)
        lse = torch.empty(N, dtype=acc, device=logits.device)
        if N:
            _ce_forward_kernel[(N,)](logits, labels, loss, lse, V, logits.stride(0), ignore_index, BLOCK_V=block_v,
                                     num_warps=NUM_WARPS)  # fmt: skip
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index, ctx.block_v = ignore_index, block_v
        return loss.sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        N, V = logits.shape
        dlogits = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
        if N:
            grad = grad.to(lse.dtype).reshape(1).contiguous()
            _ce_backward_kernel[(N,)](logits, labels, lse, grad, dlogits, V, logits.stride(0), ctx.ignore_index,
                                      BLOCK_V=ctx.block_v, EMULATE=emulate_rounding(), num_warps=NUM_WARPS)  # fmt: skip
        return dlogits, None, None, None


def cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, *, block_v: int = BLOCK_V
) -> torch.Tensor:
    """Sum of token cross-entropies (float32 scalar); see the module docstring.

    `block_v` (a power of two) is the vocabulary tile; tests shrink it to cross tile edges on tiny inputs."""
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    return CrossEntropySumFunction.apply(logits, labels, ignore_index, block_v)
