"""What a run computes in, and where: dtypes by name, the compute dtype `auto` (bfloat16 where the
device computes it natively, float32 elsewhere, decided once with a reason the caller logs), and the
device `auto` (CUDA if available, else the CPU).

The names (canonical and aliases) are `qlora.config.names`' one table; this module adds the torch
side (`torch_dtype("bf16") is torch.bfloat16`) and the device question. Why `auto` and not a fixed
bfloat16: on a CPU without bf16 instructions (AVX-512 BF16 or AMX) PyTorch emulates every bf16
matmul, many times slower than float32 (measured: docs/LOG.md, 2026-12-06, "Compute dtype auto").
CUDA GPUs from Ampere on and CPUs with AVX-512 BF16 or AMX compute bf16 at full speed or faster,
and there bf16 (the QLoRA paper's compute dtype) halves activation memory.

The CPU's instruction sets come from `/proc/cpuinfo` (Linux) and
`torch.backends.cpu.get_cpu_capability()`; tests inject the flags (`cpu_flags=...`), so the
decision is checked without depending on the machine that runs them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from qlora.config.errors import ConfigError
from qlora.config.names import AUTO, DTYPE_ALIASES, DTYPE_NAMES, canonical_dtype_name

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic on x86
CPUINFO = Path("/proc/cpuinfo")


def torch_dtype(name: str) -> torch.dtype:
    """torch.bfloat16 for "bfloat16" or "bf16" (any name of the table); ConfigError for anything else."""
    canonical = canonical_dtype_name(name)
    if canonical not in DTYPES:
        known = ", ".join([*DTYPE_NAMES, *DTYPE_ALIASES])
        raise ConfigError(f"unknown dtype {name!r}: use one of {known}")
    return DTYPES[canonical]


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a dtype of the table ("bfloat16")."""
    return str(dtype).removeprefix("torch.")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (or of the text `cpuinfo`); empty where there is no such file."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / arm64
            return frozenset(value.split())
    return frozenset()


def _cpu_bf16(flags: Iterable[str], capability: str) -> tuple[bool, str]:
    flags = set(flags)
    native = [f for f in CPU_BF16_FLAGS if f in flags]
    if native:
        return True, f"this CPU computes bf16 natively ({', '.join(native)})"
    has = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else capability or "no AVX2"
    return False, (f"this CPU has {has} but no AVX-512 BF16 or AMX, where a bf16 matmul is emulated and many "
                   "times slower (measured 37x on an AVX2 machine)")  # fmt: skip


def resolve_compute_dtype(
    name: str,
    device: torch.device | str,
    *,
    cpu_features: Iterable[str] | None = None,
    cuda_bf16: bool | None = None,
) -> tuple[torch.dtype, str]:
    """The compute dtype `name` means on `device`, and why: (torch dtype, reason to log).

    `name`: "auto" or a dtype name or alias. "auto" is bfloat16 on a CUDA device that supports it
    (`torch.cuda.is_bf16_supported()`) and on a CPU with AVX-512 BF16 or AMX, float32 elsewhere.
    `cpu_features` and `cuda_bf16` replace what this machine reports (for tests).
    """
    device = torch.device(device)
    if canonical_dtype_name(name) != AUTO:
        dtype = torch_dtype(name)
        return dtype, f"compute dtype {dtype_name(dtype)}: as asked"
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        if supported:
            return torch.bfloat16, "compute dtype bfloat16 (auto): this GPU computes bf16 natively"
        return torch.float32, ("compute dtype float32 (auto): this GPU has no native bf16 (it predates Ampere); "
                               "--compute-dtype float16 is the half-precision choice there")  # fmt: skip
    if device.type == "cpu":
        flags = cpu_flags() if cpu_features is None else cpu_features
        capability = torch.backends.cpu.get_cpu_capability() if cpu_features is None else ""
        native, why = _cpu_bf16(flags, capability)
        if native:
            return torch.bfloat16, f"compute dtype bfloat16 (auto): {why}"
        return torch.float32, f"compute dtype float32 (auto): {why}"
    return torch.float32, f"compute dtype float32 (auto): no bf16 speed-up known for device type {device.type!r}"


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda if available, else cpu; any other name as torch spells it (ConfigError if CUDA is absent)."""
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device / device is {name!r} but no CUDA device is available")
    return device
