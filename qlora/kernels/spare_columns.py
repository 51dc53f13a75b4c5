"""Activations stored as the left columns of a wider matrix, so that a LoRA consumer fills the rest.

Why. The LoRA forward multiplies `[x | h] @ [W | B]^T` in one GEMM (`qlora.lora.matmul`), which
needs x inside a matrix r (+ pad) columns wider than x: built by concatenation, a copy of x. A
producer that knows the consumer's row width (SwiGLU feeding `down_proj`) can store its output
there from the start, and the copy is gone.

How. `left_columns(wide, d)` returns `wide[..., :d]` as a tensor of its own: it shares the storage
but is not an autograd view of `wide`, and carries the row width as a mark. Not a view on purpose:
autograd forbids writing into the base of a view that a custom Function returned, and the consumer
writes h into the spare columns. `whole_rows(x)` gives the consumer the [N, width] matrix back, only
for a tensor so marked (never for an arbitrary strided tensor, whose neighbouring columns may be
someone's data). Writing the spare columns never changes x's own elements.

Triton-free: the consumer imports it on every device.
"""

from __future__ import annotations

import torch

_ROW_WIDTH = "_qlora_row_width"


def left_columns(wide: torch.Tensor, d: int) -> torch.Tensor:
    """`wide[..., :d]` sharing wide's storage, not an autograd view of it, marked for `whole_rows`.
    `wide` must be contiguous."""
    if not wide.is_contiguous() or d > wide.shape[-1]:
        raise ValueError(f"left_columns needs a contiguous matrix at least {d} wide, got {tuple(wide.shape)} "
                         f"stride {wide.stride()}")  # fmt: skip
    x = torch.empty(0, dtype=wide.dtype, device=wide.device)
    x.set_(wide.untyped_storage(), wide.storage_offset(), (*wide.shape[:-1], d), wide.stride())
    setattr(x, _ROW_WIDTH, wide.shape[-1])
    return x


def whole_rows(x: torch.Tensor) -> torch.Tensor | None:
    """The [N, width] matrix whose left columns `x` [..., d] is, if a producer stored x with
    `left_columns`; otherwise None."""
    width = getattr(x, _ROW_WIDTH, None)
    if width is None:
        return None
    rows = x.numel() // x.shape[-1]
    wide = torch.empty(0, dtype=x.dtype, device=x.device)
    return wide.set_(x.untyped_storage(), x.storage_offset(), (rows, width), (width, 1))
