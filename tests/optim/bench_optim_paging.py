"""Measure what paging costs: optimizer.step() time and peak GPU memory, paged vs GPU-resident state.

Run on a CUDA machine: `python tests/optim/bench_optim_paging.py` (prints one line per case). Not a test:
the numbers go into `qlora/optim/paging.py`'s docstring with the hardware and versions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from qlora.optim import build_optimizer  # noqa: E402


def bench(name: str, n_tensors: int, numel: int, paged: bool, steps: int = 20) -> tuple[float, int, int]:
    params = [torch.nn.Parameter(torch.randn(numel, device="cuda") * 0.02) for _ in range(n_tensors)]
    options = {} if paged else {"page_min_numel": 1 << 62}
    opt = build_optimizer(name, params, lr=1e-4, weight_decay=0.0, **options)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        opt.step()
    end.record()
    opt.memory_report()  # waits for the last write-back
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    peak = torch.cuda.max_memory_allocated()
    del opt, params
    torch.cuda.empty_cache()
    return ms, peak, 0


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name())
    for name in ("paged_adamw_32bit", "paged_adamw_8bit"):
        for n_tensors, numel in ((64, 1 << 20), (16, 1 << 22)):
            for paged in (False, True):
                ms, peak, _ = bench(name, n_tensors, numel, paged)
                total = n_tensors * numel
                print(f"{name:18s} {n_tensors:3d} x {numel:8d} ({total / 1e6:.0f}M params) paged={paged!s:5s} "
                      f"step {ms:7.2f} ms  peak {peak / 2**20:8.1f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
