"""LoRA dropout fused into the adapter's matmuls: the dropped input is never materialised.

PEFT's adapter is `scale * dropout(x) A^T B^T`. Done with `nn.Dropout`, every LoRA layer writes a
dropped copy of its input and a mask ([N, in] each) in the forward and again in the checkpoint's
recompute, saves them, and in backward runs the masked gradient and autograd's add of two [N, in]
gradients of x: 6% + 4% of a 7B step's GPU time (BENCHMARKS.md, profile). Here the keep mask is a
function of (seed, row * in + column) through Philox (`tl.rand`), so each kernel regenerates it
where it reads x or writes x's gradient, and only a one-element seed is saved:

    forward   h       = drop(x) A^T                          `dropout_project`      [N, r]
    backward  dL/dA   = (g B scale)^T drop(x)               `dropout_project_grad`  [r, in]
              dL/dx  += drop'(g B scale A)   (in place)      `dropout_expand_add_`  [N, in]

with drop(x) = bf16(x * 1/(1-p)) where kept, 0 elsewhere (the rounding `nn.Dropout` does), and
drop' the same mask and scale applied to a gradient. `keep_mask` materialises the mask, for tests
and for the plain-PyTorch twins (`*_twin`), which take it as an argument.

Shapes: N rows of x up to 2^31 / in (Philox offsets are int32); r up to 128 (padded to a power of
two >= 16 for `tl.dot`; the padding is masked). The reductions over `in` (forward) and over N
(dL/dA) are split across programs into float32 partials and summed by torch, so they are
deterministic and the GPU is filled even for r = 64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora.kernels.rounding import emulate_rounding, round_to

MAX_RANK = 128
MAX_OFFSET = 2**31 - 1


def fits(n_rows: int, n_in: int, rank: int) -> bool:
    """Whether the fused kernels cover this shape (else the caller uses `nn.Dropout`)."""
    return rank <= MAX_RANK and n_rows * n_in <= MAX_OFFSET


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


@triton.jit
def _dropped(x, seed, offsets, p, scale, EMULATE: tl.constexpr):
    """drop(x) in x's dtype: kept elements scaled by 1/(1-p) (computed in fp32, rounded once)."""
    keep = tl.rand(seed, offsets) >= p
    return round_to(tl.where(keep, x.to(tl.float32) * scale, 0.0), x.dtype, EMULATE)


@triton.jit
def _dot(a, b, EMULATE: tl.constexpr):
    """a @ b accumulated in fp32; the interpreter's dot mishandles bf16 operands, so there they go in as fp32
    (exact: a bf16 value is an fp32 value)."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _keep_mask_kernel(seed_ptr, out_ptr, n, p, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(tl.load(seed_ptr), offs) >= p
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=offs < n)


@triton.jit
def _project_kernel(
    x_ptr, a_ptr, part_ptr, seed_ptr,  # x [N, in], A [r, in], partials fp32 [splits, N, r], seed int64 [1]
    n_rows, n_in, rank, p, scale,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, K_BLOCKS: tl.constexpr,  # blocks per split
    EMULATE: tl.constexpr,
):  # fmt: skip
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    seed = tl.load(seed_ptr)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, R)
    acc = tl.zeros((BLOCK_M, R), tl.float32)
    for kb in range(K_BLOCKS):  # past `in`, masked
        cols = (pid_s * K_BLOCKS + kb) * BLOCK_K + tl.arange(0, BLOCK_K)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < n_in)
        offsets = rows[:, None] * n_in + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
        a_t = tl.load(a_ptr + rk[None, :] * n_in + cols[:, None], mask=(cols[:, None] < n_in) & (rk[None, :] < rank),
                      other=0.0)  # [BLOCK_K, R] = A^T tile  # fmt: skip
        acc += _dot(_dropped(x, seed, offsets, p, scale, EMULATE), a_t, EMULATE)
    out = part_ptr + pid_s * n_rows * rank + rows[:, None] * rank + rk[None, :]
    tl.store(out, acc, mask=(rows[:, None] < n_rows) & (rk[None, :] < rank))


@triton.jit
def _project_grad_kernel(
    g_ptr, x_ptr, part_ptr, seed_ptr,  # gB [N, r], x [N, in], partials fp32 [splits, r, in]
    n_rows, n_in, rank, p, scale,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, M_BLOCKS: tl.constexpr,  # blocks per split
    EMULATE: tl.constexpr,
):  # fmt: skip
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    seed = tl.load(seed_ptr)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, R)
    acc = tl.zeros((R, BLOCK_N), tl.float32)
    for mb in range(M_BLOCKS):  # past N, masked
        rows = (pid_s * M_BLOCKS + mb) * BLOCK_M + tl.arange(0, BLOCK_M)
        offsets = rows[:, None] * n_in + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_in), other=0.0)
        g_t = tl.load(g_ptr + rows[None, :] * rank + rk[:, None], mask=(rows[None, :] < n_rows) & (rk[:, None] < rank),
                      other=0.0)  # [R, BLOCK_M] = gB^T tile  # fmt: skip
        acc += _dot(g_t, _dropped(x, seed, offsets, p, scale, EMULATE), EMULATE)
    out = part_ptr + pid_s * rank * n_in + rk[:, None] * n_in + cols[None, :]
    tl.store(out, acc, mask=(rk[:, None] < rank) & (cols[None, :] < n_in))


@triton.jit
def _expand_add_kernel(
    g_ptr, a_ptr, dx_ptr, seed_ptr,  # gB [N, r], A [r, in], dx [N, in] (updated in place)
    n_rows, n_in, rank, p, scale,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    seed = tl.load(seed_ptr)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, R)
    g = tl.load(g_ptr + rows[:, None] * rank + rk[None, :], mask=(rows[:, None] < n_rows) & (rk[None, :] < rank),
                other=0.0)  # fmt: skip
    a = tl.load(a_ptr + rk[:, None] * n_in + cols[None, :], mask=(rk[:, None] < rank) & (cols[None, :] < n_in),
                other=0.0)  # fmt: skip
    grad = _dot(g, a, EMULATE)  # [BLOCK_M, BLOCK_N] fp32: dL/d drop(x)
    offsets = rows[:, None] * n_in + cols[None, :]
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_in)
    keep = tl.rand(seed, offsets) >= p
    dx = tl.load(dx_ptr + offsets, mask=inside, other=0.0)
    total = dx.to(tl.float32) + tl.where(keep, grad * scale, 0.0)
    tl.store(dx_ptr + offsets, round_to(total, dx.dtype, EMULATE), mask=inside)


def _check(x: torch.Tensor, seed: torch.Tensor, p: float) -> None:
    if not (0.0 <= p < 1.0):
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != x.device:
        raise ValueError(f"seed must be one int64 element on {x.device}, got {seed.dtype} {tuple(seed.shape)} "
                         f"on {seed.device}")  # fmt: skip
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous [N, in] matrix, got shape {tuple(x.shape)} stride {x.stride()}")


def _split(length: int, block: int, programs: int, target: int = 264) -> tuple[int, int]:
    """(blocks per split, splits) for a reduction of `length` in `block`s, so that about `target` programs
    run (two per SM of an H100). Blocks per split is rounded to a power of two: it is a compile-time
    constant, and this keeps the number of compiled variants small."""
    blocks = triton.cdiv(length, block)
    wanted = max(1, min(blocks, target // max(programs, 1)))
    per_split = triton.next_power_of_2(triton.cdiv(blocks, wanted))
    return per_split, triton.cdiv(blocks, per_split)


def keep_mask(seed: torch.Tensor, n_rows: int, n_in: int, p: float) -> torch.Tensor:
    """The [N, in] boolean keep mask the fused kernels use for this seed (tests and twins)."""
    out = torch.empty(n_rows * n_in, dtype=torch.int8, device=seed.device)
    block = 1024
    _keep_mask_kernel[(triton.cdiv(out.numel(), block),)](seed, out, out.numel(), p, BLOCK=block)
    return out.view(n_rows, n_in).bool()


def dropout_project(x: torch.Tensor, lora_A: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """drop(x) A^T [N, r] in x's dtype; x [N, in], lora_A [r, in] in x's dtype."""
    _check(x, seed, p)
    n_rows, n_in = x.shape
    rank = lora_A.shape[0]
    block_m, block_k = 64, 64
    row_blocks = triton.cdiv(n_rows, block_m)
    blocks_per_split, splits = _split(n_in, block_k, row_blocks)
    parts = torch.empty(splits, n_rows, rank, dtype=torch.float32, device=x.device)
    _project_kernel[(row_blocks, splits)](
        x, lora_A.contiguous(), parts, seed, n_rows, n_in, rank, p, 1.0 / (1.0 - p),
        R=_rank_block(rank), BLOCK_M=block_m, BLOCK_K=block_k, K_BLOCKS=blocks_per_split, EMULATE=emulate_rounding(),
    )  # fmt: skip
    return parts.sum(0).to(x.dtype)


def dropout_project_grad(g_b: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """gB^T drop(x) [r, in] in float32; gB [N, r] (already scaled), x [N, in]."""
    _check(x, seed, p)
    n_rows, n_in = x.shape
    rank = g_b.shape[1]
    block_m, block_n = 64, 64
    col_blocks = triton.cdiv(n_in, block_n)
    blocks_per_split, splits = _split(n_rows, block_m, col_blocks)
    parts = torch.empty(splits, rank, n_in, dtype=torch.float32, device=x.device)
    _project_grad_kernel[(col_blocks, splits)](
        g_b.contiguous(), x, parts, seed, n_rows, n_in, rank, p, 1.0 / (1.0 - p),
        R=_rank_block(rank), BLOCK_M=block_m, BLOCK_N=block_n, M_BLOCKS=blocks_per_split, EMULATE=emulate_rounding(),
    )  # fmt: skip
    return parts.sum(0)


def dropout_expand_add_(grad_x: torch.Tensor, g_b: torch.Tensor, lora_A: torch.Tensor, seed: torch.Tensor,
                        p: float) -> torch.Tensor:  # fmt: skip
    """grad_x += drop'(gB A), in place, rounded once; grad_x [N, in], gB [N, r], lora_A [r, in]."""
    _check(grad_x, seed, p)
    n_rows, n_in = grad_x.shape
    rank = g_b.shape[1]
    block_m, block_n = 64, 64
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_in, block_n))
    _expand_add_kernel[grid](
        g_b.contiguous(), lora_A.contiguous(), grad_x, seed, n_rows, n_in, rank, p, 1.0 / (1.0 - p),
        R=_rank_block(rank), BLOCK_M=block_m, BLOCK_N=block_n, EMULATE=emulate_rounding(),
    )  # fmt: skip
    return grad_x


# --- plain-PyTorch twins, given the mask -----------------------------------------------------------
def dropped_twin(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """What `nn.Dropout` computes for this mask: x * 1/(1-p) in fp32 where kept, rounded to x's dtype."""
    return torch.where(keep, x.float() * (1.0 / (1.0 - p)), 0.0).to(x.dtype)


def dropout_project_twin(x, lora_A, keep, p):
    return (dropped_twin(x, keep, p).float() @ lora_A.float().t()).to(x.dtype)


def dropout_project_grad_twin(g_b, x, keep, p):
    return g_b.float().t() @ dropped_twin(x, keep, p).float()


def dropout_expand_add_twin_(grad_x, g_b, lora_A, keep, p):
    grad = torch.where(keep, (g_b.float() @ lora_A.float()) * (1.0 / (1.0 - p)), 0.0)
    return grad_x.copy_((grad_x.float() + grad).to(grad_x.dtype))
