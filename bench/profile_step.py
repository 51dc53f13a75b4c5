"""Where a training step's GPU time goes, part by part, timed with CUDA synchronisation.

    PYTHONPATH=. python bench/profile_step.py --shape 7b --batch 4 --seq 512

Times, as medians: the whole step; forward + loss; backward; the optimizer step; and in isolation on
one decoder layer's shapes: dequantizing each linear's weight, the base matmul in bf16, and
`LoRALinear` forward and forward+backward against a dense `F.linear` of the same shape. Prints one
JSON object (also written to `--out`). A full torch.profiler trace of a 7B step has too many events
to summarise quickly; this is the cheap first cut.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.llama_shapes import SHAPES, build_model, random_batch
from qlora import ops
from qlora.lora import LoRALinear
from qlora.ops import policy_of
from qlora.optim import build_optimizer
from qlora.train.loss import loss_sum


def cuda_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def python_hotspots(fn: Callable[[], object], n: int) -> list[str]:
    """Host-side time per Python function over two calls of `fn` (cProfile, own time): where launch overhead is."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(n)
    return out.getvalue().splitlines()


KERNEL_NAME_CHARS = 200  # long enough to tell torch's templated elementwise kernels apart


def top_kernels(fn: Callable[[], object], n: int) -> dict[str, float]:
    """GPU time per kernel name over one call of `fn` (CUDA activity only: a CPU trace of a 7B step is huge)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name[:KERNEL_NAME_CHARS]  # summed per shown name: two kernels never hide each other
            totals[name] = totals.get(name, 0.0) + event.device_time_total / 1e3
            counts[name] = counts.get(name, 0) + 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    return {"_all_kernels": round(sum(totals.values()), 1),
            **{f"{k} (x{counts[k]})": round(v, 2) for k, v in ranked[:n]}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--mode", default="qlora", choices=["qlora", "lora16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--optim", default="paged_adamw_32bit")
    ap.add_argument("--out", default="")
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (experiment)")
    ap.add_argument("--cprofile", type=int, default=0, help="also list the N Python functions with most own time")
    ap.add_argument("--kernels", type=int, default=0, help="also list the N kernels with most GPU time (1 step)")
    args = ap.parse_args()
    device = torch.device("cuda")
    s = SHAPES[args.shape]
    model = build_model(s, "nf4" if args.mode == "qlora" else None, device)
    if args.compile:
        for layer in model.model.layers:
            layer.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(args.optim, params, lr=2e-4, weight_decay=0.0)
    batch = random_batch(s, args.batch, args.seq, device, seed=0)
    policy = policy_of(model)
    result: dict = {"compile": args.compile, "shape": args.shape, "mode": args.mode, "batch": args.batch,
                    "seq": args.seq, "dequantize_impl": policy.implementation_for("cuda")}  # fmt: skip

    state: dict = {}

    def forward():
        total, n = loss_sum(model, batch)
        state["loss"] = total / n

    def backward():
        state["loss"].backward()

    def step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    parts = {"forward_loss": [], "backward": [], "optimizer": []}
    for i in range(6):
        for name, fn in (("forward_loss", forward), ("backward", backward), ("optimizer", step)):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            if i >= 2:
                parts[name].append(time.perf_counter() - t)
    result["step_parts_s"] = {k: round(statistics.median(v), 4) for k, v in parts.items()}
    result["step_s"] = round(sum(result["step_parts_s"].values()), 4)

    layer = model.model.layers[0]
    tokens = args.batch * args.seq
    per_linear = {}
    for name, module in layer.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        x = torch.randn(tokens, module.in_features, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = module.dense_base_weight()
        entry = {"dense_matmul_s": cuda_time(lambda x=x, w=w: F.linear(x, w))}
        if args.mode == "qlora":
            entry["dequantize_s"] = cuda_time(lambda m=module: ops.dequantize(m.base, torch.bfloat16, policy=policy))
        entry["lora_forward_s"] = cuda_time(lambda m=module, x=x: m(x))
        entry["lora_fwd_bwd_s"] = cuda_time(lambda m=module, x=x: m(x).sum().backward())
        entry["dense_fwd_bwd_s"] = cuda_time(lambda x=x, w=w: F.linear(x, w).sum().backward())
        per_linear[name] = {k: round(v * 1e3, 3) for k, v in entry.items()}  # milliseconds
    result["one_layer_ms"] = per_linear
    totals = {k: round(sum(v[k] for v in per_linear.values()) * s.layers, 1) for k in next(iter(per_linear.values()))}
    result["all_layers_ms"] = totals
    model.zero_grad(set_to_none=True)
    if args.cprofile:
        result["python_hotspots"] = python_hotspots(lambda: (forward(), backward(), step()), args.cprofile)
    if args.kernels:
        result["top_kernels_ms"] = top_kernels(lambda: (forward(), backward(), step()), args.kernels)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
