"""Round-trip error on N(0, 1) data against calibrated statistics (tests/reference/quant_error_stats.py)."""

import json
from pathlib import Path

import pytest
import torch

import qlora
import qlora.quant.codes as codes
from qlora.quant.double_quant import double_quantize

STATS = json.loads((Path(__file__).parent / "quant_error_stats.json").read_text())
K_SIGMA = 7  # bitsandbytes' habit: far enough from the mean never to flake, tight enough to catch a wrong table


def mean_abs_error(quant_type, blocksize, double_quant, seed):
    x = torch.randn(STATS["n"], generator=torch.Generator().manual_seed(seed))
    return (qlora.quantize(x, quant_type, blocksize, double_quant).dequantize() - x).abs().mean().item()


def within_calibration(error, quant_type, blocksize, double_quant) -> bool:
    s = STATS["stats"][f"{quant_type}-bs{blocksize}-{'dq' if double_quant else 'nodq'}"]
    return abs(error - s["mean"]) <= K_SIGMA * s["std"]


@pytest.mark.parametrize("double_quant", [False, True], ids=["nodq", "dq"])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_round_trip_error_matches_calibration(quant_type, blocksize, double_quant):
    for seed in (0, 1):
        error = mean_abs_error(quant_type, blocksize, double_quant, seed)
        assert within_calibration(error, quant_type, blocksize, double_quant), (quant_type, blocksize, error)


@pytest.mark.parametrize("blocksize", [64, 256])
def test_nf4_beats_fp4_and_int4_on_normal_data(blocksize):
    errors = {qt: mean_abs_error(qt, blocksize, True, seed=2) for qt in ("nf4", "fp4", "int4")}
    assert errors["nf4"] < errors["fp4"] and errors["nf4"] < errors["int4"], errors


def test_swapped_tables_fail_the_calibrated_check(monkeypatch):
    """Negative control: with NF4 and FP4 tables swapped, the calibrated checks must fail."""
    nf4, fp4 = codes._table_4bit_cpu("nf4"), codes._table_4bit_cpu("fp4")
    real = codes._table_4bit_cpu

    def swapped(quant_type):
        return {"nf4": fp4, "fp4": nf4}.get(quant_type) if quant_type in ("nf4", "fp4") else real(quant_type)

    monkeypatch.setattr(codes, "_table_4bit_cpu", swapped)
    codes._sorted_thresholds_cpu.cache_clear()
    try:
        monkeypatch.setattr("qlora.quant.blockwise.table_4bit", lambda qt, device="cpu": swapped(qt).to(device))
        assert not within_calibration(mean_abs_error("nf4", 64, True, 0), "nf4", 64, True)
        assert not within_calibration(mean_abs_error("fp4", 64, True, 0), "fp4", 64, True)
    finally:
        monkeypatch.undo()
        codes._sorted_thresholds_cpu.cache_clear()
    assert within_calibration(mean_abs_error("nf4", 64, True, 0), "nf4", 64, True)


def test_double_quant_chunking_never_changes_a_byte():
    absmax = torch.rand(256 * 37 + 5) + 0.5
    whole = double_quantize(absmax, chunk_elements=1 << 30)
    for chunk in (256, 256 * 5, 1000):
        for a, b in zip(whole, double_quantize(absmax, chunk_elements=chunk), strict=True):
            assert torch.equal(a, b)


def test_double_quant_error_is_small_relative_to_absmax():
    """Restored constants are within the 8-bit map's resolution: < 1% of the nested block range."""
    x = torch.randn(4096, 512, generator=torch.Generator().manual_seed(4))
    plain = qlora.quantize(x, "nf4", 64, False).absmax
    restored = qlora.quantize(x, "nf4", 64, True).float_absmax()
    assert (restored - plain).abs().max() < 0.01 * (plain - plain.mean()).abs().max()
    assert not torch.equal(restored, plain)  # it is lossy: the check above is not vacuous
