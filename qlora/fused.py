"""Swap the decoder's elementwise modules, and each decoder layer, for ones that call `qlora.ops`.

The model (`qlora.model.llama`) knows nothing about kernels: it computes RMSNorm, SwiGLU and RoPE
in plain PyTorch, each in a module of its own (`RMSNorm`, `SiluMul`, `Rotary`). This pass, like
the LoRA module swap, replaces those modules by type with subclasses whose forward goes through
the dispatch point with the model's `KernelPolicy`: the fused kernels on CUDA, elsewhere the twins,
which are bit-identical to the model's own formulas (tests/ops/test_dispatch.py), so swapping is always safe.
Norm weights stay the same `Parameter` objects: state dicts, adapters and optimizers see no change.

Each `DecoderLayer` becomes a `FusedDecoderLayer`, the block that owns the wide rows: where its LoRA
projections want their input stored with room for the adapter's columns beside it
(`LoRALinear.input_row_width`: `[x | h]` is then multiplied in one GEMM without copying x), the block
asks them, has the norm or SwiGLU store the input in rows that wide, and hands the width to the
projections it calls. Nothing is read back from a tensor: the width is the block's own decision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qlora import ops
from qlora.lora import LoRALinear
from qlora.model.llama import DecoderLayer, KVCache, RMSNorm, Rotary, SiluMul
from qlora.ops import KernelPolicy


class FusedRMSNorm(RMSNorm):
    """RMSNorm through `ops` (the final norm, q/k norms; a decoder layer's own norms run in its block)."""

    policy: KernelPolicy

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, out_dtype, policy=self.policy)


class FusedSiluMul(SiluMul):
    policy: KernelPolicy

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return ops.swiglu(gate, up, policy=self.policy)


class FusedRotary(Rotary):
    policy: KernelPolicy

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return ops.apply_rotary(x, cos, sin, policy=self.policy)


def readers_row_width(readers: Sequence[nn.Module], device: torch.device, dtype: torch.dtype) -> int | None:
    """The row width the first of `readers` that has a preference wants its input stored in, or None.
    Readers of another rank (PEFT's rank_pattern) find rows of another width and copy x instead."""
    for reader in readers:
        width = reader.input_row_width(device, dtype) if isinstance(reader, LoRALinear) else None
        if width is not None:
            return width
    return None


def _project(proj: nn.Module, x: torch.Tensor, row_width: int | None) -> torch.Tensor:
    return proj(x, row_width) if row_width is not None and isinstance(proj, LoRALinear) else proj(x)


class FusedDecoderLayer(DecoderLayer):
    """A decoder layer that owns the wide rows of its projections' inputs (see the module docstring).
    Computes what `DecoderLayer.forward` computes, through `ops`."""

    policy: KernelPolicy

    def _norm(self, norm: RMSNorm, h: torch.Tensor, out_dtype: torch.dtype | None,
              readers: Sequence[nn.Module]) -> tuple[torch.Tensor, int | None]:  # fmt: skip
        width = readers_row_width(readers, h.device, out_dtype or h.dtype)
        return ops.rms_norm(h, norm.weight, norm.eps, out_dtype, width, policy=self.policy), width

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        attn, mlp = self.self_attn, self.mlp
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        x, width = self._norm(self.input_layernorm, h, compute_dtype, qkv)  # [B, T, H], maybe in wider rows
        q, k, v = (_project(p, x, width) for p in qkv)
        h = h + attn.attend(q, k, v, cos, sin, mask, is_causal, kv_cache)
        x, width = self._norm(self.post_attention_layernorm, h, compute_dtype, (mlp.gate_proj, mlp.up_proj))
        gate, up = _project(mlp.gate_proj, x, width), _project(mlp.up_proj, x, width)  # [B, T, I]
        width = readers_row_width((mlp.down_proj,), gate.device, gate.dtype)
        return h + _project(mlp.down_proj, ops.swiglu(gate, up, width, policy=self.policy), width)


_FUSED = {RMSNorm: FusedRMSNorm, SiluMul: FusedSiluMul, Rotary: FusedRotary, DecoderLayer: FusedDecoderLayer}


def use_fused_elementwise(model: nn.Module, policy: KernelPolicy) -> list[str]:
    """Replace every RMSNorm, SiluMul, Rotary and DecoderLayer module of `model` (exact types) in place by its
    fused subclass running with `policy`; return the replaced names. The replacements keep the originals'
    attributes (the same Parameters, submodules and hooks)."""
    replaced = []
    for name, module in list(model.named_modules()):
        cls = _FUSED.get(type(module))
        if cls is None or not name:
            continue
        fused = cls.__new__(cls)
        fused.__dict__ = module.__dict__.copy()
        fused.policy = policy
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, fused)
        replaced.append(name)
    return replaced
