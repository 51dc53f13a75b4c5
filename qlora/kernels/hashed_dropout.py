"""The LoRA adapter's two products with its dropped input, the dropout mask hashed on the fly.

`qlora.lora.dropout` defines the mask (a hash of the seed and the element's row and column) and why;
here are the kernels that apply it while they read x, so the dropped input is never written:

    dropout_project:   h  = (keep * x) A^T * scale        [N, r]   (the forward's and recompute's xd A^T)
    dropout_backward:  dA = g^T (keep * x) * scale        [r, in]  (A's gradient; g = (dL/dy B) scale_lora)
                       and grad_x += keep * (g A) * scale [N, in]  (the input gradient, on the same tiles:
                                                                    the mask is hashed once in backward)

Both are skinny GEMMs reading one [N, in] operand once: bandwidth-bound. Few output tiles (r = 64
wide) would leave most SMs idle, so the long dimension is split across programs ("split-K"): each
writes its float32 partial sum, and the last program of a tile to arrive (an atomic counter per
tile, reset by that program) adds the partials in split order and stores the rounded result. One
launch, and the same bits whoever arrives last.

Twins: `qlora.ops.dropout_project` and `qlora.ops.dropout_backward` (torch ops on the twin's mask).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qlora.kernels.rounding import emulate_rounding, round_to

# Tiles, the fastest of `bench/hashed_dropout.py --sweep` on 7B shapes (measured: docs/LOG.md, 2026-11-27
# (sixth session), item 2; per-tile timings in docs/design-notes.md): the forward's (BLOCK_M rows, BLOCK_K
# reduced columns, warps), another for few rows; the backward's (BLOCK_N columns, BLOCK_K reduced rows, warps).
# The rank is padded to a power of two >= 16 (one MMA operand).
PROJECT_TILES = (64, 64, 4)  # 2,048 rows
PROJECT_TILES_FEW_ROWS = (32, 128, 4)  # 512 rows
FEW_ROWS = 1024
BACKWARD_TILES = (64, 64, 4)
FLOAT64_TILES = (16, 16, 4)  # gradcheck only: float64 has no MMA, its broadcast product must fit shared memory
NUM_STAGES = 3
PROGRAMS_PER_SM = 2  # split the reduction until about this many programs per SM are running


@triton.jit
def pcg_hash(v):
    """Jarzynski and Olano's PCG hash of uint32 values (the twin: `qlora.lora.dropout.pcg_hash`)."""
    state = v * 747796405 + 2891336453
    word = ((state >> ((state >> 28) + 4)) ^ state) * 277803737
    return (word >> 22) ^ word


@triton.jit
def dropout_keys(seed_ptr, index, WORD: tl.constexpr):
    """Per-row (WORD 0) or per-column-pair (WORD 1) keys of the mask: pcg(index ^ seed word)."""
    word = tl.load(seed_ptr + WORD).to(tl.uint32)
    return pcg_hash(index.to(tl.uint32) ^ word)


@triton.jit
def dropout_keep(seed_ptr, rows, first_col, threshold, COLS: tl.constexpr):
    """The mask [len(rows), COLS] of the columns first_col (even) ..: True where the element is kept.
    One hash per column pair: its low 16 bits decide the even column, its high 16 bits the odd one."""
    row_keys = dropout_keys(seed_ptr, rows, 0)
    pair_keys = dropout_keys(seed_ptr, first_col // 2 + tl.arange(0, COLS // 2), 1)
    h = pcg_hash(row_keys[:, None] + pair_keys[None, :])  # [rows, COLS / 2]
    draws = tl.reshape(tl.join(h & 0xFFFF, h >> 16), (rows.shape[0], COLS))  # columns 2k, 2k + 1
    return draws >= threshold.to(tl.uint32)


@triton.jit
def dot_accumulate(a, b, acc, EMULATE: tl.constexpr):
    """acc + a @ b: tensor cores for 16-bit inputs; exact float32 products under the interpreter (its
    16-bit dot is broken in Triton 3.9, and 16-bit products are exact in float32); float64 without MMA."""
    if acc.dtype == tl.float64:  # only gradcheck runs this
        return acc + tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    elif a.dtype == tl.float32 or EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc=acc)


@triton.jit
def _store_split_sum(
    acc, out_ptr, out_offsets, partial_ptr, partial_offsets, tile_size, ok, arrivals_ptr, tile, split, scale,
    SPLIT: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """Store scale * (the sum of the SPLIT programs' `acc` for this tile), rounded to out's dtype."""
    if SPLIT == 1:
        tl.store(out_ptr + out_offsets, round_to(acc * scale, out_ptr.dtype.element_ty, EMULATE), mask=ok)
    else:
        tl.store(partial_ptr + split * tile_size + partial_offsets, acc, mask=ok)
        tl.debug_barrier()  # every thread's partial is written before the arrival is counted (release)
        arrived = tl.atomic_add(arrivals_ptr + tile, 1)  # acq_rel, device scope
        if arrived == SPLIT - 1:  # the last one: add all partials in split order, then reset the counter
            total = tl.zeros_like(acc)
            for s in range(SPLIT):
                total += tl.load(partial_ptr + s * tile_size + partial_offsets, mask=ok, other=0.0,
                                 cache_modifier=".cg")  # fmt: skip
            tl.store(out_ptr + out_offsets, round_to(total * scale, out_ptr.dtype.element_ty, EMULATE), mask=ok)
            tl.atomic_xchg(arrivals_ptr + tile, 0)


@triton.jit(do_not_specialize=["threshold"])  # an argument equal to 1 would become a constant without .to
def _dropout_project_kernel(
    x_ptr, a_ptr, out_ptr, partial_ptr, arrivals_ptr, seed_ptr, n_rows, n_cols, threshold, scale,
    stride_x, stride_a, stride_out,
    RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
    ITERS: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    tile, split = tl.program_id(0), tl.program_id(1)
    rows = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_ok, rank_ok = rows < n_rows, ranks < RANK
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for i in range(ITERS):  # a compile-time count: the interpreter cannot loop to a run-time bound (Triton 3.9)
        first_col = (split.to(tl.int64) * ITERS + i) * BLOCK_K
        cols = first_col + tl.arange(0, BLOCK_K)
        col_ok = cols < n_cols
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        x = tl.where(dropout_keep(seed_ptr, rows, first_col, threshold, BLOCK_K), x, tl.zeros_like(x))
        a = tl.load(a_ptr + ranks[None, :] * stride_a + cols[:, None], mask=rank_ok[None, :] & col_ok[:, None],
                    other=0.0)  # [BLOCK_K, BLOCK_R]: A^T's tile  # fmt: skip
        acc = dot_accumulate(x, a, acc, EMULATE)
    _store_split_sum(acc, out_ptr, rows[:, None] * stride_out + ranks[None, :], partial_ptr,
                     rows[:, None] * BLOCK_R + ranks[None, :], n_rows * BLOCK_R, row_ok[:, None] & rank_ok[None, :],
                     arrivals_ptr, tile, split, scale, SPLIT, EMULATE)  # fmt: skip


@triton.jit(do_not_specialize=["threshold"])
def _dropout_backward_kernel(
    g_ptr, x_ptr, a_ptr, grad_x_ptr, grad_a_ptr, partial_ptr, arrivals_ptr, seed_ptr, n_rows, n_cols, threshold,
    input_scale, weight_scale, stride_g, stride_x, stride_a, stride_grad_x, stride_grad_a,
    RANK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
    ITERS: tl.constexpr, INPUT_GRAD: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """A's gradient g^T (keep * x) over this program's rows (split-summed), and with INPUT_GRAD the masked
    input gradient grad_x += input_scale * keep * (g A) on the same tiles: the mask is hashed once."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    tile, split = tl.program_id(0), tl.program_id(1)
    first_col = tile.to(tl.int64) * BLOCK_N
    cols = first_col + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    col_ok, rank_ok = cols < n_cols, ranks < RANK
    if INPUT_GRAD:
        a = tl.load(a_ptr + ranks[:, None] * stride_a + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :],
                    other=0.0)  # [BLOCK_R, BLOCK_N], for every row block  # fmt: skip
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=ACC)
    for i in range(ITERS):
        rows = (split.to(tl.int64) * ITERS + i) * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & col_ok[None, :]
        keep = dropout_keep(seed_ptr, rows, first_col, threshold, BLOCK_N)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
        g = tl.load(g_ptr + rows[:, None] * stride_g + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :],
                    other=0.0)  # [BLOCK_K, BLOCK_R]  # fmt: skip
        acc = dot_accumulate(tl.trans(g), tl.where(keep, x, tl.zeros_like(x)), acc, EMULATE)
        if INPUT_GRAD:
            product = dot_accumulate(g, a, tl.zeros((BLOCK_K, BLOCK_N), dtype=ACC), EMULATE)
            grad_x_at = grad_x_ptr + rows[:, None] * stride_grad_x + cols[None, :]
            total = tl.load(grad_x_at, mask=ok, other=0.0).to(ACC) + tl.where(keep, product * input_scale, 0.0)
            tl.store(grad_x_at, round_to(total, grad_x_ptr.dtype.element_ty, EMULATE), mask=ok)
    _store_split_sum(acc, grad_a_ptr, ranks[:, None] * stride_grad_a + cols[None, :], partial_ptr,
                     ranks[:, None] * n_cols + cols[None, :], BLOCK_R * n_cols, rank_ok[:, None] & col_ok[None, :],
                     arrivals_ptr, tile, split, weight_scale, SPLIT, EMULATE)  # fmt: skip


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return 4 if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count


ARRIVAL_COUNTERS = 1 << 16  # one per output tile: up to 4 M rows in the forward; more tiles run unsplit
_arrivals: dict[torch.device, torch.Tensor] = {}


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """Zeroed int32 counters, one per output tile, each left at zero again by the kernel; or None (run the
    reduction unsplit) for more tiles than that, or when none exist yet and a graph is being captured.
    One fixed buffer per device, allocated once outside any capture and never freed or replaced: a
    captured graph keeps its address. Kernels using it run in stream order on one stream (the LoRA
    layers' compute stream); two streams launching them at once would share the counters."""
    counters = _arrivals.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None  # the zero-fill would only be recorded; warm-ups before a capture allocate it
        counters = _arrivals[device] = torch.zeros(ARRIVAL_COUNTERS, dtype=torch.int32, device=device)
    return counters if n <= counters.numel() else None


def _split(tiles: int, reduced: int, block: int, device: torch.device, programs: int | None) -> tuple[int, int]:
    """(splits, blocks of the reduced dimension per split): about `programs` programs in all. Both are
    compile-time constants of the kernels; a model's few shapes give a few variants."""
    blocks = triton.cdiv(reduced, block)
    target = programs or PROGRAMS_PER_SM * _multiprocessors(device)
    per_split = triton.cdiv(blocks, max(1, min(blocks, triton.cdiv(target, tiles))))
    return triton.cdiv(blocks, per_split), per_split


def _split_reduction(
    x: torch.Tensor, seed: torch.Tensor, tiles: int, reduced: int, block: int, tile_numel: int, programs: int | None,
) -> tuple[int, int, torch.Tensor, torch.Tensor]:  # fmt: skip
    """How a kernel over `tiles` output tiles of `tile_numel` elements splits its reduced dimension (`reduced`
    elements in blocks of `block`): (splits, blocks per split, the partial sums' buffer, the arrival
    counters, or any pointer when there is a single split)."""
    counters = _arrival_counters(x.device, tiles)
    splits, iters = _split(tiles, reduced, block, x.device, programs if counters is not None else tiles)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.empty(splits * tile_numel if splits > 1 else 1, dtype=acc, device=x.device)
    return splits, iters, partial, counters if counters is not None else seed


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _tiles(x: torch.Tensor, rank: int, tiles: tuple[int, int, int]) -> tuple[int, int, int]:
    """The kernel's tiles for x: `tiles`, or small ones for float64 (gradcheck), which on a GPU holds its
    broadcast product in shared memory: ranks up to 64 fit."""
    if x.dtype != torch.float64:
        return tiles
    if x.is_cuda and rank > 64:
        raise ValueError(f"float64 LoRA dropout kernels (for gradcheck) take ranks up to 64 on CUDA, got {rank}")
    return FLOAT64_TILES


def check_mask(seed: torch.Tensor | None, threshold: int, device: torch.device, name: str) -> None:
    """The hashed mask's arguments as the kernels read them (also `masked_lowrank`'s)."""
    if seed is None or seed.device != device or seed.dtype != torch.int64 or seed.numel() != 2:
        raise ValueError(f"{name}: the seed must be an int64 tensor of 2 words on {device}")
    if not 0 <= threshold < 2**16:
        raise ValueError(f"{name}: threshold {threshold} outside [0, 2^16)")


def _check(x: torch.Tensor, seed: torch.Tensor, threshold: int, name: str) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{name}: x must be a 2-d matrix with unit-stride rows, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")  # fmt: skip
    check_mask(seed, threshold, x.device, name)


def dropout_project(
    x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, threshold: int, scale: float, programs: int | None = None
) -> torch.Tensor:
    """(keep * x) @ a^T * scale, [N, r] in x's dtype; x [N, in] (rows may be strided), a [r, in] of x's
    dtype; keep from `seed` and `threshold` (`qlora.lora.dropout`). `programs`: override the split target."""
    _check(x, seed, threshold, "dropout_project")
    n_rows, n_cols = x.shape
    rank = a.shape[0]
    if a.shape != (rank, n_cols) or a.dtype != x.dtype:
        raise ValueError(f"dropout_project: a must be [r, {n_cols}] in {x.dtype}, got {tuple(a.shape)} {a.dtype}")
    a = a.contiguous()
    block_r = _block_r(rank)
    block_m, block_k, warps = _tiles(x, rank, PROJECT_TILES if n_rows > FEW_ROWS else PROJECT_TILES_FEW_ROWS)
    tiles = triton.cdiv(n_rows, block_m)
    splits, iters, partial, counters = _split_reduction(x, seed, tiles, n_cols, block_k, n_rows * block_r, programs)
    out = torch.empty(n_rows, rank, dtype=x.dtype, device=x.device)
    _dropout_project_kernel[(tiles, splits)](
        x, a, out, partial, counters, seed, n_rows, n_cols, threshold,
        float(scale), x.stride(0), a.stride(0), out.stride(0),
        RANK=rank, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, SPLIT=splits,
        ITERS=iters, EMULATE=emulate_rounding(), num_warps=warps, num_stages=NUM_STAGES,
    )  # fmt: skip
    return out


def dropout_backward(
    g: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, threshold: int, scale: float,
    out_dtype: torch.dtype = torch.float32, grad_x: torch.Tensor | None = None, a: torch.Tensor | None = None,
    input_scale: float = 1.0, programs: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """g^T @ (keep * x) * scale, [r, in] in `out_dtype` (A's gradient); g [N, r] and x [N, in] (rows may be
    strided) of one dtype; keep from `seed` and `threshold`. With `grad_x` [N, in] (unit-stride rows) and
    `a` [r, in], also grad_x += input_scale * keep * (g @ a) in place, on the same tiles (the input
    gradient through the mask). `programs`: override the split target."""
    _check(x, seed, threshold, "dropout_backward")
    n_rows, n_cols = x.shape
    rank = g.shape[1]
    if g.shape != (n_rows, rank) or g.dtype != x.dtype:
        raise ValueError(f"dropout_backward: g must be [{n_rows}, r] in {x.dtype}, got {tuple(g.shape)} {g.dtype}")
    input_grad = grad_x is not None
    if input_grad and (a is None or a.shape != (rank, n_cols) or a.dtype != x.dtype or grad_x.shape != x.shape
                       or grad_x.stride(1) != 1):  # fmt: skip
        raise ValueError(f"dropout_backward: grad_x must be {tuple(x.shape)} with unit-stride rows and a [{rank}, "
                         f"{n_cols}] in {x.dtype}")  # fmt: skip
    g = g.contiguous()
    a = a.contiguous() if input_grad else g  # not read without the input gradient
    grad_x = grad_x if input_grad else g
    block_r = _block_r(rank)
    block_n, block_k, warps = _tiles(x, rank, BACKWARD_TILES)
    tiles = triton.cdiv(n_cols, block_n)
    splits, iters, partial, counters = _split_reduction(x, seed, tiles, n_rows, block_k, block_r * n_cols, programs)
    out = torch.empty(rank, n_cols, dtype=out_dtype, device=x.device)
    _dropout_backward_kernel[(tiles, splits)](
        g, x, a, grad_x, out, partial, counters, seed, n_rows, n_cols, threshold,
        float(input_scale), float(scale), g.stride(0), x.stride(0), a.stride(0), grad_x.stride(0), out.stride(0),
        RANK=rank, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, SPLIT=splits, ITERS=iters,
        INPUT_GRAD=input_grad, EMULATE=emulate_rounding(), num_warps=warps, num_stages=NUM_STAGES,
    )  # fmt: skip
    return out
