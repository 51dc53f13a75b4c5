"""LoRA through a frozen (optionally 4-bit) base: the layer, its autograd function, and the swap.

Glossary: `r` the adapter rank; `alpha`; `scale = alpha / r` (rsLoRA: `alpha / sqrt(r)`);
`lora_A` [r, in] and `lora_B` [out, r] (PEFT's names, so adapters save without a key map).

    y = x W^T + b + scale * (drop(x) A^T) B^T

W is frozen: a `QuantizedTensor` (QLoRA) or a dense tensor (plain 16-bit LoRA), b a frozen bias.

`LoRALinearFunction` is why this file exists. Autograd through `F.linear(x, dequantize(W))` would
save the dense W for the backward pass: 2 bytes per parameter in bf16, four times the 4-bit
weight, for every layer at once. The function saves only the small things and dequantizes W again
in backward. With g = dL/dy [N, out], xd = drop(x) [N, in], h = xd A^T [N, r]:

    dL/dx  = g W + keep / (1 - p) * scale * (g B) A     (base, W dequantized again; adapter, through
                                                         the dropout's mask `keep`, in one kernel)
    dL/dB  = scale * g^T h             [out, r]
    dL/dA  = scale * (g B)^T xd        [r, in]
    W and b are frozen: no gradient.

Saved for backward: x and the dropout mask's seed, h, A, B and a reference to the packed weight (never
a dequantized copy; a test hooks saved tensors to prove it), except inside
`KernelPolicy.reusing_dense_weights()`
(around a gradient checkpoint's two passes: the first discards what is saved, the recompute's backward
follows at once), where the forward's dense W is saved so that it is not dequantized a third time.

Matmuls run in the compute dtype (bf16 by default); the adapter parameters are kept in
`LoraSpec.param_dtype` (float32 by default, as PEFT keeps them; bfloat16 is what the QLoRA paper's
own script does, and halves the adapters' and their gradients' memory) and cast for the matmuls,
and their gradients come back in that dtype.

Rounding: in bf16, `x W^T + scale * h B^T` is rounded once (`qlora.lora.matmul`); rounding x W^T
first would drop every adapter term under half a bf16 step of it, i.e. most of what a young adapter
has learned.

Initialisation is PEFT's default: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0,
so a fresh adapter leaves the model's output unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qlora import ops
from qlora.config import DEFAULT_TARGETS
from qlora.kernels.spare_columns import rows_of
from qlora.lora.dropout import HashedDropout
from qlora.lora.matmul import (
    base_plus_adapter,
    columns_width,
    dense_weight,
    dense_with_columns,
)
from qlora.ops import KernelPolicy
from qlora.quant.tensor import QuantizedTensor

BYTES_AS_FLOAT = torch.float8_e4m3fn  # how `register_base_storage` holds uint8 codes as parameters (a bit view)


@dataclass(frozen=True)
class QuantSpec:
    """How the frozen base weights are stored: a 4-bit type, or None for 16-bit (plain LoRA)."""

    quant_type: str | None = "nf4"
    blocksize: int = 64
    double_quant: bool = True


@dataclass(frozen=True)
class LoraSpec:
    """The adapter hyperparameters (the QLoRA paper's defaults)."""

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    use_rslora: bool = False
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)
    param_dtype: torch.dtype = torch.float32  # the adapter weights' (and gradients') storage
    # PEFT's per-module overrides of r and alpha: (pattern, value) pairs in order, the first pattern that
    # matches a module's full name wins (`for_layer`); a dict given here is stored as such pairs (hashable)
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            pairs = tuple(value.items()) if isinstance(value, dict) else tuple(tuple(p) for p in value)
            object.__setattr__(self, name, pairs)

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @staticmethod
    def pattern_value(pairs: tuple[tuple[str, object], ...], module_name: str):
        """The value of the first pattern matching `module_name`, or None: PEFT's rule (`get_pattern_key`
        in peft/utils/other.py), the pattern is a regular expression that must match the whole name or a
        suffix of it that starts after a dot, i.e. `(.*\\.)?(pattern)` matches all of `module_name`. So
        "q_proj" matches every q_proj, "layers.0.self_attn.q_proj" one layer, "^model.layers.0.mlp.up_proj"
        anchors at the start, and "proj" matches nothing (not a whole dotted part)."""
        import re  # here, not at the top: only this class and replace_linears are edited in this file

        for pattern, value in pairs:
            if re.fullmatch(rf"(.*\.)?({pattern})", module_name):
                return value
        return None

    def for_layer(self, module_name: str) -> LoraSpec:
        """This spec for the module named `module_name` (full name, e.g. "model.layers.0.self_attn.q_proj"):
        r and alpha from the first matching `rank_pattern` / `alpha_pattern` entry, else the defaults."""
        from dataclasses import replace  # here for the same reason as `re` above

        r = self.pattern_value(self.rank_pattern, module_name)
        alpha = self.pattern_value(self.alpha_pattern, module_name)
        return replace(self, r=self.r if r is None else r, alpha=self.alpha if alpha is None else alpha,
                       rank_pattern=(), alpha_pattern=())  # fmt: skip


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + scale * (xd A^T) B^T with W frozen and re-materialised in backward (see module doc).

    The adapter's dropout is the hashed mask (`qlora.lora.dropout`) in every mode: eager or graphed, padded
    or packed, forward or recompute, on every device. Its seed is drawn here; the ops that read x apply the
    mask on the fly (xd A^T, A's gradient, the masked input gradient: one pass each through the kernels,
    the same hash with torch integer ops in the twins), so neither the dropped x nor a mask is written, and
    backward keeps x itself (one tensor for q, k and v) and the seed.

    Args after the tensors: `scale`; `wide`, a dense base's [out, in + r + pad] storage with room for the
    adapter columns, or None; `dropout`, the adapter's dropout probability (0 outside training); `policy`,
    the model's `KernelPolicy`, also used by backward; `row_width`: x is the left columns of rows this wide
    (`input_row_width`), stored so by the block that calls the layer, or None.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, base, scale: float, wide=None, dropout: float = 0.0,
                policy: KernelPolicy | None = None, row_width: int | None = None):  # fmt: skip
        policy = policy if policy is not None else KernelPolicy.from_env()
        # x: [..., in]; lora_A: [r, in] or None; lora_B: [out, r] or None; base: [out, in]
        h = mask = None
        if lora_A is None:
            weight = dense_weight(base, x.dtype, policy=policy)
            y = F.linear(x, weight, None if bias is None else bias.to(x.dtype))  # [..., out]
        else:
            x2 = x.reshape(-1, x.shape[-1])  # [N, in]
            # the block that made x may have stored it inside wider rows, for the adapter columns (`qlora.fused`)
            x_rows = rows_of(x, row_width) if row_width else None  # [N, in + r + pad] or None
            a = lora_A.to(x.dtype)  # [r, in] in the compute dtype
            if dropout > 0.0:
                mask = HashedDropout.draw(dropout, x.device)
                h = ops.dropout_project(x2, a, mask, policy=policy)  # [N, r]
            else:
                h = F.linear(x2, a)  # [N, r]
            y2, weight = base_plus_adapter(x2, base, h, lora_B, wide, x_rows, scale, policy=policy)  # [N, out]
            if bias is not None:
                y2.add_(bias.to(x.dtype))
            y = y2.view(*x.shape[:-1], -1)
        # kept only inside a gradient checkpoint: its forward discards it, its recompute's backward follows
        reuse = policy.reuse_dense_weights()
        kept_weight = weight if reuse and ctx.needs_input_grad[0] else None
        del weight
        ctx.base, ctx.scale, ctx.dropout, ctx.policy = base, scale, dropout, policy
        ctx.has_adapter = lora_A is not None
        ctx.param_dtypes = (None, None) if lora_A is None else (lora_A.dtype, lora_B.dtype)
        adapter_input = None if lora_A is None else x2
        # the seed is saved like a tensor, so a checkpoint's backward uses its recompute's draw
        seed = None if mask is None else mask.seed
        # inside a checkpoint (as the dense weight), A as cast for the forward, so backward does not cast it again
        if lora_A is not None and reuse:
            lora_A = a
        ctx.save_for_backward(adapter_input, seed, h, lora_A, lora_B, kept_weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x2, seed, h, lora_A, lora_B, kept_weight = ctx.saved_tensors
        policy = ctx.policy
        dtype = grad_y.dtype
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            weight = dense_weight(ctx.base, dtype, policy=policy) if kept_weight is None else kept_weight.to(dtype)
            grad_x = grad_y @ weight  # [..., out] @ [out, in] -> [..., in]
            del weight
        if ctx.has_adapter:
            # the scale multiplies only small tensors ([N, r] and the [r|out, ...] results), never [N, out]
            scale = ctx.scale
            g2 = grad_y.reshape(-1, grad_y.shape[-1])  # [N, out]
            g_B = (g2 @ lora_B.to(dtype)).mul_(scale)  # [N, out] @ [out, r] -> [N, r], scaled
            mask = None if seed is None else HashedDropout(seed, ctx.dropout)
            a = lora_A.to(dtype)
            grad_x2 = None if grad_x is None else grad_x.view(-1, grad_x.shape[-1])
            if ctx.needs_input_grad[2]:
                grad_B = (g2.t() @ h).mul_(scale).to(ctx.param_dtypes[1])  # [out, N] @ [N, r]
            if mask is not None and ctx.needs_input_grad[1]:
                # A's gradient [r, N] @ drop(x), and the input gradient through the mask on the same tiles
                grad_A = ops.dropout_backward(g_B, x2, mask, ctx.param_dtypes[0], grad_x2, a, policy=policy)
            else:
                if grad_x2 is not None:  # the adapter's input gradient, added into the base's in place
                    ops.add_masked_lowrank_(grad_x2, g_B, a, mask, 1.0, policy=policy)
                if ctx.needs_input_grad[1]:
                    grad_A = (g_B.t() @ x2).to(ctx.param_dtypes[0])  # [r, N] @ [N, in]
        return grad_x, grad_A, grad_B, None, None, None, None, None, None, None


class LoRALinear(nn.Module):
    """A linear layer with a frozen base (4-bit or dense) and an optional trainable LoRA adapter.

    Built empty (the base weight arrives later through `set_base_weight`, as the loader streams
    the checkpoint), so a 70B model never exists densely in memory. `r = 0` means no adapter: a
    frozen, possibly quantized linear that still saves no dense weight for backward.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        quant: QuantSpec = QuantSpec(),
        lora: LoraSpec | None = LoraSpec(),
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        policy: KernelPolicy | None = None,
    ):
        super().__init__()
        # which kernels run, shared by all layers of a model (`replace_linears`, `qlora.ops.policy.apply_policy`)
        self.policy = policy if policy is not None else KernelPolicy.from_env()
        # set while a generation engine serves several adapters on this base (`qlora.generation.adapters`):
        # called for the no-gradient eval-mode forward instead of this layer's own adapter
        self.serving = None
        self.in_features, self.out_features = in_features, out_features
        self.quant = quant
        self.compute_dtype = dtype
        self.base: torch.Tensor | QuantizedTensor | None = None
        # after `register_base_storage`: the base's layout, its storage held as this module's parameters
        self._base_layout: QuantizedTensor | None = None
        # a dense base with an adapter lives in the left columns of this [out, in + r + pad] matrix, so the
        # forward's adapter columns need no copy of W (qlora.lora.matmul.dense_with_columns)
        self._base_columns: torch.Tensor | None = None
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) if bias \
            else None  # fmt: skip
        self.r = lora.r if lora is not None else 0
        self.scale = lora.scale if lora is not None else 0.0
        self.dropout = lora.dropout if lora is not None else 0.0  # the adapter input's (hashed) dropout probability
        if self.r:
            # nn.Linear holders give PEFT's key names: <layer>.lora_A.weight, <layer>.lora_B.weight
            self.lora_A = nn.Linear(in_features, self.r, bias=False, device=device, dtype=lora.param_dtype)
            self.lora_B = nn.Linear(self.r, out_features, bias=False, device=device, dtype=lora.param_dtype)
            if device is None or torch.device(device).type != "meta":
                self.reset_adapter()

    # --- the frozen base --------------------------------------------------------------------
    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Take the dense checkpoint weight [out, in]: quantize it in place of storage, or keep it dense."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} given to a linear layer of shape "
                             f"({self.out_features}, {self.in_features})")  # fmt: skip
        weight = weight.detach().to(self.compute_dtype)
        self._base_columns = None
        if self.quant.quant_type is None and self.r:
            self._base_columns = dense_with_columns(weight, self.r)
            self.base = self._base_columns[:, : self.in_features]
        elif self.quant.quant_type is None:
            self.base = weight
        else:
            self.base = QuantizedTensor.quantize(weight, self.quant.quant_type, self.quant.blocksize,
                                                 self.quant.double_quant)  # fmt: skip

    def set_base_quantized(self, q: QuantizedTensor) -> None:
        """Take an already-quantized base weight as it is (no dequantize/requantize round trip)."""
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight of shape {tuple(q.shape)} given to a linear layer of shape "
                             f"({self.out_features}, {self.in_features})")  # fmt: skip
        self.base, self._base_columns = q, None

    def dense_base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dense_weight(self.current_base(), dtype or self.compute_dtype, policy=self.policy)

    def register_base_storage(self) -> None:
        """Hold the 4-bit base's storage (`QuantizedTensor.storage()`: codes and block scales) as frozen
        parameters `base_<name>` of this module, so that FSDP2's `fully_shard` shards them with the rest of
        the layer and gathers them whole before each forward (`qlora.distributed.parallel`). The layout
        (tables, offset, shape) stays here; `current_base()` reassembles the weight from the parameters."""
        if not isinstance(self.base, QuantizedTensor):
            raise TypeError(f"register_base_storage needs a 4-bit base, this layer's is {type(self.base).__name__}")
        parts = self.base.storage()
        for name, t in parts.items():
            # bytes held as a 1-byte float dtype, the same bits (a view): FSDP2 makes every sharded parameter
            # with requires_grad first, which torch 2.11 refuses for integer tensors; it only copies the bytes
            held = t.view(BYTES_AS_FLOAT) if t.dtype == torch.uint8 else t
            self.register_parameter(f"base_{name}", nn.Parameter(held, requires_grad=False))
        self._base_layout = self.base.with_storage({name: t.new_empty(0) for name, t in parts.items()})
        self.base = None

    def current_base(self) -> torch.Tensor | QuantizedTensor:
        """The base weight as the forward uses it (reassembled from its parameters after `register_base_storage`)."""
        if self._base_layout is not None:
            layout = self._base_layout.storage()
            return self._base_layout.with_storage({name: getattr(self, f"base_{name}").view(empty.dtype)
                                                   for name, empty in layout.items()})  # fmt: skip
        if self.base is None:
            raise RuntimeError("this layer's base weight was never loaded")
        return self.base

    def _apply(self, fn, recurse=True):
        """`module.to(device)` moves the base too; dtype casts leave the 4-bit codes untouched."""
        if self._base_layout is not None and fn(torch.empty(0, dtype=BYTES_AS_FLOAT)).dtype != BYTES_AS_FLOAT:
            raise TypeError("a dtype cast would rewrite the 4-bit codes this layer holds as float8 parameters "
                            "(register_base_storage); cast other modules, or the compute dtype, instead")  # fmt: skip
        super()._apply(fn, recurse)
        if self._base_layout is not None:  # the storage moved as parameters; the tables follow them
            moved = fn(self._base_layout.table)
            if moved.device != self._base_layout.device:
                self._base_layout = self._base_layout.to(moved.device)
            return self
        if isinstance(self.base, QuantizedTensor):
            moved = fn(self.base.packed)
            if moved.device != self.base.device:
                self.base = self.base.to(moved.device)
        elif self._wide_base() is not None:
            self._base_columns = fn(self._base_columns)
            self.base = self._base_columns[:, : self.in_features]
        elif self.base is not None:
            self.base = fn(self.base)
        return self

    def _wide_base(self) -> torch.Tensor | None:
        """The wider storage of the dense base, if `base` still is its left columns (a caller may have
        replaced `base` since)."""
        wide = self._base_columns
        if wide is None or not isinstance(self.base, torch.Tensor) or self.base.data_ptr() != wide.data_ptr():
            return None
        return wide

    # --- the adapter ------------------------------------------------------------------------
    @torch.no_grad()
    def reset_adapter(self) -> None:
        """PEFT's default init: A kaiming-uniform (a = sqrt(5)), B zero."""
        if self.r:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def input_row_width(self, device: torch.device, dtype: torch.dtype) -> int | None:
        """How wide the rows of the matrix holding this layer's input should be, for an input on `device`
        in `dtype`: `in + r + pad` on CUDA in 16-bit, where the forward puts the adapter's h into the
        spare columns and multiplies `[x | h]` in one GEMM without copying x
        (`qlora.lora.matmul.adapter_columns_matmul`); None where it would not (no adapter, the CPU).
        The decoder block asks it (`qlora.fused.FusedDecoderLayer`) and has the input stored so; layers that
        share one input (q, k, v) take turns with the same spare columns."""
        if not self.r or self.policy.product_rounding(device, dtype) == "addmm":
            return None
        return columns_width(self.in_features, self.r)

    def forward(self, x: torch.Tensor, row_width: int | None = None) -> torch.Tensor:
        """y [..., out] for x [..., in]. `row_width`: given only by a block that stored x as the left columns
        of rows that wide (`input_row_width`; `qlora.fused.FusedDecoderLayer`): h is then written into
        their spare columns instead of copying x."""
        base = self.current_base()
        inference = not self.training and not torch.is_grad_enabled()
        if inference and self.serving is not None:
            return self.serving(x, base)
        if inference and isinstance(base, QuantizedTensor) and ops.reads_4bit_codes(x, policy=self.policy):
            return self._decode(x, base)
        if self.r:
            a, b = self.lora_A.weight, self.lora_B.weight
            p = self.dropout if self.training else 0.0
            return LoRALinearFunction.apply(x, a, b, self.bias, base, self.scale, self._wide_base(), p,
                                            self.policy, row_width)  # fmt: skip
        return LoRALinearFunction.apply(x, None, None, self.bias, base, 0.0, None, 0.0, self.policy)

    def _decode(self, x: torch.Tensor, base: QuantizedTensor) -> torch.Tensor:
        """A decoding step's few rows (no gradient): x W^T straight from the 4-bit codes (`ops.matmul_4bit`),
        plus the adapter unmerged, scale * (x A^T) B^T (its own rounding; the training path rounds once)."""
        y = ops.matmul_4bit(x, base, policy=self.policy)
        if self.r:
            h = F.linear(x, self.lora_A.weight.to(x.dtype))
            y = y + F.linear(h, self.lora_B.weight.to(x.dtype)) * self.scale
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        base = self.quant.quant_type or "dense"
        return f"in={self.in_features}, out={self.out_features}, base={base}, r={self.r}, scale={self.scale:g}"


def replace_linears(
    model: nn.Module,
    quant: QuantSpec,
    lora: LoraSpec | None,
    quantized_suffixes: Iterable[str] = DEFAULT_TARGETS,
    device: torch.device | str | None = "meta",
    dtype: torch.dtype = torch.bfloat16,
    policy: KernelPolicy | None = None,
) -> list[str]:
    """Swap every `nn.Linear` whose name ends in one of `quantized_suffixes` for a `LoRALinear`.

    The layers named by `lora.targets` get an adapter, of the rank and alpha `lora.for_layer(name)` gives
    (PEFT's rank_pattern / alpha_pattern); the others only a frozen (quantized) base. Embeddings and
    `lm_head` are never touched (they stay 16-bit, as in bitsandbytes). Returns the swapped module names.
    Raises if a LoRA target matches no layer (a typo would otherwise train nothing).
    """
    suffixes = set(quantized_suffixes) | set(lora.targets if lora else ())
    swapped, adapted_suffixes = [], set()
    policy = policy if policy is not None else KernelPolicy.from_env()  # one for all the swapped layers
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if not isinstance(module, nn.Linear) or leaf not in suffixes:
            continue
        wants_adapter = lora is not None and leaf in lora.targets
        new = LoRALinear(module.in_features, module.out_features, bias=module.bias is not None, quant=quant,
                         lora=lora.for_layer(name) if wants_adapter else None, device=device, dtype=dtype,
                         policy=policy)  # fmt: skip
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, leaf, new)
        swapped.append(name)
        if wants_adapter:
            adapted_suffixes.add(leaf)
    missing = set(lora.targets if lora else ()) - adapted_suffixes
    if missing:
        raise ValueError(f"LoRA target modules {sorted(missing)} match no linear layer of the model")
    return swapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The layers that carry an adapter, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear) and m.r}


def mark_only_lora_trainable(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but the adapters; return the trainable parameters."""
    trainable = []
    for name, p in model.named_parameters():
        is_adapter = ".lora_A." in name or ".lora_B." in name
        p.requires_grad_(is_adapter)
        if is_adapter:
            trainable.append(p)
    return trainable
