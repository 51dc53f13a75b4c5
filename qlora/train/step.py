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

Many processes (`qlora.distributed.Parallel`, DDP or FSDP): the step's micro-batches are this rank's
share of the global batch; the target-token count is summed over ranks before the first backward, and
each micro-batch's gradient is scaled by world size / that count, so the mean over ranks the wrappers
reduce to is the gradient of the whole global batch, token-weighted, exactly as one process would
compute it with all the micro-batches. Gradients are reduced on the last micro-batch only. Dropout's
masks are drawn after seeding the generator with the micro-batch's place in the global step
(`micro_batch_seeds`), so which rank runs a micro-batch does not change its masks.

Non-finite steps: when the step's loss (summed over ranks) or its global gradient norm is inf or NaN, the
update is skipped (gradients zeroed, the schedule advances) and the stats say so; the caller counts them.
float16 compute leaves this to its loss scaler, which skips overflowing steps and lowers the scale. With the
update inside backward nothing can be skipped (it has happened): the stats say `nonfinite`, and the caller stops.

Timing is true: `seconds` ends after the step's GPU work has finished (the device is synchronised
before the clock is read), so tokens/s is what the hardware did, not how fast the host queued it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qlora.data.collate import count_tokens
from qlora.distributed import Parallel
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
    nonfinite: bool = False  # the loss or the gradient norm was inf/NaN
    skipped: bool = False  # no update was made (a non-finite step; float16's scaler decides for itself)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device` (copies queued, not waited for)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def micro_batch_seeds(seed: int, step: int, count: int) -> list[int]:
    """The generator seed of each of the `count` micro-batches of optimizer step `step` (0-based, global
    order): a pure function of (seed, step, index), the same on every rank and at every world size."""
    def one(index: int) -> int:
        digest = hashlib.sha256(f"qlora.step:{seed}:{step}:{index}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1  # torch.manual_seed takes a non-negative int64

    return [one(i) for i in range(count)]


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
        parallel: the model wrapped for several processes (`qlora.distributed.parallelize` over a
            `StepLoss`); `params` are then its `params` (local shards under FSDP). None: one process.
    """

    def __init__(self, model, params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler,
                 *, scaler: torch.amp.GradScaler, max_grad_norm: float = 0.0, cuda_graphs: bool = True,
                 graph_length_multiple: int = 64, pad_id: int = 0, stepper: StepInBackward | None = None,
                 parallel: Parallel | None = None):  # fmt: skip
        self.model, self.params = model, list(params)
        self.parallel = parallel if parallel is not None and parallel.mode != "none" else None
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.max_grad_norm, self.stepper = max_grad_norm, stepper
        self.graph_length_multiple, self.pad_id = graph_length_multiple, pad_id
        self.device = self.params[0].device
        self.graphs: CudaGraphStep | None = None
        self._logged: set[str] = set()
        if cuda_graphs and self.device.type == "cuda":
            if self.parallel is not None:
                log.info("cuda_graphs: off under %s (its gradient reduction runs host-side bookkeeping in backward "
                         "that a graph replay would skip); eager steps", self.parallel.mode)  # fmt: skip
            elif scaler.is_enabled():
                log.info("cuda_graphs: off for float16 compute (its loss scale changes between steps); eager steps")
            else:
                self.graphs = CudaGraphStep(model, self.params, stepper=stepper)

    def _log_once(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            log.info(reason)

    def _micro_batch(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Forward and backward of one micro-batch (its gradient times `scale`); returns its loss sum."""
        if self.parallel is not None:
            s, _ = self.parallel.module(**batch_to(batch, self.device))
            self.scaler.scale(s * scale).backward()  # DDP: every rank sees the same reduced (maybe inf) gradients
            return s.detach()
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

    def __call__(self, micro_batches: Sequence[dict[str, torch.Tensor]], seeds: Sequence[int] | None = None
                 ) -> StepStats:  # fmt: skip
        """One optimizer step over `micro_batches` (this rank's share); `seeds`: each one's generator seed
        (`micro_batch_seeds`), or None to draw on from the generator's current state."""
        started = time.perf_counter()
        parallel = self.parallel
        local_tokens = target_token_count(micro_batches)
        target_tokens = local_tokens if parallel is None else int(parallel.runtime.all_reduce([local_tokens])[0])
        multiplier = 1.0 if parallel is None else parallel.gradient_multiplier
        scale = multiplier / max(target_tokens, 1)
        total = torch.zeros((), dtype=torch.float32, device=self.device)  # read back once per step
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            if seeds is not None:
                torch.manual_seed(seeds[i])
            if parallel is None:
                total += self._micro_batch(batch, scale)
            else:
                with parallel.gradient_sync(i == last):
                    total += self._micro_batch(batch, scale)
        if parallel is not None:
            parallel.after_backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.stepper is None and parallel is not None:
            grad_norm = parallel.clip_grad_norm_(self.max_grad_norm)
        elif self.stepper is None:  # with the update in backward no gradient is left here
            # max_grad_norm 0: no clipping; the norm is still measured (an infinite bound scales by exactly 1)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or float("inf"))
        loss_total, tokens = float(total), sum(count_tokens(b) for b in micro_batches)
        if parallel is not None:  # the whole job's step: losses and tokens summed over ranks
            loss_total, tokens = parallel.runtime.all_reduce([loss_total, tokens])
        norm = None if grad_norm is None else float(grad_norm)
        nonfinite = not math.isfinite(loss_total) or (norm is not None and not math.isfinite(norm))
        # float16: the scaler skips overflowing steps and lowers its scale; otherwise a non-finite step is skipped
        skip = nonfinite and not self.scaler.is_enabled() and self.stepper is None
        lr = self.optimizer.param_groups[0]["lr"]
        if not skip:
            self.scaler.step(self.optimizer)  # skips the step if fp16 gradients overflowed (no gradients: no-op)
            self.scaler.update()
        with warnings.catch_warnings():  # a skipped step advances the schedule without an optimizer step
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        if self.graphs is not None:
            self.graphs.zero_grad()  # in place: the captured graphs own the .grad buffers
        elif parallel is not None:
            parallel.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the clock stops when the GPU's work is done
        seconds = time.perf_counter() - started
        if parallel is not None:  # the slowest rank's time
            seconds = parallel.runtime.all_reduce([seconds], op="max")[0]
        return StepStats(loss_total / max(target_tokens, 1), lr, norm, target_tokens, int(tokens), seconds,
                         nonfinite=nonfinite, skipped=skip)
