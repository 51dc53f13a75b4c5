"""Does the per-call host->device copy of the 8-bit code tables dominate the 8-bit step on CUDA?

Runs the 8-bit benchmark case of `bench_optim_paging.py` twice: as is, and with `qlora.quant`'s table
look-ups cached per device (monkeypatched here; the fix belongs in `qlora/quant/codes.py`).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_optim_paging  # noqa: E402

import qlora.quant.double_quant as dq  # noqa: E402
from qlora.quant import codes  # noqa: E402

if __name__ == "__main__":
    for label in ("as is", "tables cached per device"):
        if label != "as is":
            dq.dynamic_map = functools.cache(codes.dynamic_map)
            dq.dynamic_map_thresholds = functools.cache(codes.dynamic_map_thresholds)
        for paged in (False, True):
            ms, peak, _ = bench_optim_paging.bench("paged_adamw_8bit", 64, 1 << 20, paged)
            print(f"{label:26s} 8-bit 64 x 1M paged={paged!s:5s} step {ms:7.2f} ms  peak {peak / 2**20:7.1f} MiB")
