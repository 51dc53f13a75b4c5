"""The AdamW update in float32, written op for op like `torch.optim.AdamW`.

Every optimizer in `qlora.optim` (32-bit or 8-bit states, paged or not) ends in this one function,
so they all share the same maths and `paged_adamw_32bit` equals `torch.optim.AdamW` on the CPU
bit for bit (the tests check rtol 1e-5 / atol 1e-6; in practice the difference is zero). It runs
on lists of tensors with torch's multi-tensor (`_foreach`) ops, elementwise the same operations as
the one-tensor path: a resident optimizer updates all its parameters in ~8 launches instead of ~8
per tensor (a 7B model's LoRA has 448); one tensor is a list of one.

With step t (counted from 1), lr, betas (b1, b2), eps and weight decay wd:

    p <- p * (1 - lr * wd)                      decoupled weight decay, applied FIRST (torch's order)
    m <- m + (1 - b1) * (g - m)                 (torch.lerp)
    v <- b2 * v + (1 - b2) * g * g
    c1 = 1 - b1**t,  c2 = 1 - b2**t             python floats (double), as torch computes them
    p <- p - (lr / c1) * m / (sqrt(v) / sqrt(c2) + eps)

Weight-decay order: bitsandbytes' kernels (format-spec 3.3) decay AFTER the Adam step
(`p <- (p + step) * (1 - lr*wd)`), torch decays BEFORE. The two differ by lr*wd*step, second order
in lr. We follow torch, so `adamw` and `paged_adamw_32bit` are
interchangeable and a run can switch between them on resume.

Non-finite gradients are not skipped (torch does not skip them either; bitsandbytes' 8-bit kernels
zero the state of such elements). Mixed precision: the update runs in float32; a bf16/fp16
parameter is updated in a float32 copy and written back (states are always float32 or 8-bit).
"""

from __future__ import annotations

import torch


def adamw_update_many_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in place on each of `params` (any float dtype) and their float32 moments.

    `step` is the 1-based step count after incrementing, shared by all. The i-th tensors of the four
    lists share one device and shape. Non-float32 parameters are updated in float32 copies and
    written back."""
    # the same python numbers the kernel's row holds (adamw_coefficients), here as python scalars
    decay, lerp_weight, _, one_minus_beta2, sqrt_bias_correction2, _, neg_step_size, _ = adamw_coefficients(
        step, lr, beta1, beta2, eps, weight_decay)  # fmt: skip
    work = [p if p.dtype == torch.float32 else p.float() for p in params]
    grads = [g if g.dtype == torch.float32 else g.float() for g in grads]
    if weight_decay != 0:
        torch._foreach_mul_(work, decay)
    torch._foreach_lerp_(exp_avgs, grads, lerp_weight)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=one_minus_beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, sqrt_bias_correction2)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(work, exp_avgs, denom, value=neg_step_size)
    for p, w in zip(params, work, strict=True):
        if w is not p:
            p.copy_(w)


# One AdamW step's numbers as a row of float32 values that a GPU kernel reads from device memory (so a
# CUDA graph that captured the kernel picks up each step's learning rate and bias corrections when
# the row is rewritten before the replay). Each value is rounded to float32 once from the double the
# multi-tensor path above computes, which is what torch does with those python scalars.
COEFFICIENT_NAMES = ("decay", "lerp_weight", "beta2", "one_minus_beta2", "sqrt_bias_correction2", "eps",
                     "neg_step_size", "apply")  # fmt: skip


def adamw_coefficients(step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                       apply: bool = True) -> list[float]:  # fmt: skip
    """The row (`COEFFICIENT_NAMES` order) for 1-based `step`; `apply=False` makes the update write nothing
    (a dry run: the kernels run, e.g. to compile before a graph capture, and change no tensor)."""
    return [1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, (1 - beta2**step) ** 0.5, eps,
            -lr / (1 - beta1**step), 1.0 if apply else 0.0]  # fmt: skip
