"""A micro-batch's forward and backward captured in a CUDA graph and replayed: one launch per step.

Why. A QLoRA step of a 7B model issues ~10,000 small GPU operations (per layer: seven 4-bit
dequantizations three times over, LoRA's small matmuls and casts, norms, RoPE, checkpoint
recomputation). Eagerly, the host needs ~0.6 s to issue them while the GPU's own work is ~0.25 s
(docs/LOG.md, 2026-11-22): the step is bound by Python and launch latency, not by the GPU. A
CUDA graph records the whole sequence once and replays it with one call, so the host cost drops to
a few copies and one launch.

What is captured, per input shape: `loss_sum_all_rows` (every position through lm_head; nothing
read back to the host), the loss scaled by a static factor (1 / tokens of the whole accumulated
step: token-weighted accumulation, as the eager loop does), and its backward, which *adds* into
each trainable parameter's `.grad`. The optimizer step, gradient clipping and zeroing stay eager:
they touch 448 tensors, not 10,000 ops, and the paged optimizer moves pages on its own streams.
With a `StepInBackward` (`stepper=`), the optimizer's update is captured too, layer by layer inside
backward, and no gradient outlives a replay.

Rules the capture imposes, and how this module keeps them:

- static addresses: inputs are copied into tensors the graph owns; every `.grad` is allocated
  before capture and must stay the same tensor. `zero_grad()` zeroes them in place. A parameter
  whose `.grad` was set to None (torch's `zero_grad(set_to_none=True)`) gets its buffer back,
  zeroed; one whose `.grad` was replaced by another tensor is an error (the graph would write
  into memory it no longer owns).
- static shapes: one graph per (batch, length) shape, all sharing one memory pool (only one runs
  at a time, and none's intermediates outlive its replay). `pad_batch` pads a batch's length up to
  a bucket so that a dataset of varied lengths needs few graphs.
- memory: the graphs' pool is private, so what runs outside them (held-out evaluation, eager
  batches) allocates beside it instead of reusing it. A run that fits eagerly with little room to
  spare may not fit with graphs: `--no-train.cuda_graphs`.
- no host reads inside: labels are checked on the host before they are copied in; a 2-D
  attention mask is accepted only when it is right padding (then it changes nothing for the
  real tokens under the causal mask) and is dropped.
- randomness: LoRA dropout draws from the CUDA generator; a replay advances the generator's offset
  like the eager step would, so each replay gets fresh masks. The masks are hashed from seeds
  drawn there (`qlora.lora.dropout`, as in eager steps), so a replay after
  `torch.cuda.manual_seed(s)` draws the same masks as an eager step after the same seed (tested).
  The warm-up runs before a capture draw too; the generator is rewound after them, so capturing
  a new shape changes no later draw (a resumed run that captures again draws what an uninterrupted
  one draws, for batches of the same shapes).
  Activation checkpointing rewinds the generator inside the graph for its recompute, which needs a
  generator that allows get/set state during capture: torch 2.11 does (tested on the GPU); older
  releases raised during capture (pytorch issue 162504). A failed capture raises.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch

from qlora.ops import KernelPolicy, policy_of
from qlora.train.loss import IGNORE_INDEX, loss_sum_all_rows

GRAPH_KEYS = {"input_ids", "labels", "attention_mask"}  # what a graphed batch may hold (packed ones add more)
log = logging.getLogger("qlora.train")
WARMUP_RUNS = 2  # eager runs on a side stream before capture: Triton compiles, cuBLAS picks workspaces


def pad_batch(batch: dict[str, torch.Tensor], multiple: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` / `labels` / a 2-D `attention_mask` to a length that is a multiple of `multiple`."""
    length = batch["input_ids"].shape[1]
    target = -(-length // multiple) * multiple
    if target == length:
        return batch
    extra = target - length
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    padded = dict(batch)
    for key, value in fill.items():
        if key in batch:
            if batch[key].dim() != 2:
                raise ValueError(f"pad_batch pads [batch, length] tensors; {key} has shape {tuple(batch[key].shape)}")
            padded[key] = torch.nn.functional.pad(batch[key], (0, extra), value=value)
    return padded


def is_right_padded(mask: torch.Tensor) -> bool:
    """True when every row of a [B, T] 0/1 mask is ones followed by zeros."""
    m = mask.to(torch.int64)
    return bool((m[:, 1:] <= m[:, :-1]).all())


class _Graph:
    """One captured shape: its static inputs, its loss output and the CUDA graph."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor):
        self.input_ids, self.labels, self.scale = input_ids, labels, scale
        self.loss: torch.Tensor | None = None
        self.graph = torch.cuda.CUDAGraph()


class CudaGraphStep:
    """`forward_backward(batch, scale)`: the loss sum of a micro-batch, its gradient (times `scale`) added to
    each parameter's `.grad`, by replaying a CUDA graph captured the first time that batch shape is seen.

    Args:
        model: a `LlamaForCausalLM` on a CUDA device, in training mode.
        params: the trainable parameters (their `.grad` buffers become static).
        max_graphs: captured shapes kept at once (least recently used dropped first). Graphs share one
            memory pool, so more graphs cost little memory; a dropped shape that comes back is captured
            again (two warm-up runs and a capture: about three steps' time).
        stepper: a `qlora.optim.in_backward.StepInBackward` over `params`: the optimizer's update is then
            part of the graph (run from backward hooks), gradients are transient (no static `.grad`
            buffers: each lives in the graph's pool until its layer is updated), `scale` must be the
            whole step's, and each replay is one optimizer step. Warm-up runs are dry (update nothing).
        policy: the model's `KernelPolicy` (default `model.policy`): warm-ups and capture run inside its
            `graph_step()`, so the graph-step kernels compile before the capture and are captured.
    """

    def __init__(self, model, params: Sequence[torch.nn.Parameter], max_graphs: int = 64, stepper=None,
                 policy: KernelPolicy | None = None):  # fmt: skip
        if not params:
            raise ValueError("CudaGraphStep needs at least one trainable parameter")
        device = params[0].device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; parameters are on {device}")
        self.model, self.params, self.device = model, list(params), device
        self.policy = policy if policy is not None else policy_of(model)
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple[int, int], _Graph] = OrderedDict()
        self.captures = 0
        self._pool = torch.cuda.graph_pool_handle()
        self.stepper = stepper
        self._grads: list[torch.Tensor] = []
        if stepper is not None:
            if {id(p) for p in stepper.params} != {id(p) for p in self.params}:
                raise ValueError("CudaGraphStep: the stepper must update exactly the trainable parameters")
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self._grads.append(p.grad)

    # -- gradients ---------------------------------------------------------------------------------
    def _check_grads(self) -> None:
        if self.stepper is not None:
            return  # no gradient outlives a replay
        for i, (p, g) in enumerate(zip(self.params, self._grads, strict=True)):
            if p.grad is None:  # set_to_none=True: None means zero
                g.zero_()
                p.grad = g
            elif p.grad is not g:
                raise RuntimeError(
                    f"the .grad of trainable parameter {i} (shape {tuple(p.shape)}) was replaced by another tensor; "
                    "a captured CUDA graph writes into the buffer it was captured with. Zero gradients with "
                    "CudaGraphStep.zero_grad() or optimizer.zero_grad(), never by assigning new tensors"
                )

    @torch.no_grad()
    def zero_grad(self) -> None:
        if self.stepper is not None:
            return  # the updates already dropped every gradient
        self._check_grads()
        torch._foreach_zero_(self._grads)

    # -- capture and replay ------------------------------------------------------------------------
    def _inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, labels = batch["input_ids"], batch["labels"]
        if input_ids.dim() != 2 or labels.shape != input_ids.shape:
            raise ValueError(f"input_ids and labels must be [batch, length] of one shape, got "
                             f"{tuple(input_ids.shape)} and {tuple(labels.shape)}")  # fmt: skip
        extra = sorted(set(batch) - GRAPH_KEYS)
        if extra:
            raise ValueError(f"CUDA-graph steps take input_ids, labels and a right-padding attention_mask; "
                             f"this batch also has {extra} (packed batches train eagerly)")  # fmt: skip
        mask = batch.get("attention_mask")
        if mask is not None and (mask.shape != input_ids.shape or not is_right_padded(mask)):
            raise ValueError("CUDA-graph steps need right padding (attention_mask rows of ones then zeros)")
        vocab = self.model.lm_head.weight.shape[0]
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise IndexError(f"label {int(labels[bad][0])} is outside the vocabulary [0, {vocab})")
        return input_ids, labels

    def _run(self, g: _Graph, warmup: bool = False) -> torch.Tensor:
        total = loss_sum_all_rows(self.model, g.input_ids, g.labels)
        if self.stepper is not None:  # every gradient is used and dropped by its layer's update (dry when warming up)
            self.stepper.backward(total * g.scale)
            return total.detach()
        # A warm-up run computes every gradient (the same kernels) but accumulates only the first parameter's,
        # so the gradients gathered so far need no copy (a full copy is 3 GiB for a 65B model's adapters).
        (total * g.scale).backward(inputs=self.params[:1] if warmup else None)
        return total.detach()

    def _capture(self, input_ids: torch.Tensor, labels: torch.Tensor) -> _Graph:
        dev = self.device
        g = _Graph(input_ids.to(dev, copy=True), labels.to(dev, copy=True),
                   torch.zeros((), dtype=torch.float32, device=dev))  # fmt: skip
        stepper = self.stepper
        first_grad = self._grads[0].clone() if stepper is None else None  # what warm-ups add to; restored below
        rng = torch.cuda.get_rng_state(dev)  # warm-up dropout draws are given back: capturing draws nothing
        try:
            side = torch.cuda.Stream(dev)
            if stepper is not None:
                stepper.prepare(dry=True)  # the updates run (kernels compile) but store nothing
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side), self.policy.graph_step():  # the graph's kernels, compiled before capture
                for _ in range(WARMUP_RUNS):
                    self._run(g, warmup=True)
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.set_rng_state(rng, dev)
            # recorded, not run: no gradient changes here
            with self.policy.graph_step(), torch.cuda.graph(g.graph, pool=self._pool):
                g.loss = self._run(g)
        finally:
            if stepper is not None:  # a capture that failed inside backward leaves graph-pool gradients behind
                for p in self.params:
                    p.grad = None
            if first_grad is not None:
                for p, grad in zip(self.params, self._grads, strict=True):
                    p.grad = grad  # capture must not have swapped any .grad; put ours back if it did
                self._grads[0].copy_(first_grad)
        self.captures += 1
        return g

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Replay (capturing first if this shape is new); returns the micro-batch's loss sum (a fresh 0-d tensor)."""
        input_ids, labels = self._inputs(batch)
        shape = (int(input_ids.shape[0]), int(input_ids.shape[1]))
        self._check_grads()
        g = self.graphs.get(shape)
        if g is None:
            if len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)
            g = self.graphs[shape] = self._capture(input_ids, labels)
            log.info("captured a CUDA graph for batch shape %s (%d held, %d captures)", shape, len(self.graphs),
                     self.captures)  # fmt: skip
        self.graphs.move_to_end(shape)
        g.input_ids.copy_(input_ids, non_blocking=True)
        g.labels.copy_(labels, non_blocking=True)
        g.scale.fill_(scale)
        if self.stepper is not None:
            self.stepper.prepare()  # this replay is one optimizer step: its coefficient rows
        g.graph.replay()
        return g.loss.clone()
