"""Triton 4-bit dequantization (NF4/FP4/INT4, optionally double-quantized), bit-exact to the reference.

Twin: `QuantizedTensor.dequantize` (`qlora.quant`). The reference's arithmetic, which this kernel
repeats operation for operation so that every output bit agrees:

    absmax[b] = absmax_fp32[b]                                       (plain)
              = fp32(fp32(nested_table[code8[b]] * nested_absmax[b // 256]) + offset)   (double quant)
    out[i]    = dtype(fp32(table[code4[i]] * absmax[i // blocksize]))   (cast rounds to nearest even)

The double-quant restore is a multiply *then* a separate add: the kernel is compiled with
`enable_fp_fusion=False`, or the compiler would contract them into one FMA (one rounding) and
change the last bit of some absmax values, hence of the weights.

Why it is shaped so (bandwidth: it reads 0.5 byte and writes 2 bytes per bf16 element, so it is a
memory-bound copy with a lookup inside):
- one program takes a tile of whole quantization blocks, `[blocks, blocksize/2]` bytes (about
  `bytes_per_program` of codes), so each block's absmax is restored once per program and broadcast,
  the byte loads are contiguous (vectorised) and the stores are contiguous runs of `blocksize`;
- the two nibbles of a byte belong to the same block (blocksizes are even), so the byte's absmax
  scales both and `tl.interleave(high, low)` puts element 2k before 2k+1 in registers;
- the 16-entry code table is read either as 16 scalars kept in registers and selected by a 4-level
  tree on the code bits (`lookup="select"`, 15 selects per element), or as an L1-resident gather
  (`lookup="load"`); `bench/kernels.py` measures both;
- a partial last block and an odd element count are masked (the pad nibble is never stored);
  offsets are int64, so tensors past 2^31 elements index correctly.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qlora.kernels.rounding import emulate_rounding, round_to
from qlora.quant.tensor import QuantizedTensor

LOOKUPS = ("load", "select")
DEFAULT_BYTES_PER_PROGRAM = 4096
DEFAULT_NUM_WARPS = 4
DEFAULT_LOOKUP = "load"
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _select16(code, table_ptr):
    """table[code] for 4-bit `code` from 16 scalars held in registers (a 4-level select tree)."""
    b0 = (code & 1) != 0
    b1 = (code & 2) != 0
    b2 = (code & 4) != 0
    b3 = (code & 8) != 0
    v01 = tl.where(b0, tl.load(table_ptr + 1), tl.load(table_ptr + 0))
    v23 = tl.where(b0, tl.load(table_ptr + 3), tl.load(table_ptr + 2))
    v45 = tl.where(b0, tl.load(table_ptr + 5), tl.load(table_ptr + 4))
    v67 = tl.where(b0, tl.load(table_ptr + 7), tl.load(table_ptr + 6))
    v89 = tl.where(b0, tl.load(table_ptr + 9), tl.load(table_ptr + 8))
    vab = tl.where(b0, tl.load(table_ptr + 11), tl.load(table_ptr + 10))
    vcd = tl.where(b0, tl.load(table_ptr + 13), tl.load(table_ptr + 12))
    vef = tl.where(b0, tl.load(table_ptr + 15), tl.load(table_ptr + 14))
    v03 = tl.where(b1, v23, v01)
    v47 = tl.where(b1, v67, v45)
    v8b = tl.where(b1, vab, v89)
    vcf = tl.where(b1, vef, vcd)
    v07 = tl.where(b2, v47, v03)
    v8f = tl.where(b2, vcf, v8b)
    return tl.where(b3, v8f, v07)


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr,  # uint8 [n_bytes]
    absmax_ptr,  # float32 [n_blocks] (plain) or uint8 codes [n_blocks] (double quant)
    nested_absmax_ptr,  # float32 [ceil(n_blocks / 256)] (double quant only)
    nested_table_ptr,  # float32 [256] (double quant only)
    offset_ptr,  # float32 [1] (double quant only)
    table_ptr,  # float32 [16]
    out_ptr,  # dtype [n], or rows of `row_len` elements `out_row_stride` apart (ROW_STRIDED)
    n,
    n_bytes,
    n_blocks,
    blocks_per_row,  # row_len // blocksize (ROW_STRIDED only: a block never spans two rows)
    out_row_stride,  # elements between output rows (ROW_STRIDED only)
    HALF_BLOCK: tl.constexpr,  # blocksize // 2: bytes per quantization block
    BLOCKS: tl.constexpr,  # quantization blocks per program
    ROW_STRIDED: tl.constexpr,
    ROW_ALIGN: tl.constexpr,  # a power of two dividing every row's start (lets the stores vectorise)
    DOUBLE_QUANT: tl.constexpr,
    SELECT_LOOKUP: tl.constexpr,
    EMULATE_ROUNDING: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS] int64
    blk_ok = blk < n_blocks
    if DOUBLE_QUANT:
        code8 = tl.load(absmax_ptr + blk, mask=blk_ok, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + blk // 256, mask=blk_ok, other=0.0)
        absmax = tl.load(nested_table_ptr + code8) * scale + tl.load(offset_ptr)  # two roundings: no FMA
    else:
        absmax = tl.load(absmax_ptr + blk, mask=blk_ok, other=0.0)
    byte = blk[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]  # [BLOCKS, HALF_BLOCK]
    b = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    if SELECT_LOOKUP:
        high = _select16(b >> 4, table_ptr)
        low = _select16(b & 15, table_ptr)
    else:
        high = tl.load(table_ptr + (b >> 4))
        low = tl.load(table_ptr + (b & 15))
    high = high * absmax[:, None]
    low = low * absmax[:, None]
    values = tl.interleave(high, low)  # [BLOCKS, 2 * HALF_BLOCK]: element 2k (high nibble) before 2k+1
    elem = blk[:, None] * (2 * HALF_BLOCK) + tl.arange(0, 2 * HALF_BLOCK)[None, :]
    if ROW_STRIDED:  # block b is row b // blocks_per_row, columns from (b % blocks_per_row) * blocksize
        start = (blk // blocks_per_row) * out_row_stride + (blk % blocks_per_row) * (2 * HALF_BLOCK)
        start = tl.multiple_of(start, ROW_ALIGN)
        dest = start[:, None] + tl.arange(0, 2 * HALF_BLOCK)[None, :]
    else:
        dest = elem
    tl.store(out_ptr + dest, round_to(values, out_ptr.dtype.element_ty, EMULATE_ROUNDING), mask=elem < n)


def dequantize_4bit(
    q: QuantizedTensor,
    dtype: torch.dtype | None = None,
    *,
    bytes_per_program: int = DEFAULT_BYTES_PER_PROGRAM,
    num_warps: int = DEFAULT_NUM_WARPS,
    lookup: str = DEFAULT_LOOKUP,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense tensor of `q` in `dtype` (default `q.dtype`); bit-identical to `q.dequantize(dtype)`.

    `out`, if given, is a tensor of `dtype` to write into: contiguous with `q.numel` elements (lets a
    caller reuse one buffer across layers), or a 2-D `q.shape` view whose rows are further apart
    than their length (`out.stride(1) == 1`, row length a multiple of the blocksize), e.g. the left
    columns of a wider matrix, so a caller can append columns to the weight without a copy.
    """
    dtype = dtype or q.dtype
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"dequantize_4bit writes float32, float16 or bfloat16, got {dtype}")
    if lookup not in LOOKUPS:
        raise ValueError(f"lookup must be one of {LOOKUPS}, got {lookup!r}")
    if bytes_per_program < 16 or bytes_per_program & (bytes_per_program - 1):
        raise ValueError(f"bytes_per_program must be a power of two >= 16, got {bytes_per_program}")
    packed = q.packed.reshape(-1).contiguous()
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    n = q.numel
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed tensor holds {packed.numel()} bytes; shape {tuple(q.shape)} needs {(n + 1) // 2}")
    half_block = q.blocksize // 2
    n_blocks = (n + q.blocksize - 1) // q.blocksize
    blocks = max(1, bytes_per_program // half_block)
    row_strided = out is not None and not out.is_contiguous()
    if out is None:
        out = torch.empty(n, dtype=dtype, device=packed.device)
    elif out.dtype != dtype or out.numel() != n:
        raise ValueError(f"out must be a {dtype} tensor of {n} elements, got {out.dtype} {tuple(out.shape)}")
    elif row_strided and not row_strided_view_of(out, q):
        raise ValueError(f"out must be contiguous, or a {tuple(q.shape)} view with unit column stride and rows "
                         f"a multiple of blocksize {q.blocksize} long; got shape {tuple(out.shape)} stride "
                         f"{out.stride()}")  # fmt: skip
    # the kernel indexes flat, dense arrays (all of these are already, except after unusual loading)
    if q.nested is not None:
        nest = q.nested
        absmax, nested_absmax = nest.codes.reshape(-1).contiguous(), nest.absmax.reshape(-1).contiguous()
        nested_table = nest.table.reshape(-1).contiguous()
        offset = nest.offset.reshape(1).to(torch.float32)
    else:
        absmax = q.absmax.reshape(-1).contiguous()
        nested_absmax = nested_table = offset = absmax  # unused (DOUBLE_QUANT=False): any valid pointer
    table = q.table.reshape(-1).contiguous()
    grid = (triton.cdiv(n_blocks, blocks),)
    _dequantize_4bit_kernel[grid](
        packed, absmax, nested_absmax, nested_table, offset, table, out, n, packed.numel(), n_blocks,
        out.shape[-1] // q.blocksize if row_strided else 1, out.stride(0) if row_strided else 0,
        HALF_BLOCK=half_block, BLOCKS=blocks, ROW_STRIDED=row_strided,
        ROW_ALIGN=math.gcd(out.stride(0), q.blocksize, 16) if row_strided else 1, DOUBLE_QUANT=q.nested is not None,
        SELECT_LOOKUP=lookup == "select",
        EMULATE_ROUNDING=emulate_rounding(),
        num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    return out.view(q.shape)


def row_strided_view_of(out: torch.Tensor, q: QuantizedTensor) -> bool:
    """Whether the kernel's ROW_STRIDED store covers `out`: [rows, cols] of q's shape, unit column
    stride, and whole quantization blocks per row (so no block's store straddles two rows)."""
    return (out.dim() == 2 and tuple(out.shape) == tuple(q.shape) and out.stride(1) == 1
            and out.stride(0) >= out.shape[1] and out.shape[1] % q.blocksize == 0)  # fmt: skip
