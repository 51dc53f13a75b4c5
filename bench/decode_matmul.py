"""Decoding's projections: the 4-bit matmul kernel against dequantize + GEMM and against a dense bf16 GEMM.

For Llama-2-7B's projection shapes [N, K] (q/k/v/o 4096 x 4096, gate/up 11008 x 4096, down 4096 x 11008,
fused qkv 12288 x 4096) and M = 1, 8, 32 token rows, bf16, NF4 + double quantization at block 64 (the
QLoRA defaults), three ways to compute y = x W^T:

- `matmul_4bit`: `qlora.kernels.matmul_4bit` at its default launch (reads the packed codes once);
- `dequant+mm`: what the layers do today, the dequantize kernel into a reused bf16 buffer, then
  `F.linear` (cuBLAS);
- `dense bf16`: `F.linear` with a bf16 weight held densely (4x the weight memory: the bound a
  16-bit model reaches).

Each time is the median over `--reps` (>= 50) of 20 calls captured in one CUDA graph and replayed,
by CUDA events, after `--warmup` calls: the GPU's time, without Python's launch cost (which for a
few-microsecond kernel would be most of an eager call; `eager us` gives the kernel's per-call time
with it). `weight GB/s` is the bytes of the weight each reads from its storage (4-bit: codes +
absmax codes + nested absmax; dense: 2 per element) over the time. Every result is checked against
the float64 product of the dequantized weight within tests/kernels/test_matmul_4bit.py's tolerance.
`--sweep` also times other launches of the kernel (both paths, several tiles, both lookups, fixed
splits of K), the data for choosing its defaults.

    PYTHONPATH=. python bench/decode_matmul.py --out decode_matmul.json [--sweep]   # on the GPU machine
    PYTHONPATH=. python bench/decode_matmul.py --device cpu                         # smoke: tiny, interpreted
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: `bench` is a folder of the repository
    sys.path.insert(0, str(REPO_ROOT))

from bench.kernels import Timer  # noqa: E402

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008), "qkv fused": (12288, 4096)}
ROWS = (1, 8, 32)
SMOKE_SHAPES = {"odd": (17, 200), "blocks": (40, 192)}  # [N, K]: few programs, a partial step, odd N
SMOKE_ROWS = (1, 3)
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def within_tolerance(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    """tests/kernels/test_matmul_4bit.py's bound: fp32 sums in any order, then one rounding to got's dtype."""
    xd, wd = x.double(), w.double()
    exact = xd @ wd.t()
    g = (x.shape[-1] + 1) * 2.0**-24 * (xd.abs() @ wd.abs().t())
    bound = g + UNIT_ROUNDOFF[got.dtype] * (exact.abs() + g)
    return bool(((got.double() - exact).abs() <= bound).all())


def sweep_launches(rows: int) -> list[dict]:
    """Launch overrides of `matmul_4bit` to time besides its default (tiles, path, lookup)."""
    from qlora.kernels.matmul_4bit import Tiles

    fma = [Tiles(n, k, w) for n, k, w in ((8, 512, 4), (16, 256, 4), (16, 1024, 4), (32, 512, 4), (32, 256, 8))]
    dot = [Tiles(n, k, w) for n, k, w in ((32, 128, 4), (64, 64, 4), (64, 256, 4), (128, 128, 8))]
    launches = [dict(use_dot=True, tiles=t) for t in dot]
    if rows <= 8:  # the CUDA-core path costs a multiply-add per weight and row
        launches += [dict(use_dot=False, tiles=t) for t in fma]
    launches += [dict(lookup="select")] + [dict(splits=s) for s in (1, 4, 16)]  # default tiles, K split otherwise
    return launches


def describe(launch: dict) -> str:
    parts = []
    if "use_dot" in launch:
        parts.append("dot" if launch["use_dot"] else "fma")
    if "tiles" in launch:
        t = launch["tiles"]
        parts.append(f"{t.block_n}x{t.block_k} {t.num_warps}w")
    if "lookup" in launch:
        parts.append(launch["lookup"])
    if "splits" in launch:
        parts.append(f"{launch['splits']} splits")
    return "matmul_4bit " + " ".join(parts)


def bench_shape(name: str, n: int, k: int, rows: tuple[int, ...], device: str, timer: Timer, sweep: bool) -> list[dict]:
    import qlora
    from qlora.kernels.dequantize import dequantize_4bit
    from qlora.kernels.matmul_4bit import matmul_4bit

    bf16 = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(n + k)
    dense = (torch.randn(n, k, device=device, generator=g) * 0.02).to(bf16)
    q = qlora.quantize(dense, "nf4", 64, double_quant=True)
    w = q.dequantize(bf16)
    dense = w.clone()  # the dense GEMM multiplies the same weight
    quant_bytes = sum(t.numel() * t.element_size() for t in q.storage().values())
    buffer = torch.empty(n * k, dtype=bf16, device=device)
    out = []
    for m in rows:
        x = torch.randn(m, k, device=device, generator=g).to(bf16)
        base = {"shape": name, "N": n, "K": k, "M": m}
        impls = [
            ("matmul_4bit", lambda x=x: matmul_4bit(x, q), quant_bytes),
            ("dequant+mm", lambda x=x: F.linear(x, dequantize_4bit(q, bf16, out=buffer)), quant_bytes),
            ("dense bf16", lambda x=x: F.linear(x, dense), 2 * n * k),
        ]
        if sweep:
            impls += [(describe(launch), lambda x=x, launch=launch: matmul_4bit(x, q, **launch), quant_bytes)
                      for launch in sweep_launches(m)]  # fmt: skip
        rows_out = []
        for impl, fn, weight_bytes in impls:
            us = 1e3 * timer(fn, graph=True)
            row = {**base, "impl": impl, "us": us, "weight GB/s": weight_bytes / us / 1e3,
                   "within_tolerance": within_tolerance(fn(), x, w)}  # fmt: skip
            if impl == "matmul_4bit":
                row["eager us"] = 1e3 * timer(fn)
            rows_out.append(row)
        dequant_us, dense_us = rows_out[1]["us"], rows_out[2]["us"]
        for row in rows_out:
            row["vs dequant+mm"], row["vs dense"] = dequant_us / row["us"], dense_us / row["us"]
        out += rows_out
    return out


def print_table(rows: list[dict]) -> None:
    keys = ["shape", "N", "K", "M", "impl", "us", "eager us", "weight GB/s", "vs dequant+mm", "vs dense",
            "within_tolerance"]  # fmt: skip

    def cell(v):
        if isinstance(v, float):
            return f"{v:.2f}" if v < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(cell(r.get(k)) for k in keys) + " |")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a smoke run on tiny shapes through Triton's interpreter")  # fmt: skip
    parser.add_argument("--reps", type=int, default=50, help="timed repetitions (at least 50 on CUDA)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="also time other launches of the kernel")
    parser.add_argument("--out", help="JSON file for the rows and the versions")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench/decode_matmul.py needs a CUDA GPU; on a CPU use --device cpu (a smoke run)")
        if args.reps < 50:
            sys.exit(f"--reps {args.reps}: at least 50 timed repetitions on the GPU")
        shapes, rows, timer = SHAPES, ROWS, Timer("cuda", args.warmup, args.reps)
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules import triton
        shapes, rows, timer = SMOKE_SHAPES, SMOKE_ROWS, Timer("cpu", warmup=0, reps=1)
    import triton

    results = []
    for name, (n, k) in shapes.items():
        results += bench_shape(name, n, k, rows, args.device, timer, args.sweep)
    print_table(results)
    info = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "reps": timer.reps, "warmup": timer.warmup, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv),
    }  # fmt: skip
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"info": info, "rows": results}, f, indent=1)
        print(f"wrote {args.out}")
    if not all(r["within_tolerance"] for r in results):
        sys.exit("a result was outside the tolerance (see within_tolerance in the table)")
    return results


if __name__ == "__main__":
    main()
