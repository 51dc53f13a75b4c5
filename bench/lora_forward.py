"""The LoRA layer's forward product `x W^T + h B^T` (4-bit W): what rounding it once costs, per path.

For Llama-2-7B and Llama-3.1-8B projection shapes (bf16, r = 64, NF4 + double quant), times each
way to compute the product, dequantization included, as 20 calls captured in a CUDA graph inside the
kernel policy's graph step (the training step runs graphed, so launch overhead is not counted, and
the graph-step kernels run as they do there):

- `plain`: dequantize + GEMM, no adapter (the floor);
- `two_roundings`: dequantize, GEMM, then + the term (what the layer did before 2026-11-27: loses
  small terms);
- `fp32_product`: `qlora.lora.matmul.add_product_rounding_once` on CUDA (product in float32, term
  added in one pass);
- `adapter_columns`: `qlora.lora.matmul.adapter_columns_matmul` (one GEMM over [x | h] and [W | B]);
- `addmm_no_reduced_precision`: bf16 `addmm` with `allow_bf16_reduced_precision_reduction` off, to
  see whether cuBLAS then rounds once (measured: it rounds before adding C with the flag on).

and, for each, the regression slope of (y - round(x W^T)) on the exact term (1 = the term kept,
0 = lost). `chosen` names the path `base_plus_adapter` takes for that shape.

    PYTHONPATH=. python bench/lora_forward.py --out lora_forward.json    # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

import qlora
from bench.kernels import Timer
from qlora import ops
from qlora.lora.matmul import adapter_columns_matmul, adapter_columns_pay, add_product_rounding_once
from qlora.ops import KernelPolicy

# (name, tokens, in, out): 7B 4x512 projections (q/k/v/o, gate/up, down), 8B 1x8192 (MLP)
SHAPES = [("7b qkvo", 2048, 4096, 4096), ("7b gate/up", 2048, 4096, 11008), ("7b down", 2048, 11008, 4096),
          ("8b gate/up", 8192, 4096, 14336), ("8b down", 8192, 14336, 4096)]  # fmt: skip
RANK = 64


def paths(x, q, h, b, policy: KernelPolicy):
    def plain():
        return F.linear(x, ops.dequantize(q, x.dtype, policy=policy))

    def two_roundings():
        return F.linear(x, ops.dequantize(q, x.dtype, policy=policy)) + h @ b.t()

    def fp32_product():
        return add_product_rounding_once(h @ b.t(), x, ops.dequantize(q, x.dtype, policy=policy), policy=policy)

    def adapter_columns():
        return adapter_columns_matmul(x, q, h, b, policy=policy)[0]

    def addmm_no_reduced_precision():
        flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        try:
            return torch.addmm(h @ b.t(), x, ops.dequantize(q, x.dtype, policy=policy).t())
        finally:
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag

    return {f.__name__: f for f in (plain, two_roundings, fp32_product, adapter_columns, addmm_no_reduced_precision)}


def measure(name, n_tokens, n_in, n_out, timer) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n_tokens, n_in, device="cuda", generator=g).bfloat16()
    q = qlora.quantize(torch.randn(n_out, n_in, device="cuda", generator=g) * n_in**-0.5, "nf4", 64, True)
    h = torch.randn(n_tokens, RANK, device="cuda", generator=g).bfloat16()
    b = (torch.randn(n_out, RANK, device="cuda", generator=g) * 1e-3 * RANK**-0.5).bfloat16()  # term ~1e-3
    policy = KernelPolicy.from_env()
    w = ops.dequantize(q, torch.bfloat16, policy=policy).double()
    base = (x.double() @ w.t()).bfloat16().double()  # round(x W^T)
    term = h.double() @ b.double().t()
    rows = []
    for path, fn in paths(x, q, h, b, policy).items():
        y = fn().double()
        slope = float(((y - base) * term).sum() / term.square().sum()) if path != "plain" else None
        with policy.graph_step():  # warm-ups and capture on the graph's paths (the columns copy's kernel)
            ms = timer(fn, graph=True)
        rows.append({"shape": name, "tokens": n_tokens, "in": n_in, "out": n_out, "r": RANK, "path": path,
                     "ms": round(ms, 4), "slope": None if slope is None else round(slope, 3)})  # fmt: skip
    plain_ms = rows[0]["ms"]
    chosen = "adapter_columns" if adapter_columns_pay(x, q, n_out) else "fp32_product"
    for r in rows:
        r["over_plain_ms"] = round(r["ms"] - plain_ms, 4)
        r["chosen"] = r["path"] == chosen
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/lora_forward.py needs a CUDA GPU")
    timer = Timer("cuda", warmup=3, reps=args.reps)
    rows = [r for shape in SHAPES for r in measure(*shape, timer)]
    print("| shape | path | ms | over plain ms | slope | chosen |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['path']} | {r['ms']} | {r['over_plain_ms']} | {r['slope']} | {r['chosen']} |")
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}  # fmt: skip
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
