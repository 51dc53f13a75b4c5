"""Dtypes by name and the compute dtype `auto`: bf16 only where the device computes it natively.

The machine's CPU flags and CUDA support are injected, so each branch is checked on any machine.
"""

from __future__ import annotations

import pytest
import torch

from qlora.config import ConfigError
from qlora.precision import cpu_flags, dtype_name, resolve_compute_dtype, torch_dtype

AVX2_ONLY = {"sse4_2", "avx", "avx2", "fma"}


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                         ("fp16", torch.float16), ("float16", torch.float16),
                                         ("fp32", torch.float32), ("float32", torch.float32)])  # fmt: skip
def test_every_name_and_alias_maps_to_its_dtype(name, dtype):
    assert torch_dtype(name) is dtype
    assert torch_dtype(dtype_name(dtype)) is dtype


def test_unknown_dtype_names_the_accepted_ones():
    with pytest.raises(ConfigError, match="unknown dtype 'f16'.*bfloat16.*bf16"):
        torch_dtype("f16")  # a GGUF type name, not a dtype


def test_auto_on_an_avx2_cpu_is_float32_with_the_reason():
    dtype, reason = resolve_compute_dtype("auto", "cpu", cpu_features=AVX2_ONLY)
    assert dtype is torch.float32
    assert "float32" in reason and "AVX2" in reason and "no AVX-512 BF16 or AMX" in reason


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_auto_on_a_cpu_with_native_bf16_is_bfloat16(flag):
    dtype, reason = resolve_compute_dtype("auto", "cpu", cpu_features=AVX2_ONLY | {"avx512f", flag})
    assert dtype is torch.bfloat16 and flag in reason


def test_auto_on_cuda_follows_bf16_support():
    assert resolve_compute_dtype("auto", "cuda", cuda_bf16=True)[0] is torch.bfloat16
    dtype, reason = resolve_compute_dtype("auto", "cuda:0", cuda_bf16=False)
    assert dtype is torch.float32 and "no native bf16" in reason


def test_an_explicit_dtype_wins_over_the_device():
    assert resolve_compute_dtype("bf16", "cpu", cpu_features=AVX2_ONLY) == (torch.bfloat16, "compute dtype "
                                                                            "bfloat16: as asked")  # fmt: skip
    assert resolve_compute_dtype("float32", "cuda", cuda_bf16=True)[0] is torch.float32


def test_cpu_flags_are_read_from_cpuinfo_text():
    text = "processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 amx_bf16\n"
    assert cpu_flags(text) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags("processor : 0\n") == frozenset()
