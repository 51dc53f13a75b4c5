"""Shared helpers for the kernel tests: the interpreter switch, the devices, bitwise comparison.

The CPU tests run each Triton kernel through Triton's interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU, before anything imports triton (it must be; see there).
The GPU tests run the compiled kernels on CUDA and skip without one (tests/conftest.py).
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The devices a test runs on: the CPU through the interpreter, CUDA compiled (gpu-marked).
DEVICES = [pytest.param("cpu", id="interpreter")] if INTERPRETED else []
DEVICES.append(pytest.param("cuda", id="cuda", marks=pytest.mark.gpu))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor (so -0.0 != +0.0 and NaN == same NaN)."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def randn(shape, dtype=torch.float32, seed=0, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float32) * scale).to(device=device, dtype=dtype)
