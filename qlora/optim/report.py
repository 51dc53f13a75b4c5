"""Where an optimizer's state lives: bytes on the GPU, in pinned (page-locked) host memory, in plain CPU memory.

Paging is a memory claim, so it needs a measurement every optimizer can answer the same way:
`state_memory_report(optimizer)` walks `optimizer.state` and sums `numel * element_size` of every
tensor by location, plus any GPU staging buffers the optimizer reports through a
`staging_bytes()` method. `TorchAdamW` is `torch.optim.AdamW` with that method attached, so the
`adamw` choice answers `memory_report()` like the others while staying torch's own class
(same state_dict, same maths, same defaults).
"""

from __future__ import annotations

import torch


def state_memory_report(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """{"gpu_bytes", "pinned_host_bytes", "cpu_bytes", "gpu_staging_bytes"} of `optimizer`'s state."""
    report = {"gpu_bytes": 0, "pinned_host_bytes": 0, "cpu_bytes": 0, "gpu_staging_bytes": 0}
    for state in optimizer.state.values():
        for value in state.values():
            if not isinstance(value, torch.Tensor):
                continue
            nbytes = value.numel() * value.element_size()
            if value.is_cuda:
                report["gpu_bytes"] += nbytes
            elif value.device.type == "cpu" and torch.cuda.is_available() and value.is_pinned():
                report["pinned_host_bytes"] += nbytes
            elif value.device.type == "cpu":
                report["cpu_bytes"] += nbytes
            else:  # another accelerator: count it with the device memory
                report["gpu_bytes"] += nbytes
    staging = getattr(optimizer, "staging_bytes", None)
    if staging is not None:
        report["gpu_staging_bytes"] = staging()
    return report


class TorchAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW`, plus `memory_report()`."""

    def memory_report(self) -> dict[str, int]:
        return state_memory_report(self)
