"""Triton 4-bit matmul for few rows (decoding): y = x W^T, each weight read once from its packed codes.

Decoding multiplies 1 to `MAX_ROWS` token rows by every weight. The dequantize-then-GEMM path writes
the 16-bit weight (2 bytes per element) and reads it back (2 more) after reading the 4-bit codes (0.5);
with so few rows the GEMM does almost no arithmetic per byte, so that is what a token costs. This
kernel reads the codes and block scales once and multiplies them where they land in registers.

Twin: `ops.matmul_4bit` with the torch policy, `x @ q.dequantize(x.dtype)^T`. The semantics, for x
[M, K] in the compute dtype (bf16, fp16 or fp32) and a `QuantizedTensor` of shape [N, K]:

    W[n, k] = dtype(fp32(table[code(n*K + k)] * absmax[(n*K + k) // blocksize]))   (as `dequantize`)
    y[m, n] = dtype(sum_k fp32(x[m, k]) * fp32(W[n, k]))                          (fp32 sums, one rounding)

so every weight is bit-identical to `QuantizedTensor.dequantize(dtype)`'s (for 16-bit dtypes each
product is exact in fp32); only the order of the fp32 sums differs from the twin's GEMM, hence the
tests' tolerance. The double-quant absmax is restored as `fp32(fp32(map[c] * nested) + offset)`: the
multiply is `libdevice.mul_rn`, which the compiler never contracts with the add into an FMA, so the
rest of the kernel keeps FP contraction (the CUDA-core path's multiply-adds); the dequantize kernel
instead compiles without contraction (`enable_fp_fusion=False`), its only add being that one.

Why it is shaped so (memory-bound: 0.5 byte per weight, a handful of instructions per weight):
- a program owns `block_n` rows of W and a range of K (split-K, below); each step loads, per row,
  `block_k / 2` contiguous packed bytes as a [block_n, segments, segment / 2] tile. When every row is
  whole quantization blocks (K % blocksize == 0) a segment lies inside one block, so its absmax is
  restored once per segment and broadcast; otherwise ("flat" rows, blocks straddling rows or odd K)
  each element finds its own byte, nibble and absmax: correct for any shape, slower, and never needed at
  the default blocksize 64 (Llama-family widths are multiples of 64);
- the two nibbles of a byte are looked up (the 16-entry table: an L1-resident gather, or a select tree
  as in the dequantize kernel), scaled, rounded to the compute dtype and interleaved (element 2k, the
  high nibble, before 2k + 1), giving W's tile in x's column order;
- up to `FMA_MAX_ROWS` rows of x multiply and sum on the CUDA cores, one row of x at a time (one
  multiply-add per weight and row); more rows feed the tensor cores (`tl.dot` of the W tile
  [block_n, block_k] with x^T [block_k, 16 or 32], x's rows padded with zeros);
- few output tiles would leave most SMs idle (N = 4096 in tiles of 16 is 256 programs, about two per
  SM on an H100), so K is split until about `PROGRAMS_PER_SM` programs per SM run, as long as the
  partial sums stay small beside the codes (`PARTIALS_PER_CODE_BYTE`). Split-K is two passes, without
  atomics: the matmul kernel writes fp32 partial sums [splits, M, N], then a small kernel adds them in
  split order and rounds once. Deterministic, and nothing is shared between calls (no counters), so it
  is safe under CUDA-graph capture and on several streams;
- masks cover odd N, odd K, K not a multiple of the step and rows of x beyond M; byte, element and
  output offsets are int64.

The tile sizes, the split targets and the crossover between the two paths are starting points reasoned
from those byte and instruction counts, not measurements: `bench/decode_matmul.py --sweep` times the
alternatives on a GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from qlora.kernels.dequantize import _select16
from qlora.kernels.hashed_dropout import dot_accumulate
from qlora.kernels.rounding import emulate_rounding, round_to
from qlora.quant.tensor import QuantizedTensor

# Rows of x this kernel takes. Above it the caller dequantizes and runs a GEMM (`ops.matmul_4bit` does):
# with more rows the GEMM's arithmetic per weight byte grows and the 16-bit weight's extra traffic matters less.
# Not yet measured: bench/decode_matmul.py times M = 32 against dequantize + GEMM.
MAX_ROWS = 32
FMA_MAX_ROWS = 2  # up to this many rows on the CUDA cores (one multiply-add per row and weight), more on MMA
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOOKUPS = ("load", "select")
DEFAULT_LOOKUP = "load"
PROGRAMS_PER_SM = 8  # split K until about this many programs per SM
# ... but the fp32 partial sums (4 bytes x M x N per split, written then read back, mostly in L2) stay under this
# fraction of the bytes of codes read: splits <= K / (16 M), which binds only from a few rows up.
PARTIALS_PER_CODE_BYTE = 0.5
SUM_BLOCK = 1024  # outputs per program of the split-sum pass


@dataclass(frozen=True)
class Tiles:
    """One launch shape: W rows per program, K elements per step (powers of two) and warps per program."""

    block_n: int
    block_k: int
    num_warps: int

    def __post_init__(self):
        for name in ("block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"Tiles.{name} must be a power of two, got {value}")


FMA_TILES = Tiles(block_n=16, block_k=512, num_warps=4)  # 16 rows x 256 bytes: 4 KiB of codes per step
DOT_TILES = Tiles(block_n=64, block_k=128, num_warps=4)  # 64 rows x 64 bytes; tl.dot needs block_n >= 16


@triton.jit
def _lookup(code, table_ptr, SELECT_LOOKUP: tl.constexpr):
    """table[code] (float32) for 4-bit codes: a select tree on 16 registers, or a gather from L1."""
    if SELECT_LOOKUP:
        return _select16(code, table_ptr)
    else:
        return tl.load(table_ptr + code)


@triton.jit
def _block_absmax(blk, ok, absmax_ptr, nested_absmax_ptr, nested_table_ptr, offset_ptr,
                  DOUBLE_QUANT: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """The float32 absmax of quantization blocks `blk` (int64, any shape), restored as `QuantizedTensor`
    does when double-quantized: the product rounded, then the offset added (two roundings)."""
    if DOUBLE_QUANT:
        code8 = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
        entry = tl.load(nested_table_ptr + code8)
        scale = tl.load(nested_absmax_ptr + blk // 256, mask=ok, other=0.0)
        if EMULATE:
            product = entry * scale  # the interpreter rounds each operation (and has no libdevice)
        else:
            product = libdevice.mul_rn(entry, scale)  # mul.rn: never contracted into an FMA with the add
        return product + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + blk, mask=ok, other=0.0)


@triton.jit
def _weight_tile(
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_table_ptr, offset_ptr, table_ptr, rows, row_ok, k0, n_cols,
    BLOCKSIZE: tl.constexpr, SEGMENTS: tl.constexpr, SEGMENT: tl.constexpr, ROW_BLOCKS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, SELECT_LOOKUP: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """W[rows, k0 : k0 + SEGMENTS * SEGMENT] dequantized to float32, as [len(rows), SEGMENTS, SEGMENT]; elements
    outside W hold finite values (the caller's x is zero there)."""
    seg = tl.arange(0, SEGMENTS)
    seg_start = k0 + seg * SEGMENT  # [SEGMENTS] int64
    if ROW_BLOCKS:  # K % BLOCKSIZE == 0 and SEGMENT divides BLOCKSIZE: each segment inside one quantization block
        seg_ok = row_ok[:, None] & (seg_start < n_cols)[None, :]  # K % SEGMENT == 0: segments are whole
        blk = rows[:, None] * (n_cols // BLOCKSIZE) + (seg_start // BLOCKSIZE)[None, :]  # [BLOCK_N, SEGMENTS]
        absmax = _block_absmax(blk, seg_ok, absmax_ptr, nested_absmax_ptr, nested_table_ptr, offset_ptr,
                               DOUBLE_QUANT, EMULATE)  # fmt: skip
        # [BLOCK_N, SEGMENTS, SEGMENT / 2]: each row's bytes of the step are contiguous
        byte = (rows[:, None, None] * (n_cols // 2) + (seg_start // 2)[None, :, None]
                + tl.arange(0, SEGMENT // 2)[None, None, :])  # fmt: skip
        b = tl.load(packed_ptr + byte, mask=seg_ok[:, :, None], other=0).to(tl.int32)
        high = _lookup(b >> 4, table_ptr, SELECT_LOOKUP) * absmax[:, :, None]
        low = _lookup(b & 15, table_ptr, SELECT_LOOKUP) * absmax[:, :, None]
        return tl.interleave(high, low)  # [BLOCK_N, SEGMENTS, SEGMENT]: element 2k (high nibble) before 2k + 1
    else:  # flat: element e = row * K + col in its own byte (high nibble when e is even) and block
        col = seg_start[:, None] + tl.arange(0, SEGMENT)[None, :]  # [SEGMENTS, SEGMENT]
        ok = row_ok[:, None, None] & (col < n_cols)[None, :, :]
        e = rows[:, None, None] * n_cols + col[None, :, :]  # [BLOCK_N, SEGMENTS, SEGMENT] int64
        b = tl.load(packed_ptr + (e >> 1), mask=ok, other=0).to(tl.int32)
        code = (b >> (((e & 1) ^ 1) * 4).to(tl.int32)) & 15
        absmax = _block_absmax(e // BLOCKSIZE, ok, absmax_ptr, nested_absmax_ptr, nested_table_ptr, offset_ptr,
                               DOUBLE_QUANT, EMULATE)  # fmt: skip
        return _lookup(code, table_ptr, SELECT_LOOKUP) * absmax


@triton.jit
def _matmul_4bit_kernel(
    x_ptr,  # [M, K] compute dtype, rows stride_x apart
    packed_ptr,  # uint8 [ceil(N * K / 2)]
    absmax_ptr,  # float32 [n_blocks] (plain) or uint8 codes [n_blocks] (double quant)
    nested_absmax_ptr,  # float32 [ceil(n_blocks / 256)] (double quant only)
    nested_table_ptr,  # float32 [256] (double quant only)
    offset_ptr,  # float32 [1] (double quant only)
    table_ptr,  # float32 [16]
    out_ptr,  # [M, N] compute dtype (SPLIT == 1)
    partial_ptr,  # float32 [SPLIT, M, N] (SPLIT > 1)
    n_x_rows,  # M
    n_rows,  # N
    n_cols,  # K
    stride_x,
    BLOCKSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEGMENTS: tl.constexpr,
    SEGMENT: tl.constexpr, ITERS: tl.constexpr, SPLIT: tl.constexpr, ROW_BLOCKS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, SELECT_LOOKUP: tl.constexpr, USE_DOT: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    BLOCK_K: tl.constexpr = SEGMENTS * SEGMENT
    tile, split = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of W: output columns
    row_ok = rows < n_rows
    xr = tl.arange(0, BLOCK_M)  # rows of x
    xr_ok = xr < n_x_rows
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T's tile
    for i in range(ITERS):  # a compile-time count: the interpreter cannot loop to a run-time bound
        k0 = (split * ITERS + i) * BLOCK_K
        w = _weight_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_table_ptr, offset_ptr, table_ptr, rows,
                         row_ok, k0, n_cols, BLOCKSIZE, SEGMENTS, SEGMENT, ROW_BLOCKS, DOUBLE_QUANT, SELECT_LOOKUP,
                         EMULATE)  # fmt: skip
        w = round_to(w, x_ptr.dtype.element_ty, EMULATE)  # the weight in the compute dtype, as `dequantize` rounds it
        if USE_DOT:
            cols = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + xr[None, :] * stride_x + cols[:, None], mask=xr_ok[None, :] & (cols < n_cols)[:, None],
                         other=0.0)  # [BLOCK_K, BLOCK_M]: x^T's tile  # fmt: skip
            acc = dot_accumulate(tl.reshape(w, (BLOCK_N, BLOCK_K)), xt, acc, EMULATE)
        else:
            cols = k0 + tl.arange(0, SEGMENTS)[:, None] * SEGMENT + tl.arange(0, SEGMENT)[None, :]  # [SEGMENTS, SEG.]
            wf = w.to(tl.float32)
            for r in tl.static_range(BLOCK_M):
                xs = tl.load(x_ptr + r * stride_x + cols, mask=(cols < n_cols) & (r < n_x_rows), other=0.0)
                part = tl.sum(tl.sum(wf * xs.to(tl.float32)[None, :, :], axis=2), axis=1)  # [BLOCK_N]
                acc += tl.where(xr[None, :] == r, part[:, None], 0.0)
    ok = row_ok[:, None] & xr_ok[None, :]
    at = xr[None, :].to(tl.int64) * n_rows + rows[:, None]  # y[x row, W row], [BLOCK_N, BLOCK_M]
    if SPLIT == 1:
        tl.store(out_ptr + at, round_to(acc, out_ptr.dtype.element_ty, EMULATE), mask=ok)
    else:
        tl.store(partial_ptr + split * n_x_rows * n_rows + at, acc, mask=ok)


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, numel, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
                       EMULATE: tl.constexpr):  # fmt: skip
    """out = sum over s of partial[s] (float32, in split order), rounded once to out's dtype."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < numel
    total = tl.load(partial_ptr + i, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT):
        total += tl.load(partial_ptr + s * numel + i, mask=ok, other=0.0)
    tl.store(out_ptr + i, round_to(total, out_ptr.dtype.element_ty, EMULATE), mask=ok)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return 4 if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count


def default_tiles(rows: int) -> Tiles:
    """The launch shape for `rows` rows of x: the CUDA-core path up to FMA_MAX_ROWS, the tensor cores above."""
    return FMA_TILES if rows <= FMA_MAX_ROWS else DOT_TILES


def _flat_state(q: QuantizedTensor) -> tuple[torch.Tensor, ...]:
    """The kernel's flat, dense arrays: packed bytes, absmax (or its codes), nested absmax, nested map, offset and
    the 4-bit table (already so, except after unusual loading)."""
    packed = q.packed.reshape(-1).contiguous()
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    if packed.numel() != (q.numel + 1) // 2:
        raise ValueError(f"packed tensor holds {packed.numel()} bytes; shape {tuple(q.shape)} needs "
                         f"{(q.numel + 1) // 2}")  # fmt: skip
    if q.nested is not None:
        n = q.nested
        absmax, nested_absmax = n.codes.reshape(-1).contiguous(), n.absmax.reshape(-1).contiguous()
        nested_table, offset = n.table.reshape(-1).contiguous(), n.offset.reshape(1).to(torch.float32)
    else:
        assert q.absmax is not None
        absmax = q.absmax.reshape(-1).contiguous()
        nested_absmax = nested_table = offset = absmax  # unused (DOUBLE_QUANT=False): any valid pointer
    return packed, absmax, nested_absmax, nested_table, offset, q.table.reshape(-1).contiguous()


def splits_for(x_rows: int, n_rows: int, n_cols: int, tiles: Tiles, device: torch.device) -> int:
    """How many parts K is split into for x [x_rows, K] and W [n_rows, K]: enough for about PROGRAMS_PER_SM
    programs per SM, at least one step each, and partial sums within PARTIALS_PER_CODE_BYTE of the codes' bytes."""
    steps = triton.cdiv(n_cols, tiles.block_k)
    wanted = triton.cdiv(PROGRAMS_PER_SM * _multiprocessors(device), triton.cdiv(n_rows, tiles.block_n))
    affordable = int(PARTIALS_PER_CODE_BYTE * (n_cols / 2) / (4 * x_rows))
    return max(1, min(steps, wanted, affordable))


def matmul_4bit(
    x: torch.Tensor,
    q: QuantizedTensor,
    *,
    tiles: Tiles | None = None,
    use_dot: bool | None = None,
    splits: int | None = None,
    lookup: str = DEFAULT_LOOKUP,
) -> torch.Tensor:
    """x @ W^T in x's dtype, W = `q.dequantize(x.dtype)` [N, K] read from its packed codes; x [..., K] with at
    most MAX_ROWS rows once its leading dimensions are flattened; returns [..., N].

    Launch overrides (the defaults come from the number of rows): `tiles`, `use_dot` (tensor cores, or
    multiply-adds on the CUDA cores), `splits` (parts of K, each a program per row tile; the parts are added by a
    second pass) and `lookup` ("load" or "select", as `dequantize_4bit`'s)."""
    if x.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"matmul_4bit computes in float32, float16 or bfloat16, got x of {x.dtype}")
    if len(q.shape) != 2 or x.dim() == 0 or x.shape[-1] != q.shape[1]:
        raise ValueError(f"matmul_4bit: x {tuple(x.shape)} does not multiply a 4-bit weight of shape "
                         f"{tuple(q.shape)} (x's last dimension must be the weight's second)")  # fmt: skip
    if x.device != q.device:
        raise ValueError(f"matmul_4bit: x is on {x.device}, the 4-bit weight on {q.device}")
    if lookup not in LOOKUPS:
        raise ValueError(f"lookup must be one of {LOOKUPS}, got {lookup!r}")
    n_rows, n_cols = q.shape
    x2 = x.reshape(-1, n_cols)  # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"matmul_4bit takes at most {MAX_ROWS} rows of x, got {m}: dequantize and use a GEMM "
                         "(ops.matmul_4bit does)")  # fmt: skip
    out = torch.empty(m, n_rows, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n_rows)
    tiles = tiles or default_tiles(m)
    use_dot = m > FMA_MAX_ROWS if use_dot is None else use_dot
    if use_dot and (tiles.block_n < 16 or tiles.block_k < 16):
        raise ValueError(f"the tensor-core path needs block_n and block_k >= 16, got {tiles}")
    block_m = max(16, triton.next_power_of_2(m)) if use_dot else triton.next_power_of_2(m)
    segment = min(tiles.block_k, q.blocksize)
    steps = triton.cdiv(n_cols, tiles.block_k)
    splits = splits or splits_for(m, n_rows, n_cols, tiles, x.device)
    iters = triton.cdiv(steps, max(1, min(splits, steps)))
    splits = triton.cdiv(steps, iters)  # no split left without a step
    partial = torch.empty(splits * m * n_rows if splits > 1 else 1, dtype=torch.float32, device=x.device)
    packed, absmax, nested_absmax, nested_table, offset, table = _flat_state(q)
    emulate = emulate_rounding()
    _matmul_4bit_kernel[(triton.cdiv(n_rows, tiles.block_n), splits)](
        x2, packed, absmax, nested_absmax, nested_table, offset, table, out, partial, m, n_rows, n_cols, x2.stride(0),
        BLOCKSIZE=q.blocksize, BLOCK_M=block_m, BLOCK_N=tiles.block_n, SEGMENTS=tiles.block_k // segment,
        SEGMENT=segment, ITERS=iters, SPLIT=splits, ROW_BLOCKS=n_cols % q.blocksize == 0,
        DOUBLE_QUANT=q.nested is not None, SELECT_LOOKUP=lookup == "select", USE_DOT=use_dot, EMULATE=emulate,
        num_warps=tiles.num_warps,
    )  # fmt: skip
    if splits > 1:
        _sum_splits_kernel[(triton.cdiv(m * n_rows, SUM_BLOCK),)](partial, out, m * n_rows, SPLIT=splits,
                                                                  BLOCK=SUM_BLOCK, EMULATE=emulate)  # fmt: skip
    return out.view(*x.shape[:-1], n_rows)
