"""The code tables: bit patterns, provenance (regenerated from first principles), published hashes."""

import hashlib

import numpy as np
import pytest
import torch

from qlora.quant.codes import dynamic_map, dynamic_map_thresholds, table_4bit, thresholds_and_order

# SHA-256 of the little-endian float32 bytes, as published in format-spec 1.1 and 1.5.
NF4_SHA256 = "8501941daa1b8a90ad1bbfeb632e5101b5dddbc4bb52d6e55abcfd777e60c06a"
SIGNED_MAP_SHA256 = "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"
UNSIGNED_MAP_SHA256 = "305f002cc11278fb769d13b25b9fd0c7c83c8402c40a878fe086f4039fde6398"


def sha256_f32(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().astype("<f4").tobytes()).hexdigest()


def test_nf4_table_hash_and_shape():
    nf4 = table_4bit("nf4")
    assert sha256_f32(nf4) == NF4_SHA256
    assert nf4[0] == -1.0 and nf4[7] == 0.0 and nf4[15] == 1.0
    assert torch.all(nf4[1:] > nf4[:-1])


def test_nf4_table_regenerated_from_normal_quantiles():
    """QLoRA's construction: quantiles of N(0,1) with offset 0.9677083 (8 positive, 7 negative, 0).

    The probabilities come from a float32 `linspace` and the normalisation runs in float32, as in the
    original construction; evaluated in float64 throughout, two entries land 1 ulp away.
    """
    norm = pytest.importorskip("scipy.stats").norm
    offset = 0.9677083
    positive = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())).tolist()
    values = torch.tensor(sorted(positive + [0.0] + negative), dtype=torch.float32)
    assert torch.equal(values / values.max(), table_4bit("nf4"))
    in_float64 = torch.tensor(sorted(norm.ppf(np.linspace(offset, 0.5, 9)[:-1]).tolist() + [0.0]
                                     + (-norm.ppf(np.linspace(offset, 0.5, 8)[:-1])).tolist()), dtype=torch.float64)
    assert not torch.equal((in_float64 / in_float64.max()).float(), table_4bit("nf4"))  # the float32 steps matter


def test_fp4_table_is_e2m1_in_bit_pattern_order():
    fp4 = table_4bit("fp4")
    expected_hex = [0x00000000, 0x3BAAAAAB, 0x3F2AAAAB, 0x3F800000, 0x3EAAAAAB, 0x3F000000, 0x3E2AAAAB, 0x3E800000]
    assert fp4[:8].view(torch.int32).tolist() == expected_hex
    assert torch.equal(fp4[8:], -fp4[:8])


def test_int4_table_is_symmetric_absmax():
    int4 = table_4bit("int4")
    assert torch.equal(int4 * 7, torch.arange(-8, 8, dtype=torch.float32))
    thresholds, order = thresholds_and_order("int4")
    assert torch.equal(order, torch.arange(16, dtype=torch.uint8))
    # -1 and +1 are reachable, code 0 (-8/7) is not: its upper threshold lies below -1.
    assert thresholds[0] < -1.0 < thresholds[1]


def test_nf4_thresholds_match_published_float32_midpoints():
    thresholds, order = thresholds_and_order("nf4")
    published = [0xBF591CD8, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871, 0x3D22FAFF,
                 0x3DF64862, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D04, 0x3F248DAF, 0x3F5C89DA]  # fmt: skip
    assert thresholds.view(torch.int32).tolist() == [b - (1 << 32) if b >= 1 << 31 else b for b in published]
    assert torch.equal(order, torch.arange(16, dtype=torch.uint8))


@pytest.mark.parametrize("signed,digest", [(True, SIGNED_MAP_SHA256), (False, UNSIGNED_MAP_SHA256)])
def test_dynamic_maps_match_published_hashes(signed, digest):
    m = dynamic_map(signed)
    assert m.numel() == 256 and sha256_f32(m) == digest
    assert torch.all(m[1:] > m[:-1])
    assert dynamic_map_thresholds(signed).numel() == 255


def test_signed_map_shape_of_values():
    m = dynamic_map(True)
    assert (m < 0).sum() == 127 and (m == 0).sum() == 1 and m[-1] == 1.0
    assert -1.0 not in m.tolist()
