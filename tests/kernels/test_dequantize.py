"""The Triton 4-bit dequantizer against its twin, `QuantizedTensor.dequantize`: bit for bit."""

import pytest
import torch
from kernel_inputs import DEVICES, bits, randn

import qlora
from qlora.kernels.dequantize import dequantize_4bit

OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# Small odd shapes: partial last blocks, odd element counts (a pad nibble), one block, many blocks.
CASES = [
    ((3, 37), 64),  # 111 elements: one full block + a partial one, odd count
    ((5, 123), 32),  # smallest blocksize, odd count
    ((1001,), 128),
    ((2, 4099), 4096),  # largest blocksize, partial second block, odd count
    ((300, 256), 32),  # 2400 blocks: more than one nested block of 256 absmax codes
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("shape,blocksize", CASES, ids=str)
def test_dequantize_is_bit_exact_to_reference(shape, blocksize, quant_type, double_quant, device):
    q = qlora.quantize(randn(shape, torch.bfloat16, seed=blocksize, device=device), quant_type, blocksize,
                       double_quant)  # fmt: skip
    for dtype in OUT_DTYPES:
        got = dequantize_4bit(q, dtype)
        want = q.dequantize(dtype)
        assert got.shape == want.shape and got.dtype == dtype
        assert torch.equal(bits(got), bits(want)), f"{dtype}: {(bits(got) != bits(want)).sum()} elements differ"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lookup", ["load", "select"])
@pytest.mark.parametrize("bytes_per_program", [16, 1024])
def test_every_launch_configuration_gives_the_same_bits(lookup, bytes_per_program, device):
    q = qlora.quantize(randn((7, 333), torch.float32, seed=1, device=device), "nf4", 64, True)
    got = dequantize_4bit(q, torch.bfloat16, lookup=lookup, bytes_per_program=bytes_per_program)
    assert torch.equal(bits(got), bits(q.dequantize(torch.bfloat16)))


@pytest.mark.parametrize("device", DEVICES)
def test_double_quant_restore_is_multiply_then_add_not_fma(device):
    """A fused multiply-add rounds once; the format rounds the product and the sum separately.

    The input is chosen so that some blocks' absmax differ between the two (checked in float64, so
    the test cannot pass vacuously); the kernel must match the reference on exactly those blocks.
    Meaningful on CUDA (the interpreter never fuses); it fails if `enable_fp_fusion=False` is dropped.
    """
    q = qlora.quantize(randn((64, 256), torch.float32, seed=5, device=device), "nf4", 32, True)
    n = q.nested
    product = n.table[n.codes.long()] * n.absmax.repeat_interleave(256)[: n.codes.numel()]
    two_roundings = product + n.offset
    fused = (n.table[n.codes.long()].double() * n.absmax.repeat_interleave(256)[: n.codes.numel()].double()
             + n.offset.double()).float()  # fmt: skip
    differ = (two_roundings != fused).nonzero().flatten()
    assert differ.numel() > 0, "no block distinguishes FMA from two roundings: pick another seed"
    got = dequantize_4bit(q, torch.float32).view(-1, 32)[differ]  # the 4-bit blocks whose absmax is at stake
    want = q.dequantize(torch.float32).view(-1, 32)[differ]
    assert torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("device", DEVICES)
def test_writes_into_a_given_buffer(device):
    q = qlora.quantize(randn((9, 70), torch.bfloat16, seed=2, device=device), "nf4", 64, True)
    buffer = torch.full((630,), float("nan"), dtype=torch.bfloat16, device=device)
    got = dequantize_4bit(q, torch.bfloat16, out=buffer)
    assert got.data_ptr() == buffer.data_ptr()
    assert torch.equal(bits(got), bits(q.dequantize(torch.bfloat16)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocksize", [32, 64])
def test_writes_into_the_left_columns_of_a_wider_matrix(blocksize, device):
    """Rows strided apart (the LoRA forward appends the adapter's columns): the weight lands in the left
    columns bit for bit, and not one element of the columns to its right is touched."""
    q = qlora.quantize(randn((13, 3 * blocksize), torch.bfloat16, seed=3, device=device), "nf4", blocksize, True)
    wide = torch.full((13, 3 * blocksize + 11), float("nan"), dtype=torch.bfloat16, device=device)
    got = dequantize_4bit(q, torch.bfloat16, out=wide[:, : 3 * blocksize])
    assert got.data_ptr() == wide.data_ptr() and got.stride() == wide.stride()
    assert torch.equal(bits(wide[:, : 3 * blocksize]), bits(q.dequantize(torch.bfloat16)))
    assert wide[:, 3 * blocksize :].isnan().all()


def test_refuses_bad_arguments():
    q = qlora.quantize(randn((4, 64), torch.float32), "nf4", 64, False)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        dequantize_4bit(q, torch.int8)
    with pytest.raises(ValueError, match="lookup"):
        dequantize_4bit(q, lookup="gather")
    with pytest.raises(ValueError, match="power of two"):
        dequantize_4bit(q, bytes_per_program=100)
    with pytest.raises(ValueError, match="256 elements"):
        dequantize_4bit(q, torch.float32, out=torch.empty(5))
    with pytest.raises(ValueError, match="multiple of blocksize 64"):  # a block would straddle two rows
        q96 = qlora.quantize(randn((4, 96)), "nf4", 64, False)
        dequantize_4bit(q96, torch.float32, out=torch.empty(4, 100)[:, :96])
    with pytest.raises(ValueError, match="unit column stride"):
        dequantize_4bit(q, torch.float32, out=torch.empty(64, 4).t())


@pytest.mark.parametrize("device", DEVICES)
def test_a_state_loaded_from_bitsandbytes_keys_dequantizes_the_same(device):
    """A QuantizedTensor read back from bitsandbytes' state-dict keys (how checkpoints arrive) works too."""
    q = qlora.quantize(randn((6, 100), torch.float16, seed=4, device=device), "fp4", 64, True)
    loaded = qlora.QuantizedTensor.from_bnb_state_dict(q.to_bnb_state_dict("w"), prefix="w")
    assert torch.equal(bits(dequantize_4bit(loaded)), bits(q.dequantize()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_matches_the_table_lookup_formula(quant_type, double_quant, device):
    """Against the format written out here: nibbles (high first) index the code table, times the
    block's absmax; double quantization restores absmax as fp32(fp32(map[c] * nested) + offset). The
    products are exact in float64 and rounded to float32 as the format does, then to the output dtype
    (rounding the exact float32 value): bit-exact, no tolerance."""
    from qlora.quant.codes import dynamic_map, table_4bit

    shape, blocksize = (5, 123), 32
    q = qlora.quantize(randn(shape, torch.bfloat16, seed=3, device=device), quant_type, blocksize, double_quant)
    packed = q.packed.reshape(-1).cpu().long()
    codes = torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)[: shape[0] * shape[1]]
    if double_quant:
        n = q.nested
        nested = n.absmax.cpu().double().repeat_interleave(256)[: n.codes.numel()]
        scaled = (dynamic_map(True).double()[n.codes.cpu().long()] * nested).float()
        absmax = (scaled.double() + n.offset.cpu().double()).float()
    else:
        absmax = q.absmax.cpu()
    per_element = absmax.double().repeat_interleave(blocksize)[: codes.numel()]
    exact = (table_4bit(quant_type).double()[codes] * per_element).float().reshape(shape)
    for dtype in OUT_DTYPES:
        got = dequantize_4bit(q, dtype).cpu()
        assert torch.equal(bits(got), bits(exact.to(dtype))), f"{dtype}: {(bits(got) != bits(exact.to(dtype))).sum()}"
    # control: the other nibble order is another tensor
    swapped = torch.stack((packed & 0xF, packed >> 4), dim=1).reshape(-1)[: codes.numel()]
    assert not torch.equal(table_4bit(quant_type)[swapped].reshape(shape), table_4bit(quant_type)[codes].reshape(shape))
