"""The Triton 4-bit decode matmul against its twin, `x @ QuantizedTensor.dequantize(x.dtype)^T`.

Two properties, each checked for every format, with and without double quantization, at blocksizes whose
blocks tile the rows and at ones whose blocks straddle them:
- every weight is the dequantizer's, bit for bit: rows of x that are one-hot columns of the identity read W
  back exactly (a product with 1.0 and sums of zeros are exact in any order);
- random rows: the kernel sums exact products (16-bit weights times 16-bit x; fp32 products when computing in
  fp32) in float32 in its own order and rounds once. Tolerance, for y = x W^T computed exactly in float64 from
  the dequantized W: |got - y| <= g + u (|y| + g), where g = (K + 1) 2^-24 (|x| |W|^T) bounds float32 summation
  in any order (and the fp32 products' own rounding) and u is the output dtype's unit roundoff (bf16 2^-8,
  fp16 2^-11, fp32 2^-24), the one final rounding. The twin meets the same bound (so the two agree to about
  one output rounding); it is not bit-equal to the kernel because its GEMM adds in another order.
"""

import pytest
import torch
from kernel_inputs import DEVICES, bits, randn

import qlora
from qlora import ops
from qlora.kernels.matmul_4bit import MAX_ROWS, Tiles, matmul_4bit
from qlora.ops import KernelPolicy

TWINS = KernelPolicy(kernels="torch")
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
FORMATS = [pytest.param(qt, dq, id=f"{qt}-{'dq' if dq else 'plain'}") for qt in ("nf4", "fp4", "int4")
           for dq in (True, False)]  # fmt: skip


def weight(shape, quant_type="nf4", blocksize=64, double_quant=True, seed=0, device="cpu"):
    return qlora.quantize(randn(shape, torch.float32, seed=seed, device=device, scale=0.05), quant_type, blocksize,
                          double_quant)  # fmt: skip


def within_tolerance(got: torch.Tensor, x: torch.Tensor, q, dtype: torch.dtype) -> torch.Tensor:
    """A bool tensor: where `got` lies within the module docstring's bound of the exact x W^T."""
    w = q.dequantize(dtype).double()
    xd = x.reshape(-1, x.shape[-1]).double()
    exact = xd @ w.t()
    g = (x.shape[-1] + 1) * 2.0**-24 * (xd.abs() @ w.abs().t())
    tiny = 2.0**-24 if dtype == torch.float16 else 0.0  # fp16's subnormal spacing: the rounding near zero
    bound = g + UNIT_ROUNDOFF[dtype] * (exact.abs() + g) + tiny
    return (got.reshape(exact.shape).double() - exact).abs() <= bound


def assert_within_tolerance(got, x, q, dtype):
    ok = within_tolerance(got, x, q, dtype)
    assert ok.all(), f"{int((~ok).sum())} of {ok.numel()} outputs outside the tolerance"


# --- every weight bit-exact --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type,double_quant", FORMATS)
@pytest.mark.parametrize("shape,blocksize", [((17, 192), 64), ((5, 77), 32), ((3, 192), 128)],
                         ids=["rows-of-blocks", "odd-K", "blocks-straddle-rows"])  # fmt: skip
def test_one_hot_rows_read_back_every_weight_bit_for_bit(shape, blocksize, quant_type, double_quant, device):
    """All K columns through the tensor-core path (32 rows a call); the first and last through the M = 1 path
    (the two paths share the weight tile)."""
    q = weight(shape, quant_type, blocksize, double_quant, seed=blocksize, device=device)
    n_cols = shape[1]
    for dtype in (torch.float32, torch.bfloat16):
        want = q.dequantize(dtype).t()  # [K, N]: row k of the result for x = e_k
        eye = torch.eye(n_cols, dtype=dtype, device=device)
        for first in range(0, n_cols, MAX_ROWS):
            got = matmul_4bit(eye[first : first + MAX_ROWS], q, tiles=Tiles(16, 64, 4))
            # value equality: a weight of -0.0 plus the +0.0 products of the other columns is +0.0
            assert torch.equal(got, want[first : first + MAX_ROWS]), f"{dtype}, columns {first}.."
        for col in (0, n_cols - 1):
            assert torch.equal(matmul_4bit(eye[col], q, use_dot=False), want[col]), f"{dtype}, column {col}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_dot", [False, True], ids=["fma", "dot"])
def test_weights_are_rounded_to_the_compute_dtype_before_the_products(use_dot, device):
    """Rows e_a + e_b sum two weights: exact in float32 for 16-bit weights, so y = dtype(W[:, a] + W[:, b]) bit
    for bit in any order. A kernel multiplying the float32 weights (one rounding fewer) fails here, where a
    one-hot row cannot tell (its single product is rounded to the same bits either way)."""
    q = weight((40, 128), "nf4", 64, True, seed=14, device=device)
    for dtype in (torch.bfloat16, torch.float16):
        w = q.dequantize(dtype).float()
        a, b = torch.arange(0, 16, device=device), torch.arange(127, 111, -1, device=device)
        eye = torch.eye(128, dtype=dtype, device=device)
        got = matmul_4bit(eye[a] + eye[b], q, use_dot=use_dot)
        want = (w[:, a] + w[:, b]).t().to(dtype)
        assert torch.equal(bits(got), bits(want)), f"{dtype}: {(bits(got) != bits(want)).sum()} differ"
        unrounded = (q.dequantize(torch.float32)[:, a] + q.dequantize(torch.float32)[:, b]).t().to(dtype)
        assert not torch.equal(unrounded, want), "control: no pair distinguishes the rounding; pick another seed"


@pytest.mark.parametrize("device", DEVICES)
def test_double_quant_restore_is_multiply_then_add_not_fma(device):
    """The blocks whose absmax an FMA would change (checked in float64, so the test cannot pass vacuously)
    read back bit for bit in float32. Meaningful on CUDA (the interpreter never fuses): it fails if the
    restore's multiply is contracted with its add."""
    q = weight((64, 256), "nf4", 32, True, seed=5, device=device)
    n = q.nested
    entry, scale = n.table[n.codes.long()], n.absmax.repeat_interleave(256)[: n.codes.numel()]
    fused = (entry.double() * scale.double() + n.offset.double()).float()
    differ = ((entry * scale + n.offset) != fused).nonzero().flatten()
    assert differ.numel() > 0, "no block distinguishes FMA from two roundings: pick another seed"
    block = int(differ[0])  # rows of 256 hold 8 blocks of 32
    row, first = block // 8, (block % 8) * 32
    eye = torch.eye(256, device=device)[first : first + 32]
    got = matmul_4bit(eye, q)  # [32, 64]: W^T's rows first .. first + 31
    assert torch.equal(bits(got[:, row].contiguous()), bits(q.dequantize(torch.float32)[row, first : first + 32]))


# --- random rows: the stated tolerance -----------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k,blocksize", [(1, 17, 4160, 64), (3, 200, 192, 64), (32, 1, 64, 64),
                                              (3, 17, 4160, 4096), (1, 200, 77, 32)], ids=str)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_random_rows_within_tolerance(m, n, k, blocksize, dtype, device):
    q = weight((n, k), "nf4", blocksize, True, seed=k, device=device)
    x = randn((m, k), dtype, seed=m, device=device)
    got = matmul_4bit(x, q)
    assert got.shape == (m, n) and got.dtype == dtype
    assert_within_tolerance(got, x, q, dtype)
    assert_within_tolerance(ops.matmul_4bit(x, q, policy=TWINS), x, q, dtype)  # the twin meets the bound too


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type,double_quant", FORMATS)
def test_every_format_within_tolerance(quant_type, double_quant, device):
    q = weight((33, 320), quant_type, 64, double_quant, seed=7, device=device)
    x = randn((5, 320), torch.bfloat16, seed=8, device=device)
    assert_within_tolerance(matmul_4bit(x, q), x, q, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_the_tolerance_catches_one_wrong_code(device):
    """Negative control: one packed byte changed in W moves outputs outside the bound."""
    q = weight((17, 192), "nf4", 64, False, seed=1, device=device)
    x = randn((3, 192), torch.bfloat16, seed=2, device=device)
    packed = q.packed.clone()
    packed[40] ^= 0x33  # two codes of row 0 (96 bytes per row)
    wrong = matmul_4bit(x, qlora.QuantizedTensor(packed, q.absmax, None, q.table, q.quant_type, q.blocksize, q.shape,
                                                 q.dtype))  # fmt: skip
    assert not within_tolerance(wrong, x, q, torch.bfloat16).all()


@pytest.mark.parametrize("device", DEVICES)
def test_every_launch_configuration_within_tolerance_and_deterministic(device):
    """Both paths, both lookups, tiles smaller and larger than a block, one split or many: each meets the bound,
    and a launch repeated gives the same bits (split sums are added in split order, no atomics)."""
    q = weight((45, 1088), "fp4", 64, True, seed=3, device=device)  # 1088 = 17 blocks of 64
    x = randn((4, 1088), torch.bfloat16, seed=4, device=device)
    configs = [dict(use_dot=False, splits=1), dict(use_dot=False, splits=5, lookup="select"),
               dict(use_dot=True, splits=1, tiles=Tiles(16, 32, 4)), dict(use_dot=True, splits=3, lookup="select"),
               dict(use_dot=False, tiles=Tiles(8, 2048, 2), splits=1)]  # fmt: skip
    for config in configs:
        got = matmul_4bit(x, q, **config)
        assert_within_tolerance(got, x, q, torch.bfloat16)
        assert torch.equal(bits(got), bits(matmul_4bit(x, q, **config))), config


def test_k_is_split_for_programs_while_the_partial_sums_stay_small(monkeypatch):
    """On an H100's 132 SMs: one row of a 4096 x 4096 weight splits K for about 8 programs per SM; 32 rows split
    less, so the fp32 partial sums (4 bytes x M x N per split) stay within half the codes' bytes."""
    from qlora.kernels import matmul_4bit as module

    monkeypatch.setattr(module, "_multiprocessors", lambda device: 132)
    cuda = torch.device("cuda")
    one = module.splits_for(1, 4096, 4096, module.default_tiles(1), cuda)
    assert one == 5 and one * 4096 // module.FMA_TILES.block_n >= 8 * 132  # 256 row tiles
    many = module.splits_for(32, 4096, 4096, module.default_tiles(32), cuda)
    assert many == 8 and many * 4 * 32 * 4096 <= 0.5 * 4096 * 4096 / 2  # (17 would give 8 programs per SM)


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dimensions_and_strided_rows(device):
    q = weight((19, 128), "nf4", 64, True, seed=6, device=device)
    wide = randn((2, 3, 140), torch.bfloat16, seed=7, device=device)
    x = wide[..., :128]  # rows 140 apart
    got = matmul_4bit(x, q)
    assert got.shape == (2, 3, 19)
    assert torch.equal(got, matmul_4bit(x.contiguous(), q))
    assert_within_tolerance(got, x, q, torch.bfloat16)
    column_major = randn((128, 3), torch.bfloat16, seed=8, device=device).t()  # stride(-1) != 1
    assert torch.equal(matmul_4bit(column_major, q), matmul_4bit(column_major.contiguous(), q))
    assert matmul_4bit(x[:0, 0], q).shape == (0, 19)


def test_refuses_bad_arguments():
    q = weight((4, 64))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        matmul_4bit(torch.zeros(1, 64, dtype=torch.float64), q)
    with pytest.raises(ValueError, match="last dimension"):
        matmul_4bit(torch.zeros(1, 63), q)
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        matmul_4bit(torch.zeros(MAX_ROWS + 1, 64), q)
    with pytest.raises(ValueError, match="lookup"):
        matmul_4bit(torch.zeros(1, 64), q, lookup="gather")
    with pytest.raises(ValueError, match=">= 16"):
        matmul_4bit(torch.zeros(1, 64), q, use_dot=True, tiles=Tiles(8, 64, 4))
    with pytest.raises(ValueError, match="power of two"):
        Tiles(12, 64, 4)


# --- the dispatch point ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_ops_runs_the_kernel_up_to_max_rows_then_dequantizes(device):
    q = weight((21, 192), "nf4", 64, True, seed=9, device=device)
    kernels = KernelPolicy(kernels="triton")
    x = randn((MAX_ROWS, 192), torch.bfloat16, seed=10, device=device)
    assert torch.equal(bits(ops.matmul_4bit(x, q, policy=kernels)), bits(matmul_4bit(x, q)))
    more = randn((MAX_ROWS + 1, 192), torch.bfloat16, seed=11, device=device)  # the dequantize kernel + a GEMM
    assert torch.equal(bits(ops.matmul_4bit(more, q, policy=kernels)), bits(ops.matmul_4bit(more, q, policy=TWINS)))


def test_the_twin_is_dequantize_then_linear():
    q = weight((21, 192), "fp4", 64, False, seed=12)
    x = randn((2, 5, 192), torch.bfloat16, seed=13)
    want = torch.nn.functional.linear(x, q.dequantize(torch.bfloat16))
    assert torch.equal(bits(ops.matmul_4bit(x, q, policy=TWINS)), bits(want))


# --- real shapes on the GPU ------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096)], ids=str)
@pytest.mark.parametrize("m", [1, 8, 32])
def test_llama_shapes_on_cuda(n, k, m):
    q = weight((n, k), "nf4", 64, True, seed=n + k, device="cuda")
    for dtype in (torch.bfloat16, torch.float16):
        x = randn((m, k), dtype, seed=m, device="cuda")
        assert_within_tolerance(matmul_4bit(x, q), x, q, dtype)
        assert_within_tolerance(matmul_4bit(x, q, use_dot=m <= 2), x, q, dtype)  # the other path


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type,double_quant", FORMATS)
@pytest.mark.parametrize("blocksize", [32, 256, 4096])
def test_formats_and_blocksizes_on_cuda(quant_type, double_quant, blocksize):
    q = weight((11008, 4096), quant_type, blocksize, double_quant, seed=blocksize, device="cuda")
    x = randn((3, 4096), torch.bfloat16, seed=1, device="cuda")
    assert_within_tolerance(matmul_4bit(x, q), x, q, torch.bfloat16)
    eye = torch.eye(4096, dtype=torch.bfloat16, device="cuda")[4000:4032]  # 32 columns of W, bit for bit
    assert torch.equal(matmul_4bit(eye, q), q.dequantize(torch.bfloat16)[:, 4000:4032].t())
