"""Data-parallel (DDP) and sharded (FSDP2) training of a LoRA model: the wrapping, and what a step needs from it.

    parallel = parallelize(step_loss, runtime, "fsdp")   # step_loss: an nn.Module whose forward is the loss
    with parallel.gradient_sync(last_micro_batch):       # reduce gradients on the last micro-batch only
        loss = parallel.module(**batch); backward
    parallel.after_backward()                            # local gradients where the optimizer looks
    optimizer.step() over parallel.params; parallel.zero_grad()

- "none": one process; `module` is `step_loss` itself.
- "ddp": `torch.nn.parallel.DistributedDataParallel` over the adapters (the only parameters that need
  gradients); every rank holds the whole model and optimizer. Gradients are averaged over ranks by DDP's
  bucketed all-reduce, overlapped with backward; `no_sync` skips it for accumulation micro-batches.
- "fsdp": FSDP2 `fully_shard` on each decoder layer and then the root, over a 1-D device mesh. The 4-bit
  base joins the sharding as parameters (`LoRALinear.register_base_storage`: packed codes and block
  scales, all split along dim 0 like every other parameter, all gathered whole before a layer computes,
  so a rank dequantizes exactly the bytes of the unsharded weight). Adapters, their gradients and the
  optimizer's states shard too: the optimizer steps `params`, plain tensors that are views of this
  rank's shards (`local_part`), so every optimizer of `qlora.optim` runs unchanged on 1/N of the elements.

Both reduce gradients as a mean over ranks; `gradient_multiplier` (the world size) is what a step multiplies
its loss by so that the reduced gradient is the sum over ranks, i.e. exactly the gradient of the whole
global batch divided by its target-token count (`qlora.train.step`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from qlora.distributed.runtime import Runtime
from qlora.distributed.tensors import local_part, shard_rows
from qlora.lora.layer import LoRALinear
from qlora.quant.tensor import QuantizedTensor

log = logging.getLogger("qlora.distributed")

MODES = ("none", "ddp", "fsdp")


@dataclass
class Parallel:
    """A model wrapped for one of `MODES` (see the module docstring)."""

    mode: str
    runtime: Runtime
    module: nn.Module  # call this for the loss (DDP / FSDP hooks run on its forward)
    params: list[torch.Tensor]  # what the optimizer steps: the trainable parameters, or their local shards
    sharded: list[torch.Tensor] = field(default_factory=list)  # FSDP: the DTensor parameters behind `params`
    gradient_multiplier: float = 1.0  # the loss times this, so that the mean over ranks is the global sum

    @property
    def shards_parameters(self) -> bool:
        return self.mode == "fsdp"

    def gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward: reduce its gradients over ranks (`sync`), or only
        accumulate them locally (accumulation micro-batches before the last)."""
        if self.mode == "ddp" and not sync:
            return self.module.no_sync()
        if self.mode == "fsdp":
            self.module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def after_backward(self) -> None:
        """FSDP: point each local view's `.grad` at this rank's shard of the reduced gradient (and the view
        itself at the shard's storage, should FSDP ever have reallocated it)."""
        for local, sharded in zip(self.params, self.sharded, strict=False):
            shard = local_part(sharded.data)
            if local.data_ptr() != shard.data_ptr() or local.shape != shard.shape:
                local.data = shard  # the optimizer keeps its object (and state); the update reaches the parameter
            local.grad = None if sharded.grad is None else local_part(sharded.grad)

    def zero_grad(self) -> None:
        for p in (*self.params, *self.sharded):
            p.grad = None

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients of the whole adapter (over every rank's shard under FSDP)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        device = self.params[0].device
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for g in grads:
            sq += g.float().pow(2).sum()
        if self.shards_parameters:
            self.runtime.all_reduce_tensor_(sq)
        return sq.sqrt()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so their global norm is at most `max_norm` (0: measure only); returns the norm
        before clipping (torch's `clip_grad_norm_` rule: factor min(1, max_norm / (norm + 1e-6)))."""
        if not self.shards_parameters:  # whole gradients on every rank: torch's own
            return torch.nn.utils.clip_grad_norm_(self.params, max_norm or float("inf"))
        norm = self.grad_norm()
        if max_norm > 0:
            factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(factor.to(p.grad.dtype))
        return norm


    # --- the optimizer's state whole (checkpoints are written in the single-process layout) ----------------
    def full_optimizer_state(self, state: dict, optimizer: torch.optim.Optimizer) -> dict:
        """`optimizer.state_dict()` with each state tensor shaped like a local shard gathered whole (FSDP; every
        rank must call this). Other modes: `state` itself."""
        if not self.shards_parameters:
            return state
        from torch.distributed.tensor import DTensor, Shard

        behind = self._sharded_by_index(optimizer)
        gathered = {}
        for index, saved in state["state"].items():
            local, sharded = behind[index]
            entry = {}
            for key, value in saved.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape == local.shape:
                    piece = DTensor.from_local(value.to(local.device), sharded.device_mesh, [Shard(0)], run_check=False,
                                               shape=sharded.shape, stride=sharded.stride())  # fmt: skip
                    value = piece.full_tensor().to(value.device)
                entry[key] = value
            gathered[index] = entry
        return {"state": gathered, "param_groups": state["param_groups"]}

    def local_optimizer_state(self, state: dict, optimizer: torch.optim.Optimizer) -> dict:
        """A whole (single-process layout) optimizer state cut to this rank's shards (FSDP); `state` otherwise."""
        if not self.shards_parameters:
            return state
        behind = self._sharded_by_index(optimizer)
        rank, world = self.runtime.rank, self.runtime.world_size
        cut = {}
        for index, saved in state["state"].items():
            _local, sharded = behind[int(index)]
            cut[index] = {key: shard_rows(v, rank, world).clone()
                          if torch.is_tensor(v) and v.dim() > 0 and v.shape == sharded.shape else v
                          for key, v in saved.items()}  # fmt: skip
        return {"state": cut, "param_groups": state["param_groups"]}

    def _sharded_by_index(self, optimizer: torch.optim.Optimizer) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The optimizer's state-dict index of each parameter -> (its local view, the DTensor behind it)."""
        behind = {id(local): (local, sharded) for local, sharded in zip(self.params, self.sharded, strict=True)}
        order = [p for group in optimizer.param_groups for p in group["params"]]
        return {i: behind[id(p)] for i, p in enumerate(order)}


def quantized_layers(module: nn.Module) -> Iterator[LoRALinear]:
    return (m for m in module.modules() if isinstance(m, LoRALinear) and isinstance(m.base, QuantizedTensor))


class LayerSharder:
    """FSDP2 on one decoder layer at a time, over a 1-D mesh of the job's ranks: its 4-bit base joins the
    parameters (`LoRALinear.register_base_storage`) and `fully_shard` splits them all. Give it to the loader
    (`load_model(on_layer_loaded=...)`) so each layer is sharded as soon as it is loaded: a GPU then holds 1/N
    of the layers loaded so far plus the one being loaded, never the whole model."""

    def __init__(self, runtime: Runtime) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))

    def __call__(self, index: int, layer: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        for linear in quantized_layers(layer):
            linear.register_base_storage()
        fully_shard(layer, mesh=self.mesh)


def parallelize(step_loss: nn.Module, layers: list[nn.Module], runtime: Runtime, mode: str,
                sharder: LayerSharder | None = None) -> Parallel:  # fmt: skip
    """Wrap `step_loss` (a module whose forward computes the loss of a batch and holds the model) for `mode`.

    `layers`: the model's decoder layers (FSDP shards each one as a unit, so one layer is gathered at a time;
    layers the `sharder` already sharded while loading are kept as they are).
    """
    if mode not in MODES:
        raise ValueError(f"parallel mode must be one of {MODES}, got {mode!r}")
    trainable = [p for p in step_loss.parameters() if p.requires_grad]
    if mode == "none":
        return Parallel("none", runtime, step_loss, trainable)
    if not runtime.distributed:
        raise RuntimeError(f"parallel mode {mode!r} needs a process group: start the job with torchrun")
    world = float(runtime.world_size)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        wrapped = DistributedDataParallel(step_loss, device_ids=device_ids)
        return Parallel("ddp", runtime, wrapped, trainable, gradient_multiplier=world)
    return _fully_shard(step_loss, layers, runtime, sharder or LayerSharder(runtime))


def _fully_shard(step_loss: nn.Module, layers: list[nn.Module], runtime: Runtime, sharder: LayerSharder) -> Parallel:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    dense = [name for name, m in step_loss.named_modules() if isinstance(m, LoRALinear) and m.base is not None
             and not isinstance(m.base, QuantizedTensor)]  # fmt: skip
    if dense:
        raise ValueError(f"parallel mode fsdp shards a 4-bit base; {dense[0]} (and {len(dense) - 1} more) keep a "
                         "16-bit base (quant.quant_type none): train it with --parallel ddp")  # fmt: skip
    for i, layer in enumerate(layers):
        if not isinstance(layer, FSDPModule):
            sharder(i, layer)
    fully_shard(step_loss, mesh=sharder.mesh)
    sharded = [p for p in step_loss.parameters() if p.requires_grad]
    local = []
    for p in sharded:
        view = local_part(p.data)
        shard = nn.Parameter(view, requires_grad=True)  # shares the shard's storage: the optimizer writes it
        if shard.data_ptr() != view.data_ptr():
            raise RuntimeError("a local shard view does not share its parameter's storage")
        local.append(shard)
    return Parallel("fsdp", runtime, step_loss, local, sharded, gradient_multiplier=float(runtime.world_size))
