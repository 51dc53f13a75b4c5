"""Training throughput and memory of our engine against the reference stack, side by side in one run.

For each workload ("SHAPE:MODE:BxS[,BxS...]", MODE qlora or lora16) it builds our model
(`bench/llama_shapes.py`), times `--steps` optimizer steps after `--warmup` (median, CUDA-synchronised
around each whole step: forward, backward, optimizer step, zero_grad), records peak allocated and
reserved memory of the steps and the peak device memory of the whole workload (`bench/device_memory.py`:
what the GPU itself has in use, which also counts CUDA contexts and the reference's managed-memory
optimizer pages), then runs `reference_stack.py` with the same shape, mode and batches in
a subprocess (so neither process's allocator cache affects the other) and prints both with ratios.

Run on a GPU machine from the repository root (bitsandbytes importable for the reference):

    PYTHONPATH=. python bench/train_throughput.py --reference PATH/reference_stack.py \
        --workloads 7b:qlora:4x512,1x2048,1x512 7b:lora16:4x512 --out results.jsonl

Both sides: LoRA r=64, alpha=16, dropout 0.05 on all seven block linears, NF4 + double quantization
(qlora), bf16 compute, gradient checkpointing, paged AdamW 32-bit (ours: `paged_adamw_32bit`), lr 2e-4,
no gradient clipping, random tokens with labels = inputs. Ours optionally replays forward+backward as
CUDA graphs (`--cuda-graph`, as `qlora train` does by default) and takes the paged optimizer's page
policy (`--page-policy auto|always`), the adapters' dtype (`--lora-dtype`), the residual stream's
(`--residual-dtype`), weight reuse in backward (`--reuse-dense-weights`), the update inside backward
(`--step-in-backward`, `optim.step_in_backward`) and the checkpoints in host memory
(`--offload-checkpoints`, `model.offload_checkpoints`). Both sides train on the same token batches
(`reference_batches`).

Each of our rows records what produced it: the commit (`git rev-parse HEAD`) and whether tracked files
differed from it (`git_dirty`), `steps`, `warmup` and the GPU's name. A copy of the tree without its
`.git` (as on a lent GPU machine) takes the commit from `--git-rev REV`; `git_dirty` is then null.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import torch

from bench.device_memory import DeviceMemorySampler, context_bytes
from bench.llama_shapes import (
    BENCH_LORA,
    SHAPES,
    GiB,
    build_model,
    flops_per_token,
    reference_batches,
    timed_steps,
    train_step,
)
from bench.profile_step import top_kernels
from qlora.config.sections import AdapterDtype, ResidualDtype
from qlora.model.offload import CheckpointOffload
from qlora.ops import policy_of
from qlora.optim import build_optimizer
from qlora.optim.in_backward import StepInBackward, backward_order_groups
from qlora.precision import torch_dtype
from qlora.train.cuda_graph import CudaGraphStep

REPO = Path(__file__).resolve().parents[1]


def source_revision(repo: Path = REPO, given: str | None = None) -> dict:
    """{"git_rev", "git_dirty"}: `repo`'s HEAD and whether its tracked files differ from it (untracked files,
    such as results, do not count); `given` (--git-rev) where the tree is a copy without `.git`, dirty unknown."""
    if given:
        return {"git_rev": given, "git_dirty": None}

    def git(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(repo), *argv], capture_output=True, text=True, timeout=60)

    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no") if head.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        head = status = None
    if head is None or head.returncode != 0:
        return {"git_rev": None, "git_dirty": None}
    dirty = bool(status.stdout.strip()) if status is not None and status.returncode == 0 else None
    return {"git_rev": head.stdout.strip(), "git_dirty": dirty}


def parse_workload(text: str) -> tuple[str, str, list[tuple[int, int]]]:
    shape, mode, configs = text.split(":")
    if shape not in SHAPES or mode not in ("qlora", "lora16"):
        raise SystemExit(f"bad workload {text!r}: SHAPE in {sorted(SHAPES)}, MODE qlora|lora16")
    pairs = [tuple(int(v) for v in c.lower().split("x")) for c in configs.split(",")]
    return shape, mode, pairs  # type: ignore[return-value]


def run_ours(shape: str, mode: str, pairs, args, provenance: dict) -> list[dict]:
    """Our rows of one workload; `provenance` (commit, dirty, device, steps, warmup) goes into each."""
    device = torch.device("cuda")
    s = SHAPES[shape]
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    lora = dataclasses.replace(BENCH_LORA, param_dtype=torch_dtype(args.lora_dtype))
    model = build_model(s, "nf4" if mode == "qlora" else None, device, seed=args.seed, lora=lora)
    model.residual_dtype = None if args.residual_dtype == "compute" else torch_dtype(args.residual_dtype)
    kernels = policy_of(model)  # QLORA_KERNELS, read when the model was built
    model.checkpoint_context = kernels.reusing_dense_weights if args.reuse_dense_weights else None
    model.checkpoint_offload = CheckpointOffload(device) if args.offload_checkpoints else None
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    model_gib = torch.cuda.memory_allocated() / GiB
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(args.optim, params, lr=2e-4, weight_decay=0.0, page_policy=args.page_policy)
    stepper = StepInBackward(optimizer, backward_order_groups(model), kernels) if args.step_in_backward else None
    records = []
    for b, seq in pairs:
        batches = reference_batches(s, b, seq, device, args.seed)  # the very tokens the reference trains on
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        graph_step = CudaGraphStep(model, params, stepper=stepper) if args.cuda_graph else None  # own pool per shape
        times, losses, error = [], [], None
        try:
            for i, (loss, seconds) in enumerate(timed_steps(model, batches, optimizer, args.warmup + args.steps,
                                                                 graph_step, stepper)):
                losses.append(loss)
                if i >= args.warmup:
                    times.append(seconds)
        except torch.cuda.OutOfMemoryError as e:
            error = "OOM: " + str(e).split("\n")[0][:200]
            optimizer.zero_grad(set_to_none=True)
        total, no_recompute = flops_per_token(s, seq, 64)
        policy = "in backward (paged)" if stepper else getattr(optimizer, "page_policy", None)
        rec = {"tool": "qlora", "shape": shape, "mode": mode, "batch": b, "seq": seq, "optimizer": args.optim,
               "cuda_graph": bool(args.cuda_graph), "page_policy": policy,
               "lora_dtype": args.lora_dtype, "residual_dtype": args.residual_dtype,
               "reuse_dense_weights": args.reuse_dense_weights, "step_in_backward": bool(args.step_in_backward),
               "offload_checkpoints": bool(args.offload_checkpoints),
               "optimizer_staging_GiB": round(stepper.staging_bytes / GiB, 3) if stepper else None,
               "build_s": round(build_s, 1), "model_GiB": round(model_gib, 2),
               "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
               "peak_alloc_GiB": round(torch.cuda.max_memory_allocated() / GiB, 3),
               "peak_reserved_GiB": round(torch.cuda.max_memory_reserved() / GiB, 3), "error": error,
               **provenance}  # fmt: skip
        if times:
            med = statistics.median(times)
            rec.update({"step_s_median": round(med, 4), "tokens_per_s": round(b * seq / med, 1),
                        "mfu": round(total * b * seq / med / args.peak_flops, 4),
                        "mfu_no_recompute": round(no_recompute * b * seq / med / args.peak_flops, 4)})  # fmt: skip
        if args.profile_kernels and error is None:
            one_step = functools.partial(train_step, model, batches[0], optimizer, graph_step, stepper)
            rec["top_kernels"] = top_kernels(one_step, args.profile_kernels)
        print(json.dumps(rec), flush=True)
        records.append(rec)
        del graph_step
    if stepper is not None:
        stepper.remove()
    del model, optimizer, stepper
    torch.cuda.empty_cache()
    return records


def run_reference(shape: str, mode: str, pairs, args) -> list[dict]:
    configs = ",".join(f"{b}x{s}" for b, s in pairs)
    cmd = [sys.executable, args.reference, "--shape", shape, "--mode", mode, "--configs", configs,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 and not records:
        records = [{"tool": "reference", "shape": shape, "mode": mode, "error": proc.stderr[-500:]}]
    for r in records:
        print(json.dumps({k: r.get(k) for k in ("shape", "mode", "batch", "seq", "tokens_per_s", "peak_alloc_GiB",
                                                  "error")}), flush=True)  # fmt: skip
    return records


def with_device_peak(records: list[dict], peak_bytes: int) -> list[dict]:
    """Attach the workload's peak device memory (all its batch shapes, model build included) to its records."""
    for r in records:
        r["device_peak_GiB"] = round(peak_bytes / GiB, 3)
    return records


def table(ours: list[dict], theirs: list[dict]) -> str:
    key = lambda r: (r.get("shape"), r.get("mode"), r.get("batch"), r.get("seq"))  # noqa: E731
    ref = {key(r): r for r in theirs}
    lines = ["| shape | mode | B x S | ours tok/s | ref tok/s | speed ratio | ours MFU | ref MFU | ours peak alloc GiB "
             "| ref peak alloc GiB | ours peak reserved GiB | ref peak reserved GiB | ours device peak GiB "
             "| ref device peak GiB |", "|" + "---|" * 14]  # fmt: skip
    for r in ours:
        t = ref.get(key(r), {})
        f = lambda d, k, fmt: "-" if d.get(k) is None else fmt.format(d[k])  # noqa: E731
        ratio = (f"{r['tokens_per_s'] / t['tokens_per_s']:.2f}x" if r.get("tokens_per_s") and t.get("tokens_per_s")
                 else "-")  # fmt: skip
        lines.append(f"| {r['shape']} | {r['mode']} | {r['batch']} x {r['seq']} | "
                     f"{f(r, 'tokens_per_s', '{:,.0f}')} | {f(t, 'tokens_per_s', '{:,.0f}')} | {ratio} | "
                     f"{f(r, 'mfu', '{:.1%}')} | {f(t, 'mfu', '{:.1%}')} | "
                     f"{f(r, 'peak_alloc_GiB', '{:.1f}')} | {f(t, 'peak_alloc_GiB', '{:.1f}')} | "
                     f"{f(r, 'peak_reserved_GiB', '{:.1f}')} | {f(t, 'peak_reserved_GiB', '{:.1f}')} | "
                     f"{f(r, 'device_peak_GiB', '{:.1f}')} | {f(t, 'device_peak_GiB', '{:.1f}')} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["7b:qlora:4x512,1x2048,1x512", "7b:lora16:4x512"])
    ap.add_argument("--reference", default="", help="path of reference_stack.py (empty: ours only)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--optim", default="paged_adamw_32bit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cuda-graph", action="store_true", help="replay forward+backward as a CUDA graph")
    ap.add_argument("--lora-dtype", default="float32", choices=get_args(AdapterDtype),
                    help="our adapter weights' dtype (the reference keeps float32; the QLoRA script used bfloat16)")
    ap.add_argument("--residual-dtype", default="compute", choices=get_args(ResidualDtype),
                    help="our residual stream dtype (model.residual_dtype; the reference hf recipe holds it in fp32)")
    ap.add_argument("--reuse-dense-weights", action=argparse.BooleanOptionalAction, default=True,
                    help="keep each layer's dequantized weights from the recompute for its backward "
                         "(the kernel policy's reusing_dense_weights as model.checkpoint_context, on by default "
                         "as in qlora train)")
    ap.add_argument("--page-policy", default="auto", choices=["auto", "always"], help="paged optimizers' policy")
    ap.add_argument("--step-in-backward", action="store_true",
                    help="update each layer's adapters during backward, states paged through three slots "
                         "(optim.step_in_backward; qlora.optim.in_backward)")
    ap.add_argument("--offload-checkpoints", action="store_true",
                    help="keep the checkpointed layer inputs in pinned host memory between forward and backward "
                         "(model.offload_checkpoints; qlora.model.offload)")
    ap.add_argument("--profile-kernels", type=int, default=0,
                    help="after the timed steps, list the N kernels with most GPU time in one more step")
    ap.add_argument("--peak-flops", type=float, default=989e12, help="H100 SXM dense bf16 (the reference's)")
    ap.add_argument("--out", default="")
    ap.add_argument("--git-rev", default="",
                    help="the commit of this tree, recorded in each row, where it is a copy without .git "
                         "(default: git rev-parse HEAD)")  # fmt: skip
    args = ap.parse_args()
    context = context_bytes()  # before anything touches CUDA
    provenance = {**source_revision(given=args.git_rev or None), "device": torch.cuda.get_device_name(),
                  "steps": args.steps, "warmup": args.warmup}  # fmt: skip
    ours, theirs = [], []
    for text in args.workloads:
        shape, mode, pairs = parse_workload(text)
        with DeviceMemorySampler() as sampler:  # from before the model is built; our CUDA context predates it
            group = run_ours(shape, mode, pairs, args, provenance)
        ours += with_device_peak(group, sampler.peak_bytes + (context or 0))
        if args.reference:
            torch.cuda.empty_cache()
            with DeviceMemorySampler() as sampler:  # the child's own context is in its peak
                group = run_reference(shape, mode, pairs, args)
            theirs += with_device_peak(group, sampler.peak_bytes)
    env = {"device": provenance["device"], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_context_GiB": None if context is None else round(context / GiB, 3),
           "git_rev": provenance["git_rev"], "git_dirty": provenance["git_dirty"]}  # fmt: skip
    print(json.dumps(env))
    print(table(ours, theirs))
    if args.out:
        with open(args.out, "w") as f:
            for r in [env, *ours, *theirs]:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
