"""Bit-exactness against bitsandbytes' CPU backend (bitsandbytes is a test-only dependency).

What must be identical: packed codes, first-level absmax, nested absmax, offset, and dequantized
values from the same state. Nested 8-bit codes are the one documented exception: bitsandbytes-CPU
(since 0.50) picks them through an approximate lookup table, CUDA and we pick the exact nearest
map entry; wherever the two differ, ours must be the nearer (format-spec 1.5 and 2.2).
"""

import copy
import random

import pytest
import torch
from quant_inputs import DTYPES, randn

import qlora
from qlora.quant.codes import dynamic_map
from qlora.quant.tensor import QuantizedTensor

bnb_functional = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(1, 1), (5, 123), (64, 64), (333, 77), (15,), (3, 5, 7), (1, 4097), (257, 64)]
FRESH_SEED = random.SystemRandom().randrange(1 << 30)  # a new seed each run, shown in the test id


def bnb_quantize(x, quant_type, blocksize, double_quant):
    return bnb_functional.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)


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


@pytest.mark.parametrize("seed", [0, 1, FRESH_SEED], ids=lambda s: f"seed{s}")
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
    assert torch.equal(theirs_as_ours.dequantize(), expected), context


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
