"""Code tables: the 16 values a 4-bit code stands for, and the 256-value 8-bit dynamic maps.

Glossary used across `qlora.quant` (bitsandbytes' vocabulary, because that is the format we match):
- *code*: a small integer stored in the packed tensor (0..15 for 4-bit, 0..255 for 8-bit);
- *table* (bitsandbytes says `quant_map` / `code`): the float32 value each code stands for, in
  code order, on the normalised scale [-1, 1];
- *thresholds*: the float32 midpoints between neighbouring table values in sorted order. A
  normalised value `xn` gets the code whose table value is nearest; we implement that as
  `position = #{ t : t < xn }` (strictly less, so a value exactly on a midpoint takes the lower
  code). This is the rule of bitsandbytes' CUDA comparison tree and of its CPU/default backend.

Provenance of each table:
- NF4 (4-bit NormalFloat, QLoRA paper section 3): bitsandbytes' `create_normal_map(offset=0.9677083,
  use_extra_value=True)`: standard-normal quantiles at 8 equally spaced points from 0.9677083 down to
  (not including) 0.5 for the positive half, 7 for the negative half, an exact zero, all divided by
  the maximum. Computing it needs scipy, so like bitsandbytes we store the float32 result (exact
  bit patterns below); `tests/quant/test_codes.py` regenerates it from the quantiles.
- FP4 (E2M1, bitsandbytes' table): stored in *bit-pattern order*: bit 3 is the sign, the low three
  bits index the magnitudes 0, 0.0625, 8, 12, 4, 6, 2, 3 divided by 12. Code 8 decodes to -0.0 (the
  sign bit, as bitsandbytes' kernels decode it), but the `quant_map` bitsandbytes *saves* holds +0.0
  there (its source writes the integer `-0`): `saved_table_4bit` is that table, byte for byte.
- INT4 (for the paper's data-type comparison, not a bitsandbytes format): symmetric absmax
  integer quantization, code = k + 8 for the integer k in [-8, 7], value k / 7. Code 0 (-8/7) lies
  outside [-1, 1] and is never chosen, so the 15 levels -7/7 .. 7/7 are symmetric around zero.
- Signed / unsigned 8-bit dynamic maps (double quantization of absmax; 8-bit optimizer state):
  bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`. For each decade
  i = 0..6, the midpoints of 2^i + 1 (signed) or 2^(i+1) + 1 (unsigned) equally spaced float32
  points in [0.1, 1] are scaled by 10^(i-6) (signed: with their negations); 0 and 1 are added and
  the result sorted. The float32 rounding of `linspace` and of the scaling is part of the format, so
  we derive the map exactly that way and a test pins its SHA-256 against the published one.
"""

from __future__ import annotations

import functools
import struct

import torch

QUANT_TYPES_4BIT = ("nf4", "fp4", "int4")

# NF4 as float32 bit patterns, code order (= ascending value order).
_NF4_BITS = (
    0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
    0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000,
)  # fmt: skip

# FP4 (E2M1) magnitudes for the low three bits 000..111, before division by the maximum (12).
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


def _float32_from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


@functools.cache
def _table_4bit_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        values = [_float32_from_bits(b) for b in _NF4_BITS]
        return torch.tensor(values, dtype=torch.float32)
    if quant_type == "fp4":
        magnitudes = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32) / 12.0
        return torch.cat([magnitudes, -magnitudes])  # codes 8..15 carry the sign bit
    if quant_type == "int4":
        return torch.arange(-8, 8, dtype=torch.float32) / 7.0
    raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")


def table_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 float32 values of a 4-bit data type, indexed by code: what each code decodes to."""
    return _table_4bit_cpu(quant_type).to(device)


@functools.cache
def _saved_table_4bit_cpu(quant_type: str) -> torch.Tensor:
    table = _table_4bit_cpu(quant_type)
    return torch.where(table == 0, torch.zeros_like(table), table)  # -0.0 == 0: becomes +0.0


def saved_table_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 4-bit table as bitsandbytes saves it (`quant_map`), a fresh tensor: `table_4bit` with
    every zero +0.0. Equal in value; only FP4's code 8 differs in its bytes (+0.0 there, -0.0 in
    `table_4bit`)."""
    return _saved_table_4bit_cpu(quant_type).to(device, copy=True)


@functools.cache
def _sorted_thresholds_cpu(table_key: tuple[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    table = _table_4bit_cpu(table_key[0]) if table_key[1] == 4 else dynamic_map(table_key[0] == "signed")
    # A stable sort keeps the lower code first among equal values (FP4 has +0.0 at code 0 and
    # -0.0 at code 8): bitsandbytes' CPU backend resolves the +-0 tie the same way (tested).
    values, order = torch.sort(table, stable=True)
    # fp32(a + b) / 2 is the correctly rounded midpoint: halving is exact in binary floating point.
    thresholds = (values[:-1] + values[1:]) / 2
    return thresholds, order.to(torch.uint8)


def thresholds_and_order(quant_type: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted float32 midpoints of a 4-bit table, and the code of each sorted position.

    `code = order[#{t : t < xn}]`. For NF4 and INT4 `order` is the identity.
    """
    thresholds, order = _sorted_thresholds_cpu((quant_type, 4))
    return thresholds.to(device), order.to(device)


@functools.cache
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    max_exponent_bits = 7
    values: list[torch.Tensor] = []
    for i in range(max_exponent_bits):
        n_points = 2**i + 1 if signed else 2 ** (i + 1) + 1
        points = torch.linspace(0.1, 1.0, n_points, dtype=torch.float32)
        midpoints = (points[:-1] + points[1:]) / 2.0
        scaled = midpoints * 10 ** (-(max_exponent_bits - 1) + i)  # float32 product: part of the format
        values.append(scaled)
        if signed:
            values.append(-scaled)
    values.append(torch.tensor([0.0, 1.0], dtype=torch.float32))
    return torch.sort(torch.cat(values)).values


def dynamic_map(signed: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' 256-entry 8-bit dynamic map (sorted float32)."""
    return _dynamic_map_cpu(signed).to(device)


def dynamic_map_thresholds(signed: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 255 float32 midpoints of the dynamic map; code = #{t : t < x} (ties to the lower code)."""
    thresholds, _ = _sorted_thresholds_cpu(("signed" if signed else "unsigned", 8))
    return thresholds.to(device)
