"""Bit-exactness against bitsandbytes' CPU backend (bitsandbytes is a test-only dependency).

What must be identical: packed codes, first-level absmax, nested absmax, offset, and dequantized
values from the same state. Nested 8-bit codes are the one documented exception: bitsandbytes-CPU
(since 0.50) picks them through an approximate lookup table, CUDA and we pick the exact nearest
map entry; wherever the two differ, ours must be the nearer (format-spec 1.5 and 2.2).
"""

import copy

import pytest
import torch
from quant_inputs import DTYPES, randn

import qlora
from qlora.quant.codes import dynamic_map, table_4bit
from qlora.quant.tensor import QuantizedTensor

bnb_functional = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(1, 1), (5, 123), (64, 64), (333, 77), (15,), (3, 5, 7), (1, 4097), (257, 64)]
SEEDS = [0, 1, 2]  # fixed: a failure reproduces, and every run checks the same inputs


def bnb_quantize(x, quant_type, blocksize, double_quant):
    return bnb_functional.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits. `torch.equal` says -0.0 == 0.0; the bytes of a checkpoint do not."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        a, b = (t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()]) for t in (a, b))
    return torch.equal(a, b)


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantization, steered around two defects of its C++ CPU kernel.

    Measured with bitsandbytes 0.50.2 on this CPU (both sides checked against an independent numpy
    evaluation of `table[code] * absmax`, see test_dequantize_reference.py):
    - when blocksize > the tensor's last dimension (e.g. 64 x 64 at blocksize 128..1024) whole
      blocks come back scaled by a neighbour's absmax, in every dtype. Dequantization depends only
      on the flat element order, so we ask for the flat shape and reshape;
    - its float16 output path differs from CUDA (format-spec 2.2); rounding the exact float32
      result to float16 is what dequantization to float16 means, so float16 goes through float32.
    """
    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    if state.dtype == torch.float16:
        flat.dtype = torch.float32
    return bnb_functional.dequantize_4bit(packed, flat).to(state.dtype).reshape(state.shape)


def assert_nested_codes_match_or_ours_nearer(ours: QuantizedTensor, state, absmax: torch.Tensor):
    """Identical nested codes, except where bitsandbytes-CPU's approximate lookup picked a farther entry."""
    codes, theirs = ours.nested.codes, state.absmax
    differ = (codes != theirs).nonzero().flatten()
    if differ.numel() == 0:
        return
    # Recompute the normalised constants exactly as the quantizer saw them (absmax: first level, float32).
    c = absmax - ours.nested.offset
    block = differ // 256
    reciprocal = 1.0 / ours.nested.absmax.clamp(min=1e-38)
    cn = (c[differ] * reciprocal[block]).double()
    table = dynamic_map(True).double()
    ours_dist = (cn - table[codes[differ].long()]).abs()
    theirs_dist = (cn - table[theirs[differ].long()]).abs()
    all_zero_block = ours.nested.absmax[block] == 0  # documented: c == 0, both restore to the offset
    assert torch.all((ours_dist <= theirs_dist) | all_zero_block), "a nested code differs and ours is not nearer"
    assert differ.numel() <= max(2, 0.05 * codes.numel()), f"{differ.numel()} of {codes.numel()} nested codes differ"


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("double_quant", [False, True], ids=["nodq", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_matches_bitsandbytes(shape, dtype, quant_type, double_quant, seed):
    x = randn(shape, dtype, seed)
    ours = qlora.quantize(x, quant_type, 64, double_quant)
    packed, state = bnb_quantize(x, quant_type, 64, double_quant)
    context = f"shape={shape} dtype={dtype} {quant_type} dq={double_quant} seed={seed}"
    assert torch.equal(ours.packed, packed), context
    assert torch.equal(ours.table, state.code), context
    if double_quant:
        first_level = qlora.quantize(x, quant_type, 64, double_quant=False).absmax
        assert torch.equal(first_level.mean(), state.offset), context
        assert torch.equal(ours.nested.offset, state.offset), context
        assert torch.equal(ours.nested.absmax, state.state2.absmax), context
        assert_nested_codes_match_or_ours_nearer(ours, state, first_level)
    else:
        assert torch.equal(ours.absmax, state.absmax), context
    # Dequantization from the same state is bit-identical: read bitsandbytes' state into our container.
    theirs_as_ours = QuantizedTensor.from_bnb_state_dict(
        {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    )
    expected = bnb_dequantize(packed, state)
    assert expected.dtype == dtype
    assert torch.equal(theirs_as_ours.dequantize(), expected), context  # values: see the zero-sign test below


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_every_blocksize_matches_bitsandbytes(blocksize, quant_type):
    for shape, dtype in [((37, 301), torch.bfloat16), ((4096 * 3 + 17,), torch.float32), ((64, 64), torch.float16)]:
        x = randn(shape, dtype, seed=blocksize)
        ours = qlora.quantize(x, quant_type, blocksize, double_quant=False)
        packed, state = bnb_quantize(x, quant_type, blocksize, double_quant=False)
        assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax), (shape, dtype)
        assert torch.equal(ours.dequantize(), bnb_dequantize(packed, state)), (shape, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,quant_type", [(torch.bfloat16, "nf4"), (torch.float16, "fp4"), (torch.float32, "nf4")])
def test_llama_sized_matrix_matches_bitsandbytes(dtype, quant_type):
    x = randn((4096, 11008), dtype, seed=7) * 0.02
    ours = qlora.quantize(x, quant_type, 64, double_quant=True)
    packed, state = bnb_quantize(x, quant_type, 64, double_quant=True)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.nested.absmax, state.state2.absmax) and torch.equal(ours.nested.offset, state.offset)
    assert_nested_codes_match_or_ours_nearer(ours, state, qlora.quantize(x, quant_type, 64, False).absmax)


@pytest.mark.parametrize("double_quant", [False, True], ids=["nodq", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_saved_tables_are_bitsandbytes_bytes(quant_type, double_quant):
    """Every float tensor of our state dict has bitsandbytes' bytes, `quant_map` included: its FP4
    table holds +0.0 at code 8 (equal in value to the -0.0 that code decodes to, not in bytes)."""
    x = randn((64, 96), torch.float32, seed=3)
    ours = qlora.quantize(x, quant_type, 64, double_quant).to_bnb_state_dict("weight")
    packed, state = bnb_quantize(x, quant_type, 64, double_quant)
    theirs = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    assert set(ours) == set(theirs)
    compared = ["weight", "weight.quant_map"] + (["weight.nested_quant_map"] if double_quant else ["weight.absmax"])
    for key in compared:
        assert same_bytes(ours[key], theirs[key]), key
    # Loading theirs and saving again gives their bytes back.
    again = QuantizedTensor.from_bnb_state_dict(theirs).to_bnb_state_dict("weight")
    assert all(same_bytes(again[key], theirs[key]) for key in compared)


def test_fp4_zero_sign_is_what_the_byte_comparison_sees():
    """Negative control for the test above: the decoding table (-0.0 at FP4 code 8) has the same
    values as bitsandbytes' saved map, so `torch.equal` passes, but not the same bytes."""
    saved = bnb_quantize(torch.randn(64), "fp4", 64, double_quant=False)[1].code
    decoding = table_4bit("fp4")
    assert torch.equal(decoding, saved) and not same_bytes(decoding, saved)
    assert torch.signbit(decoding[8]) and not torch.signbit(saved[8])
    assert same_bytes(table_4bit("nf4"), bnb_quantize(torch.randn(64), "nf4", 64, double_quant=False)[1].code)
    # What code 8 decodes to: -0.0 in ours, as in bitsandbytes' C++ CPU kernel (an even last dimension)
    # and its CUDA kernel. Its Python fallback (odd last dimension) looks the code up in the saved
    # table and gives +0.0, so the parity tests above compare dequantized values, not bytes.
    x = torch.tensor([1.0, 0.001] * 32)  # on CPU a small positive value takes code 8 (see blockwise.py)
    packed, state = bnb_quantize(x, "fp4", 64, double_quant=False)
    assert packed[0, 0].item() & 0xF == 8
    theirs, ours = bnb_dequantize(packed, state), qlora.quantize(x, "fp4", 64, double_quant=False).dequantize()
    assert torch.signbit(theirs[1]) and same_bytes(ours, theirs)


def test_all_zero_blocks_follow_our_convention():
    """Zero block: absmax 0, every nibble the code of 0.0 (NF4 0x77), dequantizes to +0.0."""
    x = torch.zeros(3 * 64 + 10)
    x[64:128] = torch.linspace(-1, 1, 64)
    q = qlora.quantize(x, "nf4", 64, double_quant=False)
    assert q.absmax[0] == 0 and q.absmax[2] == 0 and q.absmax[3] == 0
    assert torch.all(q.packed[:32] == 0x77) and torch.all(q.packed[64:] == 0x77)
    out = q.dequantize()
    assert torch.equal(out[:64], torch.zeros(64)) and not torch.signbit(out[:64]).any()
    packed, state = bnb_quantize(x, "nf4", 64, double_quant=False)
    assert torch.equal(q.packed, packed)  # same codes as bitsandbytes-CPU
    assert state.absmax[3] == 1e-38  # bitsandbytes-CPU's zero *partial* block absmax (ours: 0.0)


def test_odd_numel_pads_with_code_of_zero():
    x = torch.linspace(-1, 1, 15)
    q = qlora.quantize(x, "nf4", 64, double_quant=False)
    assert q.packed.shape == (8, 1) and q.packed[-1, 0] & 0xF == 7
    assert qlora.quantize(x, "fp4", 64, double_quant=False).packed[-1, 0] & 0xF == 0


def test_nibble_order_high_nibble_first():
    x = torch.tensor([1.0, -1.0, 0.5, 0.0] + [0.0] * 60)
    q = qlora.quantize(x, "nf4", 64, double_quant=False)
    assert q.packed[:2, 0].tolist() == [0xF0, 0xC7]  # format-spec 1.3's measured example
