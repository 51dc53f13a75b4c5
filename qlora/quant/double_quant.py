"""Double quantization: the per-block absmax constants, themselves quantized to 8 bits.

With 4-bit blocks of 64, one float32 absmax per block costs 32/64 = 0.5 bits per parameter. The
QLoRA paper quantizes these constants a second time: subtract their mean (they are all positive,
so centring uses the signed map's range), then quantize blockwise (blocks of 256) to 8-bit codes
of bitsandbytes' signed dynamic map, keeping one float32 absmax per 256 constants. Cost:
8/64 + 32/(64*256) = 0.127 bits per parameter.

    offset  = mean(absmax)                       float32 scalar (torch.mean)
    c       = absmax - offset                    float32
    absmax2 = max |c| per block of 256           float32
    code    = #{t : t < c * fp32(1/absmax2)}     over the 255 midpoints of the map (ties lower)
    restore: map[code] * absmax2  then  + offset (two float32 roundings, never fused into an FMA)

The encoding is the exact nearest map entry, which is what bitsandbytes' CUDA kernel produces
(format-spec 1.5). bitsandbytes' CPU backend since 0.50 uses an approximate 65,536-bin lookup
table instead and differs from CUDA in about 0.2% of nested codes; we follow CUDA, since that is
how the 4-bit checkpoints on the Hub were made, and the tests check that wherever we differ from
bitsandbytes-CPU our code is the nearer one. A nested block whose constants are all equal (c = 0,
e.g. a tensor of a single 4-bit block) gets absmax2 = 0 and the code of 0.0 (127); bitsandbytes-CPU
writes code 0 there. Both restore exactly the offset. The same 8-bit quantizer serves the 8-bit optimizer
states later (signed map for the first moment, unsigned for the second).
"""

from __future__ import annotations

import torch

from qlora.quant.blockwise import normalise_blocks
from qlora.quant.codes import dynamic_map, dynamic_map_thresholds

NESTED_BLOCKSIZE = 256
_CHUNK_ELEMENTS = 1 << 18


def quantize_8bit_dynamic(
    x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE, signed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 1-D `x` -> (codes uint8 [n], absmax float32 [ceil(n / blocksize)])."""
    x = x.reshape(-1).float()
    xn, absmax = normalise_blocks(x, blocksize, divide_partial=False)
    codes = torch.bucketize(xn, dynamic_map_thresholds(signed, x.device), out_int32=True).to(torch.uint8)
    return codes, absmax


def dequantize_8bit_dynamic(
    codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE, signed: bool = True,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """`table[code] * absmax[i // blocksize]` in float32 (1-D)."""
    table = dynamic_map(signed, codes.device) if table is None else table
    values = table.index_select(0, codes.reshape(-1).int())
    n = values.numel()
    n_full = n // blocksize
    if n_full:
        values[: n_full * blocksize].view(n_full, blocksize).mul_(absmax[:n_full, None])
    if n > n_full * blocksize:
        values[n_full * blocksize :].mul_(absmax[n_full])
    return values


def double_quantize(
    absmax: torch.Tensor, chunk_elements: int = _CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 absmax [nblocks] -> (codes uint8 [nblocks], nested_absmax float32, offset float32 0-d).

    Works in chunks of whole 256-blocks so its temporaries stay small even for the 3.7M constants of
    an 8192 x 28672 matrix; chunking does not change the result (each block is independent).
    """
    offset = absmax.mean()  # over the whole vector, as one reduction: the reduction order is part of the bytes
    n = absmax.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=absmax.device)
    nested_absmax = torch.empty((n + NESTED_BLOCKSIZE - 1) // NESTED_BLOCKSIZE, dtype=torch.float32,
                                device=absmax.device)  # fmt: skip
    step = max(1, chunk_elements // NESTED_BLOCKSIZE) * NESTED_BLOCKSIZE
    for start in range(0, n, step):
        chunk_codes, chunk_absmax = quantize_8bit_dynamic(absmax[start : start + step] - offset)
        codes[start : start + chunk_codes.numel()] = chunk_codes
        first = start // NESTED_BLOCKSIZE
        nested_absmax[first : first + chunk_absmax.numel()] = chunk_absmax
    return codes, nested_absmax, offset


def restore_absmax(
    codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor, nested_table: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of `double_quantize` (lossy): the float32 absmax the 4-bit dequantizer needs."""
    scaled = dequantize_8bit_dynamic(codes, nested_absmax, NESTED_BLOCKSIZE, signed=True, table=nested_table)
    return scaled.add_(offset)  # a separate add after the multiply: two roundings, as the format defines
