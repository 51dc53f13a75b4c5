"""An out-of-memory error turned into advice: how much was asked for, what the device holds, what would fit.

A raw `torch.OutOfMemoryError` names an allocation and a traceback. `out_of_memory(error, config, ...)` returns
an `OutOfMemory` whose message says where it happened, how much the failed allocation wanted (read from torch's
message), the device's capacity and what this process held at its peak, and the settings of this run that
would lower the peak, most effective first: smaller micro-batches at the same global batch, shorter
sequences, gradient checkpointing, checkpoints in host memory, a paged optimizer, the update inside backward,
eager steps instead of CUDA graphs' private pools.
"""

from __future__ import annotations

import re

import torch

from qlora.config import TrainConfig
from qlora.train.errors import OutOfMemory

_ASKED = re.compile(r"[Tt]ried to allocate ([\d.]+ [KMGT]i?B|\d+ bytes)")


def is_out_of_memory(error: BaseException) -> bool:
    """A device's out-of-memory error, or the CPU allocator's ("DefaultCPUAllocator: can't allocate memory")."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def fitting_settings(config: TrainConfig, longest: int | None) -> list[str]:
    """This run's settings that lower peak memory, as command-line options, most effective first."""
    t, m, o, d = config.train, config.model, config.optim, config.data
    advice = []
    if t.micro_batch_size > 1:
        half = t.micro_batch_size // 2
        advice.append(f"--train.micro_batch_size {half} (with --train.grad_accum {t.grad_accum * 2} the optimizer "
                      "step sees the same batch)" if t.global_batch_size is None else
                      f"--train.micro_batch_size {half} (train.global_batch_size keeps the batch)")  # fmt: skip
    if longest:
        advice.append(f"shorter sequences: the longest here has {longest} tokens (--data.max_source_len "
                      f"{d.max_source_len}, --data.max_target_len {d.max_target_len}"
                      + (f", --data.pack_len {d.pack_len}" if d.pack_len else "") + ")")  # fmt: skip
    if not m.gradient_checkpointing:
        advice.append("--model.gradient_checkpointing true (recompute activations in backward)")
    elif not m.offload_checkpoints:
        advice.append("--model.offload_checkpoints true (checkpointed layer inputs wait in host memory)")
    if o.name not in (None, "paged_adamw_32bit", "paged_adamw_8bit"):
        advice.append("--optim.name paged_adamw_8bit or paged_adamw_32bit (optimizer states paged to host memory)")
    if not o.step_in_backward and t.grad_accum == 1 and config.parallel.mode != "fsdp":
        advice.append("--optim.step_in_backward true (each layer updated in backward: no gradient buffers)")
    if t.cuda_graphs:
        advice.append("--train.cuda_graphs false (graphs keep private memory pools)")
    return advice


def out_of_memory(error: BaseException, config: TrainConfig, device: torch.device, *, where: str,
                  longest: int | None = None) -> OutOfMemory:  # fmt: skip
    """The `OutOfMemory` to raise (from `error`) for an allocation that failed `where` (e.g. "in step 12")."""
    asked = _ASKED.search(str(error))
    parts = [f"out of {device.type.upper()} memory {where}"
             + (f": an allocation of {asked.group(1)} failed" if asked else "")]  # fmt: skip
    if device.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        parts.append(f"the device has {total:.1f} GiB; this process peaked at {peak:.1f} GiB allocated")
    advice = fitting_settings(config, longest)
    message = "; ".join(parts) + "."
    if advice:
        message += " To fit, try (most effective first): " + "; ".join(advice) + "."
    return OutOfMemory(message)
