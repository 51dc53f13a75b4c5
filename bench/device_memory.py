"""Peak GPU memory as the device sees it, sampled from a thread: what torch's allocator counters miss.

Why. `torch.cuda.max_memory_allocated` counts only tensors of the process's caching allocator. The
reference stack's paged optimizer keeps its state in CUDA managed memory, which lives on the GPU
until the driver needs it back but never shows in those counters; a CUDA context (~0.5 GiB) and
cuBLAS workspaces do not either. Comparing allocator peaks would therefore credit whichever side
hides memory from its allocator. `DeviceMemorySampler` reads the device's used memory
(`total - free` from cudaMemGetInfo, all processes) every few milliseconds and keeps the peak above
a baseline taken when it starts; `context_bytes()` measures one CUDA context so that a run in this
process (whose context predates the baseline) and a run in a child process (whose context does not)
are charged alike.
"""

from __future__ import annotations

import subprocess
import threading
import time

import torch


def device_used_bytes(device: int = 0) -> int:
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def nvidia_smi_used_bytes(device: int = 0) -> int | None:
    """Used memory from nvidia-smi (works before this process has a CUDA context); None if unavailable."""
    try:
        query = ["nvidia-smi", f"--id={device}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout
        return int(out.strip().splitlines()[0]) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def context_bytes(device: int = 0) -> int | None:
    """Bytes one CUDA context of this process takes: nvidia-smi before and after torch initialises the device.

    Call it first thing, before anything touches CUDA; returns None if nvidia-smi is missing or CUDA is already up."""
    if torch.cuda.is_initialized():
        return None
    before = nvidia_smi_used_bytes(device)
    torch.zeros(1, device=f"cuda:{device}")
    after = device_used_bytes(device)
    return None if before is None else max(after - before, 0)


class DeviceMemorySampler:
    """`with DeviceMemorySampler() as s: ...` then `s.peak_bytes`: the peak of device used memory above the
    value at entry, sampled every `interval` seconds (plus once at exit)."""

    def __init__(self, device: int = 0, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.baseline = self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, device_used_bytes(self.device) - self.baseline)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> DeviceMemorySampler:
        self.baseline = device_used_bytes(self.device)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
