"""Swap the decoder's elementwise modules for ones that call `qlora.ops` (fused Triton kernels on CUDA).

The model (`qlora.model.llama`) knows nothing about kernels: it computes RMSNorm, SwiGLU and RoPE
in plain PyTorch, each in a module of its own (`RMSNorm`, `SiluMul`, `Rotary`). This pass, like
the LoRA module swap, replaces those modules by type with subclasses whose forward goes through
the dispatch point: on CUDA with Triton the fused kernels run, elsewhere `ops`' twins, which are
bit-identical to the model's own formulas (tests/test_ops.py), so swapping is always safe. Norm
weights stay the same `Parameter` objects, so state dicts, adapters and optimizers see no change.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora import ops
from qlora.model.llama import RMSNorm, Rotary, SiluMul


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, out_dtype)


class FusedSiluMul(SiluMul):
    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return ops.swiglu(gate, up)


class FusedRotary(Rotary):
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return ops.apply_rotary(x, cos, sin)


def _fused_copy(module: nn.Module) -> nn.Module | None:
    if type(module) is RMSNorm:
        fused = FusedRMSNorm.__new__(FusedRMSNorm)
        fused.__dict__ = module.__dict__.copy()  # the same weight Parameter, eps and hooks
        return fused
    if type(module) is SiluMul:
        return FusedSiluMul()
    if type(module) is Rotary:
        return FusedRotary()
    return None


def use_fused_elementwise(model: nn.Module) -> list[str]:
    """Replace every RMSNorm, SiluMul and Rotary module of `model` in place; return the replaced names."""
    replaced = []
    for name, module in list(model.named_modules()):
        fused = _fused_copy(module)
        if fused is None or not name:
            continue
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, fused)
        replaced.append(name)
    return replaced
