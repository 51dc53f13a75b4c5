"""Blockwise absmax quantization to 4-bit codes, nibble packing, and its inverse.

This is the plain-PyTorch reference of the format (bitsandbytes' `quantize_4bit` /
`dequantize_4bit`): what CPU users run, and what every GPU kernel is tested against.

The tensor is flattened row-major and cut into blocks of `blocksize` consecutive elements (blocks
may straddle rows; the last block may be partial and is never padded with data). Per block:

    absmax = max |x|                         (float32, over the block's valid elements)
    xn     = float32(x) * float32(1/absmax)  (a multiply by the reciprocal, not a division)
    code   = order[#{t in thresholds : t < xn}]   (nearest table value, ties to the lower code)

Two codes share a byte: element 2k in the high nibble, element 2k+1 in the low nibble. An odd
element count pads the final low nibble with the code of 0.0. The packed tensor has shape
`((n + 1) // 2, 1)`, as bitsandbytes' `Params4bit`.

Conventions where bitsandbytes' own backends disagree (format-spec 1.2, 2.2), and what we do:
- All-zero block: we store absmax 0.0 and the code of 0.0 in every nibble (NF4: bytes 0x77),
  which dequantizes to +0.0. This is the CPU convention; CUDA writes 0x00 (code -1.0, times 0 gives
  -0.0). Both load anywhere and dequantize to zero. Like the CPU backend, the reciprocal is taken of
  `max(absmax, 1e-38)`, so a zero block gives `xn = 0`.
- Partial last block (numel not a multiple of blocksize): like bitsandbytes' 0.50 CPU backend we
  *divide* by its absmax there instead of multiplying by the reciprocal; CUDA multiplies. The two
  differ only for a value within one float32 ulp of a threshold, which bf16 inputs do hit now and
  then (measured: 1 of 25,641 FP4 codes of a random bf16 333 x 77 tensor). For an all-zero partial
  block bitsandbytes-CPU stores absmax 1e-38; we store 0.0 as for any zero block.
- Exact ties use IEEE float32 arithmetic; CUDA's fast-math reciprocal resolves some constructed
  ties upward (never observed on real weights beyond 1 in 16.7M fp32 values).
- FP4 near zero: the table holds +0.0 (code 0) and -0.0 (code 8). Like bitsandbytes-CPU we pick
  among equal values by code order, so a normalised value in (-0.0026, 0] gets code 0 and one in
  (0, 0.0026] gets code 8; bitsandbytes-CUDA takes the sign bit from `xn < 0` instead. The two
  differ only in the sign of a zero (measured on an H100: ~0.6% of FP4 bytes of N(0, 0.02) weights),
  and every such code dequantizes to exactly 0. NF4 has a single zero and is unaffected.
- NaN/Inf inputs have no defined encoding in any backend: we refuse them with an error.

Work proceeds in chunks of whole blocks (`chunk_elements`, default 2^20 on the CPU), so the extra memory
is a few float32 copies of one chunk (~12 MiB), never a float32 copy of the whole weight: an 8192 x 28672
bf16 matrix (448 MiB) quantizes with well under 5% extra. On a GPU each chunk costs a dozen kernel launches
whatever its size, so the default there is 2^22 (~70 MiB of temporaries): a 7B model is ~1,600 chunks, not
~6,400. Chunking never changes a byte (tested). The NaN/Inf check reads the absmax once per tensor, after the
last chunk, so a GPU never waits on the host between chunks.
"""

from __future__ import annotations

import torch

from qlora.quant.codes import table_4bit, thresholds_and_order

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_CHUNK_ELEMENTS = 1 << 20  # on the CPU (see the module docstring)
ACCELERATOR_CHUNK_ELEMENTS = 1 << 22  # on any other device
_MIN_ABSMAX = 1e-38  # reciprocal of a zero block's absmax is taken of this instead (see docstring)


def check_blocksize(blocksize: int) -> None:
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize}")


def default_chunk_elements(device: torch.device) -> int:
    """How many elements one chunk of quantization work covers on `device` (see the module docstring)."""
    return DEFAULT_CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS


def _chunk_length(blocksize: int, chunk_elements: int) -> int:
    # A whole number of blocks, at least one; blocksizes are even, so chunks start on a byte.
    return max(1, chunk_elements // blocksize) * blocksize


def normalise_blocks(x: torch.Tensor, blocksize: int, divide_partial: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 chunk [L] -> (x / absmax per block [L], absmax [ceil(L / blocksize)]).

    Full blocks multiply by the float32 reciprocal. The partial last block divides when
    `divide_partial` (bitsandbytes-CPU's 4-bit rule), else multiplies too (CUDA's rule, which the
    8-bit nested quantization follows).
    """
    n_full = x.numel() // blocksize
    n_rem = x.numel() - n_full * blocksize
    absmax = torch.empty(n_full + (1 if n_rem else 0), dtype=torch.float32, device=x.device)
    xn = torch.empty_like(x)
    if n_full:
        blocks = x[: n_full * blocksize].view(n_full, blocksize)  # [n_full, bs]
        torch.amax(blocks.abs(), dim=1, out=absmax[:n_full])
        reciprocal = 1.0 / absmax[:n_full].clamp(min=_MIN_ABSMAX)
        torch.mul(blocks, reciprocal[:, None], out=xn[: n_full * blocksize].view(n_full, blocksize))
    if n_rem:
        tail = x[n_full * blocksize :]
        absmax[n_full] = tail.abs().amax()
        divisor = absmax[n_full].clamp(min=_MIN_ABSMAX)
        if divide_partial:
            torch.div(tail, divisor, out=xn[n_full * blocksize :])
        else:
            torch.mul(tail, 1.0 / divisor, out=xn[n_full * blocksize :])
    return xn, absmax


def quantize_4bit_blockwise(
    t: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `t` (any shape, fp32/fp16/bf16) -> (packed uint8 [(n+1)//2, 1], absmax float32 [nblocks]).

    `chunk_elements`: the work per step (default `default_chunk_elements(t.device)`); never changes a byte."""
    check_blocksize(blocksize)
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"4-bit quantization takes float32, float16 or bfloat16 tensors, got {t.dtype}")
    flat = t.reshape(-1)  # a view when t is contiguous
    n = flat.numel()
    if n == 0:
        raise ValueError("cannot quantize an empty tensor")
    thresholds, order = thresholds_and_order(quant_type, t.device)
    cpu_thresholds, cpu_order = thresholds_and_order(quant_type)  # the same table, read without a device sync
    zero_code = int(cpu_order[torch.bucketize(torch.zeros(()), cpu_thresholds)])
    n_blocks = (n + blocksize - 1) // blocksize
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=t.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=t.device)
    step = _chunk_length(blocksize, chunk_elements or default_chunk_elements(t.device))
    finite = torch.empty((n + step - 1) // step, dtype=torch.bool, device=t.device)  # per chunk, read once at the end
    for start in range(0, n, step):
        x = flat[start : start + step].float()
        xn, chunk_absmax = normalise_blocks(x, blocksize, divide_partial=True)
        finite[start // step] = torch.isfinite(chunk_absmax).all()  # a block's absmax is NaN/Inf iff an element is
        absmax[start // blocksize : start // blocksize + chunk_absmax.numel()] = chunk_absmax
        codes = torch.bucketize(xn, thresholds, out_int32=True)
        del xn
        codes = order[codes] if quant_type == "fp4" else codes.to(torch.uint8)
        if codes.numel() % 2:  # only the final chunk of an odd-sized tensor
            codes = torch.cat([codes, codes.new_tensor([zero_code])])
        pairs = codes.view(-1, 2)  # [L/2, 2]: element 2k, element 2k+1
        packed[start // 2 : start // 2 + pairs.shape[0], 0] = (pairs[:, 0] << 4) | pairs[:, 1]
    if not bool(finite.all()):
        block = int(torch.isfinite(absmax).logical_not().nonzero()[0])
        raise ValueError(f"cannot quantize a tensor with NaN or Inf values (first in elements "
                         f"{block * blocksize}..{min(n, (block + 1) * blocksize)})")  # fmt: skip
    return packed, absmax


@torch.no_grad()
def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the two values a packed byte stands for (high nibble first)."""
    table = table_4bit(quant_type, device)
    byte = torch.arange(256, device=device)
    return torch.stack([table[byte >> 4], table[byte & 0xF]], dim=1)


def dequantize_4bit_blockwise(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    blocksize: int,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """`out[i] = table[code(i)] * absmax[i // blocksize]` in float32, rounded (RNE) to `dtype`."""
    if absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be float32 (reconstruct double-quantized absmax first), got {absmax.dtype}")
    n = 1
    for d in shape:
        n *= d
    bytes_flat = packed.reshape(-1)
    if bytes_flat.dtype != torch.uint8:
        bytes_flat = bytes_flat.view(torch.uint8)
    if bytes_flat.numel() != (n + 1) // 2:
        raise ValueError(f"packed tensor holds {bytes_flat.numel()} bytes; shape {tuple(shape)} needs {(n + 1) // 2}")
    pair_table = _pair_table(quant_type, packed.device)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    step = _chunk_length(blocksize, chunk_elements)
    for start in range(0, n, step):
        stop = min(start + step, n)
        chunk_bytes = bytes_flat[start // 2 : (stop + 1) // 2]
        values = pair_table.index_select(0, chunk_bytes.int()).view(-1)[: stop - start]  # [L] float32
        n_full = values.numel() // blocksize
        first_block = start // blocksize
        if n_full:
            blocks = values[: n_full * blocksize].view(n_full, blocksize)
            blocks.mul_(absmax[first_block : first_block + n_full, None])
        if values.numel() > n_full * blocksize:
            values[n_full * blocksize :].mul_(absmax[first_block + n_full])
        out[start:stop] = values  # the cast to `dtype` rounds to nearest even
    return out.view(shape)
