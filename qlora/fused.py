"""Swap the decoder's elementwise modules for ones that call `qlora.ops` (fused Triton kernels on CUDA).

The model (`qlora.model.llama`) knows nothing about kernels: it computes RMSNorm, SwiGLU and RoPE
in plain PyTorch, each in a module of its own (`RMSNorm`, `SiluMul`, `Rotary`). This pass, like
the LoRA module swap, replaces those modules by type with subclasses whose forward goes through
the dispatch point: on CUDA with Triton the fused kernels run, elsewhere `ops`' twins, which are
bit-identical to the model's own formulas (tests/test_ops.py), so swapping is always safe. The MLP
is swapped too, to store SwiGLU's output where a LoRA `down_proj` wants it (`FusedMLP`). Norm
weights stay the same `Parameter` objects, so state dicts, adapters and optimizers see no change.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from qlora import ops
from qlora.model.llama import MLP, RMSNorm, Rotary, SiluMul


class FusedRMSNorm(RMSNorm):
    """RMSNorm through `ops`; where the swap found who reads its output (the q/k/v or gate/up projections
    of its decoder layer), stored in the rows those readers want (`readers_row_width`)."""

    row_width_for: Callable[[torch.device, torch.dtype], int | None] | None = None

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        ask = self.row_width_for
        row_width = ask(x.device, out_dtype or x.dtype) if ask is not None else None
        return ops.rms_norm(x, self.weight, self.eps, out_dtype, row_width)


class FusedSiluMul(SiluMul):
    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return ops.swiglu(gate, up)


def readers_row_width(owner: nn.Module, names: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> int | None:
    """The row width the first of `owner`'s submodules `names` that has a preference wants its input stored
    in (`LoRALinear.input_row_width`: its adapter columns go beside the input), or None. Looked up at
    each call, so it follows a later swap of those modules."""
    for name in names:
        ask = getattr(getattr(owner, name, None), "input_row_width", None)
        width = ask(device, dtype) if ask is not None else None
        if width is not None:
            return width
    return None


class FusedMLP(MLP):
    """The MLP with SwiGLU stored where `down_proj` wants its input: a LoRA layer asks for rows wide
    enough for its adapter columns (`input_row_width`), so its `[x | h]` needs no copy of x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        row_width = readers_row_width(self, ("down_proj",), gate.device, gate.dtype)
        return self.down_proj(ops.swiglu(gate, up, row_width))


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
    if type(module) is MLP:
        fused = FusedMLP.__new__(FusedMLP)
        fused.__dict__ = module.__dict__.copy()  # the same projections (and their swapped act, in its dict)
        return fused
    if type(module) is Rotary:
        return FusedRotary()
    return None


# (norm, the sublayer that reads it, the projections in it that read the norm's output), per decoder layer
_NORM_READERS = (("input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj")),
                 ("post_attention_layernorm", "mlp", ("gate_proj", "up_proj")))  # fmt: skip


def use_fused_elementwise(model: nn.Module) -> list[str]:
    """Replace every RMSNorm, SiluMul, Rotary and MLP module of `model` in place; return the replaced names.
    A decoder layer's norms learn which projections read them (`FusedRMSNorm.row_width_for`)."""
    replaced = []
    for name, module in list(model.named_modules()):
        fused = _fused_copy(module)
        if fused is None or not name:
            continue
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, fused)
        replaced.append(name)
    for module in model.modules():
        for norm_name, reader_name, names in _NORM_READERS:
            norm, reader = getattr(module, norm_name, None), getattr(module, reader_name, None)
            if isinstance(norm, FusedRMSNorm) and isinstance(reader, nn.Module):
                # a partial, not the module itself: an nn.Module attribute would register a second parent
                norm.row_width_for = functools.partial(readers_row_width, reader, names)
    return replaced
