"""Activations stored as the left columns of a wider matrix, so that a LoRA consumer fills the rest.

Why. The LoRA forward multiplies `[x | h] @ [W | B]^T` in one GEMM (`qlora.lora.matmul`), which
needs x inside a matrix r (+ pad) columns wider than x: built by concatenation, a copy of x. A
producer that knows the consumer's row width (SwiGLU feeding `down_proj`) can store its output
there from the start, and the copy is gone.

How. `left_columns(wide, d)` returns `wide[..., :d]` as a tensor of its own: it shares the storage
but is not an autograd view of `wide`. Not a view on purpose: autograd forbids writing into the base
of a view that a custom Function returned, and the consumer writes h into the spare columns. The
block that asked for the wider rows (`qlora.fused.FusedDecoderLayer`) knows their width and hands it
to the consumer; `rows_of(x, width)` gives the consumer the [N, width] matrix back, after checking
that x's rows are laid out that wide. Writing the spare columns never changes x's own elements.

Triton-free: the consumer imports it on every device.
"""

from __future__ import annotations

import torch


def left_columns(wide: torch.Tensor, d: int) -> torch.Tensor:
    """`wide[..., :d]` sharing wide's storage, not an autograd view of it. `wide` must be contiguous."""
    if not wide.is_contiguous() or d > wide.shape[-1]:
        raise ValueError(f"left_columns needs a contiguous matrix at least {d} wide, got {tuple(wide.shape)} "
                         f"stride {wide.stride()}")  # fmt: skip
    x = torch.empty(0, dtype=wide.dtype, device=wide.device)
    x.set_(wide.untyped_storage(), wide.storage_offset(), (*wide.shape[:-1], d), wide.stride())
    return x


def rows_of(x: torch.Tensor, width: int) -> torch.Tensor | None:
    """The [N, width] matrix whose left columns `x` [..., d] is, when x's rows are laid out `width` apart
    in one block of storage (what `left_columns` makes); None for any other layout (a contiguous x, a
    transposed one). The caller vouches that the spare columns are its to write: only the block that
    had x stored so passes its width."""
    d = x.shape[-1]
    rows = x.numel() // d if d else 0
    if width <= d or x.stride(-1) != 1 or rows == 0:
        return None
    expected, step = [], width  # row-major strides of [..., rows] with rows `width` apart
    for size in reversed(x.shape[:-1]):
        expected.append(step)
        step *= size
    if tuple(reversed(expected)) != x.stride()[:-1]:
        return None
    if x.storage_offset() + rows * width > x.untyped_storage().nbytes() // x.element_size():
        return None
    wide = torch.empty(0, dtype=x.dtype, device=x.device)
    return wide.set_(x.untyped_storage(), x.storage_offset(), (rows, width), (width, 1))
