"""Triton kernels for CUDA: 4-bit dequantization and the fused elementwise paths of a training step.

Floor 2: imports only `qlora.quant` (the specification each kernel is tested against) and
`qlora.config`. Importing this package never imports Triton: the submodules do, and `qlora.ops`
imports them only after `triton_importable()` says yes, so a CPU-only install without Triton keeps
working on the plain-PyTorch twins.

Every kernel has a plain-PyTorch twin (the reference in `qlora.quant`, the model's own formula, or
`torch.nn.functional`); `tests/kernels/` compares them on small odd-sized inputs under
`TRITON_INTERPRET=1` on the CPU and on CUDA when there is a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

# Widest row the fused RMSNorm holds in registers; `qlora.ops` sends wider rows to the twin without
# importing the kernel module (which imports Triton).
RMS_NORM_MAX_HIDDEN = 16384


@functools.cache
def triton_importable() -> bool:
    """True when `import triton` would succeed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: kernels then run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
