"""Paged optimizer under a memory cap: the paged run survives where GPU-resident AdamW runs out of memory.

The QLoRA paper's claim for paged optimizers, as a run on one GPU (7B shape, QLoRA r=64 on all
linears, NF4 + DQ, bf16, gradient checkpointing; `bench/llama_shapes.py`):

1. uncapped, `paged_adamw_32bit` and `adamw`: first `--steps` steps at 1 x 2048 (losses recorded),
   then timed steps at 4 x 512 and 1 x 2048 (median step time: the cost of paging), peak memory;
2. a cap (`torch.cuda.set_per_process_memory_fraction`) halfway between the two runs' peak reserved
   memory at 1 x 2048: the activations at the peak plus GPU-resident AdamW state do not fit under it,
   the same activations plus two paging slots do;
3. capped, both optimizers again from the same seed: the paged run must complete with the uncapped
   losses, the `adamw` run must end with out-of-memory.

Each run is a fresh process (a cap cannot be lifted, and an OOM leaves the allocator in no state to
reuse). Prints a summary and writes JSON to `--out`. Run from the repository root on a GPU machine:

    PYTHONPATH=. python bench/paged_memory_cap.py --out paged_cap.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch

from bench.llama_shapes import SHAPES, GiB, build_model, random_batch, timed_steps, train_step
from qlora.optim import build_optimizer


def one_run(args) -> dict:
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    if args.cap_gib:
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * GiB / total, device.index)
    torch.manual_seed(0)  # the LoRA dropout masks
    s = SHAPES[args.shape]
    model = build_model(s, "nf4", device, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(args.optim, params, lr=2e-4, weight_decay=0.0, page_policy=args.page_policy)
    rec: dict = {"optim": args.optim, "cap_GiB": args.cap_gib, "losses": [], "error": None}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(args.steps):  # the loss-compared phase: 1 x 2048, same batches in every run
            rec["losses"].append(train_step(model, random_batch(s, 1, 2048, device, seed=i), optimizer))
        rec["peak_alloc_GiB_1x2048"] = torch.cuda.max_memory_allocated() / GiB
        rec["peak_reserved_GiB_1x2048"] = torch.cuda.max_memory_reserved() / GiB
        if hasattr(optimizer, "memory_report"):
            rec["optimizer_memory"] = optimizer.memory_report()
        for b, seq in [(4, 512), (1, 2048)] if args.timed else []:
            batches = [random_batch(s, b, seq, device, seed=100 + i) for i in range(4)]
            steps = timed_steps(model, batches, optimizer, args.warmup + args.timed)
            times = [seconds for i, (_, seconds) in enumerate(steps) if i >= args.warmup]
            rec[f"step_s_median_{b}x{seq}"] = statistics.median(times)
    except torch.cuda.OutOfMemoryError as e:
        rec["error"] = "OOM: " + str(e).split("\n")[0][:300]
    rec["peak_alloc_GiB"] = torch.cuda.max_memory_allocated() / GiB
    rec["peak_reserved_GiB"] = torch.cuda.max_memory_reserved() / GiB
    return rec


def spawn(optim: str, cap_gib: float, timed: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--optim", optim, "--cap-gib", str(cap_gib), "--timed", str(timed),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--shape", args.shape,
           "--page-policy", args.page_policy]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"optim": optim, "cap_GiB": cap_gib, "error": f"exit {proc.returncode}: {proc.stderr[-800:]}"}
    rec = json.loads(lines[-1])
    print(json.dumps(rec), flush=True)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--steps", type=int, default=6, help="loss-compared steps at 1 x 2048")
    ap.add_argument("--timed", type=int, default=8, help="timed steps per config in the uncapped runs")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="")
    ap.add_argument("--page-policy", default="always", choices=["always", "auto"],
                    help="the paged optimizer's policy (always: every state paged, the run measured in BENCHMARKS.md; "
                    "auto pages only under pressure, so uncapped it stays resident)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--optim", default="paged_adamw_32bit", help=argparse.SUPPRESS)
    ap.add_argument("--cap-gib", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_run(args)), flush=True)
        return 0

    paged = spawn("paged_adamw_32bit", 0.0, args.timed, args)
    paged_again = spawn("paged_adamw_32bit", 0.0, 0, args)  # run-to-run noise of the losses, uncapped
    plain = spawn("adamw", 0.0, args.timed, args)
    gap = plain["peak_reserved_GiB_1x2048"] - paged["peak_reserved_GiB_1x2048"]
    cap = round(paged["peak_reserved_GiB_1x2048"] + gap / 2, 3)
    paged_capped = spawn("paged_adamw_32bit", cap, 0, args)
    plain_capped = spawn("adamw", cap, 0, args)

    def max_diff(a: dict, b: dict) -> float | None:
        pairs = list(zip(a.get("losses", []), b.get("losses", []), strict=False))
        return max(abs(x - y) for x, y in pairs) if pairs else None

    summary = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": args.shape,
        "cap_GiB": cap,
        "reserved_gap_GiB": gap,
        "paged_capped_completed": paged_capped.get("error") is None and len(paged_capped["losses"]) == args.steps,
        "paged_capped_max_loss_diff": max_diff(paged, paged_capped),
        "paged_repeat_max_loss_diff": max_diff(paged, paged_again),
        "paged_vs_adamw_max_loss_diff": max_diff(paged, plain),
        "adamw_capped_oom": str(plain_capped.get("error", "")).startswith("OOM"),
        "paging_cost": {
            cfg: {"paged_s": paged.get(f"step_s_median_{cfg}"), "adamw_s": plain.get(f"step_s_median_{cfg}")}
            for cfg in ("4x512", "1x2048")
        },
        "runs": {
            "paged": paged,
            "paged_again": paged_again,
            "adamw": plain,
            "paged_capped": paged_capped,
            "adamw_capped": plain_capped,
        },  # fmt: skip
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    ok = summary["paged_capped_completed"] and summary["adamw_capped_oom"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
