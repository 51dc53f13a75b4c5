"""`KernelPolicy`: which implementation every op of one model runs, as one object that is passed down.

One policy belongs to one model: `qlora.load` / `qlora.prepare_for_training` make it, the swaps hand
it to every LoRA layer and fused module (`apply_policy`), and each layer passes it to the ops it
calls (`qlora.ops`); an autograd function keeps its forward's policy for its backward. Nothing about
kernels is decided by process state, so two models in one process can run differently, and a test
forces a path by building a policy, not by flipping a switch.

What it decides:

- `kernels`: "auto" (Triton on CUDA where Triton imports, the plain-PyTorch twins elsewhere),
  "torch" (the twins everywhere) or "triton" (the kernels, and an error where they cannot run; on
  CPU tensors under TRITON_INTERPRET=1 the interpreter runs them). `from_env` reads QLORA_KERNELS
  once, when the policy is made.
- `product_in_float32`: whether the LoRA output `x W^T + term` can be rounded once on CUDA via
  `torch.mm(..., out_dtype=torch.float32)` (`qlora.lora.matmul`). Decided when the policy is made,
  from whether this torch has that overload; without it (torch < 2.8) the product is rounded twice,
  and the policy says so once, in the log, with the reason. Nothing at run time flips it.
- graph steps (`graph_step()`): entered by `qlora.train.cuda_graph.CudaGraphStep` around its warm-up
  runs and its capture. Kernels whose launch pays only when launched once per replay
  (`graph_step_kernels`) run inside; their twins (bit-identical) run in eager steps, which are
  bound by the host's launches.
- dense-weight reuse (`reusing_dense_weights()`): entered around both passes of each gradient
  checkpoint (the model's `checkpoint_context`); inside, LoRA layers keep the dense weight of their
  recompute for their backward (`qlora.lora.layer`).

The two context states are counters on this object, not thread-local: CUDA runs backward (and so a
checkpoint's recompute) on autograd's device thread, which must see what the step's thread entered.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from qlora.kernels import interpreting, triton_importable

log = logging.getLogger("qlora.ops")

ENV_VAR = "QLORA_KERNELS"
CHOICES = ("auto", "torch", "triton")
_ALIASES = {"reference": "torch"}  # the quant floor calls the twin "the reference"


def has_float32_product_mm() -> bool:
    """Whether this torch has `torch.mm(a, b, out_dtype=...)` (the `aten::mm.dtype` overload, torch >= 2.8)."""
    return hasattr(torch.ops.aten.mm, "dtype")


@dataclass(eq=False)
class KernelPolicy:
    """Which implementation each op runs for one model (see the module docstring)."""

    kernels: str = "auto"
    # looked up when the policy is made (a lambda, so a test can monkeypatch this module's function)
    product_in_float32: bool = field(default_factory=lambda: has_float32_product_mm())
    _graph_step_depth: int = field(default=0, repr=False)
    _reuse_depth: int = field(default=0, repr=False)

    def __post_init__(self):
        choice = _ALIASES.get(self.kernels, self.kernels)
        if choice not in CHOICES:
            raise ValueError(f"kernels must be one of {CHOICES} (or 'reference'), got {self.kernels!r}")
        self.kernels = choice
        if not self.product_in_float32:
            log.warning("this torch has no torch.mm(out_dtype=): LoRA outputs are rounded twice on CUDA (small "
                        "adapter updates are lost to rounding early in training); torch >= 2.8 avoids it")  # fmt: skip

    @classmethod
    def from_env(cls, **kwargs) -> KernelPolicy:
        """A policy whose `kernels` is $QLORA_KERNELS (default "auto"), read now."""
        raw = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if _ALIASES.get(raw, raw) not in CHOICES:
            raise ValueError(f"environment variable {ENV_VAR}={raw!r}: expected one of {CHOICES}")
        return cls(kernels=raw, **kwargs)

    # --- kernels or twins -------------------------------------------------------------------------
    def implementation_for(self, device: torch.device | str) -> str:
        """What an op on a tensor on `device` runs: "triton" or "torch"."""
        device_type = torch.device(device).type
        if self.kernels == "torch":
            return "torch"
        runnable = triton_importable() and (device_type == "cuda" or (device_type == "cpu" and interpreting()))
        if self.kernels == "triton":
            if not runnable:
                why = f"tensors are on {device_type} (Triton needs CUDA, or TRITON_INTERPRET=1 for CPU tensors)"
                if not triton_importable():
                    why = "triton is not installed"
                raise RuntimeError(f"the kernel policy asks for the Triton kernels ({ENV_VAR}=triton or "
                                   f"KernelPolicy(kernels='triton')), but {why}")  # fmt: skip
            return "triton"
        return "triton" if runnable and device_type == "cuda" else "torch"

    def uses_kernels(self, device: torch.device | str) -> bool:
        return self.implementation_for(device) == "triton"

    # --- rounding of a LoRA layer's output -------------------------------------------------------
    def product_rounding(self, device: torch.device | str, dtype: torch.dtype) -> str:
        """How `x W^T + term` is rounded once to `dtype` on `device` (`qlora.lora.matmul`):

        - "addmm": `term.addmm_(x, W^T)` accumulates onto the term and rounds once (the CPU; float32 anywhere);
        - "float32_product": CUDA's 16-bit addmm rounds the product before adding (measured on H200, torch
          2.11), so the product is taken in float32 (`mm(out_dtype=)`) and the term added in one pass, or
          the adapter's columns join the GEMM (`adapter_columns_matmul`), whichever moves fewer bytes;
        - "twice": as "float32_product" where this torch has no `mm(out_dtype=)`: the columns GEMM where it
          pays, else the product rounded before the term is added (logged when the policy was made)."""
        if torch.device(device).type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            return "addmm"
        return "float32_product" if self.product_in_float32 else "twice"

    # --- graph steps ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def graph_step(self) -> Iterator[None]:
        """Inside, ops take the paths a captured CUDA graph takes (warm-ups before a capture and the capture)."""
        self._graph_step_depth += 1
        try:
            yield
        finally:
            self._graph_step_depth -= 1

    def in_graph_step(self) -> bool:
        return self._graph_step_depth > 0

    def graph_step_kernels(self, device: torch.device | str) -> bool:
        """Whether kernels that pay only when their launch is paid once per replay run now: where the
        kernels run, in graph steps, or always when "triton" is forced. An eager CUDA step is bound by
        the host, where each Triton launch costs host time (docs/LOG.md, fourth session)."""
        if not self.uses_kernels(device):
            return False
        return self.kernels == "triton" or self.in_graph_step()

    # --- dense-weight reuse inside a checkpoint ---------------------------------------------------
    @contextlib.contextmanager
    def reusing_dense_weights(self) -> Iterator[None]:
        """Entered around both passes of a gradient checkpoint: LoRA layers save their dense weight for
        backward (the first pass discards it, the recompute's backward follows at once)."""
        self._reuse_depth += 1
        try:
            yield
        finally:
            self._reuse_depth -= 1

    def reuse_dense_weights(self) -> bool:
        return self._reuse_depth > 0


def apply_policy(model: torch.nn.Module, policy: KernelPolicy) -> KernelPolicy:
    """Hand `policy` to every module of `model` that runs ops (those with a `policy` attribute: the LoRA
    layers and the fused modules), and to the model itself (`model.policy`); returns it."""
    for module in model.modules():
        if isinstance(getattr(module, "policy", None), KernelPolicy):
            module.policy = policy
    model.policy = policy
    return policy


def policy_of(model: torch.nn.Module) -> KernelPolicy:
    """`model.policy` (set by `qlora.load_model` and `apply_policy`), or a fresh default policy for a model
    built another way (`KernelPolicy.from_env()`; nothing is stored)."""
    policy = getattr(model, "policy", None)
    return policy if isinstance(policy, KernelPolicy) else KernelPolicy.from_env()
