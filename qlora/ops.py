"""The one dispatch point between layers and implementations of the heavy 4-bit operations.

Layers call `ops.dequantize(q, dtype)` and never ask which device they are on. This module picks an
implementation: a registered fast kernel for the tensor's device when one is available, else the
plain-PyTorch reference in `qlora.quant` (the specification every kernel is tested against).
`use_implementation("reference")` forces the reference, so tests can run any path on any machine.

Kernels register themselves with `register_dequantize(device_type, name, fn)`; nothing is
registered here, so on a machine without one every call runs the reference.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch

from qlora.quant.tensor import QuantizedTensor

DequantizeFn = Callable[[QuantizedTensor, torch.dtype], torch.Tensor]

_KERNELS: dict[str, tuple[str, DequantizeFn]] = {}  # device type -> (name, function)
_state = threading.local()


def register_dequantize(device_type: str, name: str, fn: DequantizeFn) -> None:
    """Make `fn` the dequantize implementation for tensors on `device_type` (e.g. "cuda")."""
    _KERNELS[device_type] = (name, fn)


@contextlib.contextmanager
def use_implementation(name: str) -> Iterator[None]:
    """Force "reference" or a registered kernel's name (or "auto") inside the block."""
    previous = getattr(_state, "forced", "auto")
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = previous


def _reference_dequantize(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    return q.dequantize(dtype)


def resolve_dequantize(device_type: str) -> tuple[str, DequantizeFn]:
    """The (name, function) that `dequantize` will use for a tensor on `device_type`."""
    forced = getattr(_state, "forced", "auto")
    if forced == "reference":
        return "reference", _reference_dequantize
    kernel = _KERNELS.get(device_type)
    if forced == "auto":
        return kernel if kernel is not None else ("reference", _reference_dequantize)
    if kernel is None or kernel[0] != forced:
        raise RuntimeError(f"implementation {forced!r} is not registered for device type {device_type!r}")
    return kernel


def dequantize(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of `q` in `dtype`, by the implementation chosen for its device."""
    return resolve_dequantize(q.device.type)[1](q, dtype)
