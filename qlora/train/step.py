"""`TrainStep`: one optimizer step over a list of micro-batches, the same for the CLI and the Python API.

    for each micro-batch:  loss sum -> backward of (sum / target tokens of the whole step)
                           (a CUDA graph replays forward + backward where the batch allows it)
    then:                  clip by the global norm -> optimizer step -> schedule -> zero gradients

Dividing every micro-batch by the target-token count of the whole step makes accumulation exactly
one big batch (token-weighted). With `StepInBackward` the optimizer updates each layer inside
backward instead (one micro-batch, no clipping: the config refuses the rest).

Which path runs is decided here, from named conditions, never from a caught error:

- CUDA graphs: on when asked for and the device is CUDA, off for float16 compute (its loss scale
  changes between steps: logged once when the step is built). A batch a graph cannot take (a packed
  batch: per-document positions and a block-diagonal mask) runs eagerly for that micro-batch only,
  logged once with the reason. A capture that fails raises; an out-of-memory error raises.
- the kernels: the model's `KernelPolicy` (graph steps enter its `graph_step()`).

Timing is true: `seconds` ends after the step's GPU work has finished (the device is synchronised
before the clock is read), so tokens/s is what the hardware did, not how fast the host queued it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qlora.data.collate import count_tokens
from qlora.optim.in_backward import StepInBackward
from qlora.train.cuda_graph import GRAPH_KEYS, CudaGraphStep, pad_batch
from qlora.train.loss import loss_sum

log = logging.getLogger("qlora.train")


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step did."""

    loss: float  # mean loss per target token over the whole step
    lr: float  # the learning rate the update used
    grad_norm: float | None  # the global gradient norm before clipping (None with the update in backward)
    target_tokens: int  # tokens with a label (the loss's denominator)
    tokens: int  # non-padding tokens seen
    seconds: float  # wall time of the step, GPU work included

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device` (copies queued, not waited for)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def target_token_count(micro_batches: Sequence[dict[str, torch.Tensor]]) -> int:
    """Labelled next-token positions in the step (the loss's denominator)."""
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)


class TrainStep:
    """Runs optimizer steps (see the module docstring).

    Args:
        model: prepared for training (`qlora.prepare_for_training`).
        params: its trainable parameters.
        optimizer, scheduler: the optimizer and its learning-rate schedule.
        scaler: a `torch.amp.GradScaler` (enabled for float16 compute only).
        max_grad_norm: clip the global norm to this (0: no clipping; the norm is still measured).
        cuda_graphs: replay forward + backward as CUDA graphs where the device and batch allow.
        graph_length_multiple: graphed batches are right-padded to a multiple of this (fewer shapes).
        pad_id: the padding token, for that padding.
        stepper: a `StepInBackward` over `params` (the update inside backward), or None.
    """

    def __init__(self, model, params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler,
                 *, scaler: torch.amp.GradScaler, max_grad_norm: float = 0.0, cuda_graphs: bool = True,
                 graph_length_multiple: int = 64, pad_id: int = 0, stepper: StepInBackward | None = None):  # fmt: skip
        self.model, self.params = model, list(params)
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.max_grad_norm, self.stepper = max_grad_norm, stepper
        self.graph_length_multiple, self.pad_id = graph_length_multiple, pad_id
        self.device = self.params[0].device
        self.graphs: CudaGraphStep | None = None
        self._logged: set[str] = set()
        if cuda_graphs and self.device.type == "cuda":
            if scaler.is_enabled():
                log.info("cuda_graphs: off for float16 compute (its loss scale changes between steps); eager steps")
            else:
                self.graphs = CudaGraphStep(model, self.params, stepper=stepper)

    def _log_once(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            log.info(reason)

    def _micro_batch(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Forward and backward of one micro-batch (its gradient times `scale`); returns its loss sum."""
        if self.graphs is not None:
            extra = sorted(set(batch) - GRAPH_KEYS)
            if not extra:
                return self.graphs.forward_backward(pad_batch(batch, self.graph_length_multiple, self.pad_id), scale)
            self._log_once(f"cuda_graphs: batches with {extra} (packed) train eagerly")
        s, _ = loss_sum(self.model, batch_to(batch, self.device))
        if self.stepper is not None:  # the update runs inside this backward, layer by layer
            self.stepper.prepare()
            self.stepper.backward(s * scale)
        else:
            self.scaler.scale(s * scale).backward()
        return s.detach()

    def __call__(self, micro_batches: Sequence[dict[str, torch.Tensor]]) -> StepStats:
        started = time.perf_counter()
        target_tokens = target_token_count(micro_batches)
        scale = 1.0 / max(target_tokens, 1)
        total = torch.zeros((), dtype=torch.float32, device=self.device)  # read back once per step
        for batch in micro_batches:
            total += self._micro_batch(batch, scale)
        self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.stepper is None:  # with the update in backward no gradient is left here
            # max_grad_norm 0: no clipping; the norm is still measured (an infinite bound scales by exactly 1)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)  # skips the step if fp16 gradients overflowed (no gradients: no-op)
        self.scaler.update()
        self.scheduler.step()
        if self.graphs is not None:
            self.graphs.zero_grad()  # in place: the captured graphs own the .grad buffers
        else:
            self.optimizer.zero_grad(set_to_none=True)
        loss = float(total) / max(target_tokens, 1)
        norm = None if grad_norm is None else float(grad_norm)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the clock stops when the GPU's work is done
        seconds = time.perf_counter() - started
        return StepStats(loss, lr, norm, target_tokens, sum(count_tokens(b) for b in micro_batches), seconds)
