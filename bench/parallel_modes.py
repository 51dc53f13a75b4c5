"""`qlora train` on one GPU in each parallel mode: one process, and torchrun with DDP and with FSDP2 at world size 1.

    python -m bench.parallel_modes --data alpaca.json --tokenizer-from <dir with tokenizer.json or a text file> \
        [--shape 7b] [--steps 10] [--skip 3] [--out results.json]

What it shows on the one GPU the project is usually lent: the NCCL path works end to end (process group,
one GPU per process, DDP's reducer, FSDP2's per-layer gathers of the 4-bit base), the runs follow the same
loss curve, and what each wrapper costs against the single-process step (CUDA graphs are off under DDP and
FSDP, so the eager single-process run is the like-for-like baseline). Each run is the product as users run
it, from a model directory (a random Llama checkpoint, `bench/random_checkpoint.py`); tokens/s is the median
of the steps after `--skip` (with the range), read from the run's metrics.jsonl; the log's "model loaded:"
line gives the GPU and host peaks after loading.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.random_checkpoint import read_complete, write_checkpoint

VARIANTS = {
    "one process": ([], []),
    "one process eager": ([], ["--train.cuda_graphs", "false"]),
    "torchrun ddp": (["torchrun"], ["--parallel", "ddp"]),
    "torchrun fsdp": (["torchrun"], ["--parallel", "fsdp"]),
}


def run_variant(name: str, model: Path, args, work: Path) -> dict:
    launcher, flags = VARIANTS[name]
    output = work / name.replace(" ", "_").replace(",", "")
    train = ["train", "--model", str(model), "--data", str(args.data), "--output", str(output), "--max-steps",
             str(args.steps), "--device", args.device, "--train.micro_batch_size", str(args.micro_batch),
             "--train.grad_accum", str(args.grad_accum), "--data.max_source_len", str(args.max_len // 2),
             "--data.max_target_len", str(args.max_len // 2), *flags]  # fmt: skip
    if launcher:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "qlora",
               *train]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "qlora", *train]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env={**os.environ})
    wall = time.perf_counter() - started
    log = done.stderr
    result = {"variant": name, "command": " ".join(cmd), "returncode": done.returncode, "wall_s": round(wall, 1)}
    if done.returncode != 0:
        result["error"] = log[-3000:]
        return result
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_records = [r for r in records if r["kind"] == "train"]
    steady = [r["tokens_per_s"] for r in train_records[args.skip :]]
    result.update(
        tokens_per_s_median=round(statistics.median(steady), 1),
        tokens_per_s_range=[round(min(steady), 1), round(max(steady), 1)],
        peak_allocated_gib=round(max(r.get("peak_allocated_gib", 0.0) for r in train_records), 3),
        losses=[round(r["loss"], 5) for r in train_records],
        loaded=[line.split("model loaded: ", 1)[1] for line in log.splitlines() if "model loaded: " in line],
        mode_lines=[line for line in log.splitlines() if "parallel:" in line or "cuda_graphs:" in line][:4],
    )
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.parallel_modes", description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="7b", choices=["tiny", "7b"])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--tokenizer-from", required=True, type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qlora_parallel_modes"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run (gloo)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    model = args.workdir / f"model-{args.shape}"
    if read_complete(model) is None:
        write_checkpoint(model, args.shape, args.tokenizer_from, torch.device(args.device))
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none (cpu)"
    results = {"gpu": gpu, "torch": torch.__version__, "shape": args.shape,
               "settings": {k: str(v) for k, v in vars(args).items()}, "runs": []}  # fmt: skip
    for name in args.variants.split(","):
        results["runs"].append(run_variant(name, model, args, args.workdir))
        run = results["runs"][-1]
        print(f"{name:22s} rc={run['returncode']} tok/s {run.get('tokens_per_s_median')} "
              f"{run.get('tokens_per_s_range')} peak {run.get('peak_allocated_gib')} GiB  {run.get('loaded')}",
              flush=True)  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0 if all(r["returncode"] == 0 for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
