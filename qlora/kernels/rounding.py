"""fp32 -> output dtype, rounded to nearest even on the GPU and in Triton's interpreter alike.

On CUDA `x.to(tl.bfloat16)` is one `cvt.rn` instruction: correct round-to-nearest-even, as torch
does. Triton 3.6's CPU interpreter instead truncates fp32 -> bf16 (and its "rtne" option rounds
half up), so kernels tested under TRITON_INTERPRET=1 would differ from torch in the last bit. Under
the interpreter (and only there: `EMULATE` is a compile-time flag) we round with integer
arithmetic, the rule torch's own `round_to_nearest_even` uses for finite values:

    bits + 0x7FFF + ((bits >> 16) & 1), keep the high 16 bits

fp16 needs no help: the interpreter's numpy cast already rounds to nearest even.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qlora.kernels import interpreting


def emulate_rounding() -> bool:
    """The `EMULATE` flag to pass to kernels that call `round_to`."""
    return interpreting()


@triton.jit
def round_to(x, out_dtype: tl.constexpr, EMULATE: tl.constexpr):
    """float32 `x` as `out_dtype` (bf16, fp16 or fp32), rounded to nearest even."""
    if EMULATE and out_dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(out_dtype)
