"""QLoRA training on several GPUs of one host, ours against the reference stack, in one command.

Ours: `qlora train` under torchrun (`python -m torch.distributed.run --standalone --nproc-per-node N -m qlora
train ... --parallel ddp|fsdp`). The reference: transformers + peft + bitsandbytes under `accelerate launch`
(`bench/hf_qlora_recipe.py --parallel ddp|fsdp`: DDP, or FSDP as PEFT's QLoRA + FSDP guide sets it up, with
`bnb_4bit_quant_storage=bfloat16`). Both train the same random-weight checkpoint (`bench/random_checkpoint.py`)
on the same token blocks, on the same N GPUs, one after the other.

Workloads (per GPU: micro-batch x tokens, one micro-batch per optimizer step, so a step trains N x that):

    ddp-7b     Llama-2-7B shape    DDP    4 x 512
    fsdp-70b   Llama-2-70B shape   FSDP   1 x 512
    fsdp-65b   LLaMA-65B shape     FSDP   1 x 512
    ddp-tiny, fsdp-tiny            the tiny checkpoint, 2 x 64: CPU self-checks of this script (--device cpu:
                                   gloo; the reference then starts under torchrun, since accelerate launch
                                   starts one process for CPUs without mpirun, and runs DDP only)

The data: documents of exactly `tokens - 2` words, each word one token of the checkpoint's tokenizer (checked
with qlora's tokenizer and with `tokenizers`, which transformers' fast tokenizer is), so BOS + text + EOS is one
block of exactly `tokens` on both sides: ours reads them as plain text (`--data.block_size`), the reference with
`--text-blocks` (the same cut). Every token is a target; nothing is padded; no evaluation split.

Measured, the same way on both sides (see `bench/train_cli.py`, whose summaries this reuses):
- tokens/s: the whole job's tokens of a step (all ranks) over the wall time between the ends of consecutive
  optimizer steps, over the steps after `--skip`: median, min, max. Ours' own `tokens_per_s` records
  (metrics.jsonl, the slowest rank's step time) are reported beside it.
- peak memory per rank: `torch.cuda.max_memory_allocated` of each process, the largest and the smallest over
  the ranks: ours from metrics.jsonl (`peak_allocated_gib`, `peak_allocated_gib_min`: from the process start,
  loading included), the reference from its result (loading and training peaks, the larger of them); and the
  used memory of GPU 0 sampled from this process (`bench/device_memory.py`; this process's CUDA context on GPU
  0 is its baseline).

Output: `--out DIR` gets one JSON per run (`WORKLOAD.ours.json`, `WORKLOAD.reference.json`), their logs,
`summary.json` (every run, the ratios ours/reference, the hardware and versions) and `summary.md` (the table).
`--dry-run` prints the commands (and the accelerate config) and runs nothing.

On a machine with 8 GPUs (no network: bitsandbytes from a local wheel, see ../shared/bench/README.md), from the
repository root; a 70B checkpoint is 138 GB on disk and a 65B one 131 GB, each written when its workloads
start and removed after them (unless --keep), so both never lie on disk together:

    PYTHONPATH=/tmp/site python -m bench.multi_gpu --workloads ddp-7b fsdp-70b fsdp-65b --gpus 8 --steps 12 \\
        --tokenizer-from .carry/train_cli/wiki.test.raw --workdir /tmp/mgpu --out bench/results/multi_gpu
    python -m bench.multi_gpu --workloads fsdp-70b --gpus 8 --tokenizer-from wiki.test.raw --dry-run

Run it as a module from the repository root (`python -m bench.multi_gpu`), for the reason `bench/train_cli.py`
gives.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from bench import llama_shapes, random_checkpoint
from bench.train_cli import read_jsonl, remove_paths, run_child, summarize_ours, summarize_reference, tail

REPO_ROOT = Path(__file__).resolve().parents[1]
SIDES = ("ours", "reference")


@dataclass(frozen=True)
class Workload:
    name: str
    shape: str  # a name of bench/llama_shapes.py SHAPES (or random_checkpoint's "tiny")
    mode: str  # "ddp" or "fsdp", both sides
    micro_batch: int  # examples per GPU per step
    tokens: int  # tokens per example
    title: str


WORKLOADS = {w.name: w for w in [
    Workload("ddp-7b", "7b", "ddp", 4, 512, "Llama-2-7B"),
    Workload("fsdp-70b", "70b", "fsdp", 1, 512, "Llama-2-70B"),
    Workload("fsdp-65b", "65b", "fsdp", 1, 512, "LLaMA-65B"),
    Workload("ddp-tiny", "tiny", "ddp", 2, 64, "tiny (CPU self-check)"),
    Workload("fsdp-tiny", "tiny", "fsdp", 2, 64, "tiny (CPU self-check)"),
]}  # fmt: skip


# ----------------------------------------------------------------------------- checkpoint and data
def checkpoint_shape(name: str) -> random_checkpoint.Shape:
    """The checkpoint shape of a workload: random_checkpoint's own, else bench/llama_shapes.py's."""
    if name in random_checkpoint.SHAPES:
        return random_checkpoint.SHAPES[name]
    s = llama_shapes.SHAPES[name]
    return random_checkpoint.Shape(s.hidden, s.inter, s.layers, s.heads, s.kv_heads, s.vocab)


def write_model(directory: Path, shape: str, tokenizer_from: Path, device, seed: int, shard_gb: float):
    """`random_checkpoint.write_checkpoint` for any shape of `checkpoint_shape`: it looks shapes up by name in its
    SHAPES (tiny and 7b), so a larger one is added there for this call only."""
    extra = {} if shape in random_checkpoint.SHAPES else {shape: checkpoint_shape(shape)}
    with mock.patch.dict(random_checkpoint.SHAPES, extra):
        return random_checkpoint.write_checkpoint(directory, shape, tokenizer_from, device,
                                                  max_shard_bytes=int(shard_gb * 1e9), seed=seed)  # fmt: skip


def one_token_words(tokenizer_json: Path, limit: int = 4096) -> list[str]:
    """Words the tokenizer encodes, alone after a space, as exactly one token (whole-word pieces "▁word")."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    candidates = sorted(p[1:] for p in tok.get_vocab() if p.startswith("▁") and p[1:].isalpha() and p[1:].isascii())
    words = [w for w in candidates if len(tok.encode(w, add_special_tokens=False).ids) == 1]
    if not words:
        raise RuntimeError(f"{tokenizer_json}: no word is one token of this tokenizer; train it on more text "
                           "(--tokenizer-from)")  # fmt: skip
    return words[:limit]


def write_block_data(model_dir: Path, path: Path, tokens: int, documents: int, seed: int) -> dict:
    """`documents` plain-text records whose BOS + text + EOS is exactly `tokens` tokens (module docstring), checked
    with both tokenizers; returns what was written."""
    from tokenizers import Tokenizer

    from qlora.tokenizer import Tokenizer as OursTokenizer

    words = one_token_words(model_dir / "tokenizer.json")
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(words) for _ in range(tokens - 2)) for _ in range(documents)]
    backend, ours = Tokenizer.from_file(str(model_dir / "tokenizer.json")), OursTokenizer.from_pretrained(model_dir)
    lengths = {len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)}
    lengths |= {len(ours.encode(t)) for t in texts[:16]}
    if lengths != {tokens - 2}:
        raise RuntimeError(f"{path}: documents meant to be {tokens - 2} tokens encode to {sorted(lengths)}")
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return {"documents": documents, "tokens_per_document": tokens, "distinct_words": len(words)}


# ----------------------------------------------------------------------------- the commands
def accelerate_config(mode: str, processes: int, device: str, cpu_offload: bool) -> dict:
    """accelerate's config file for the reference. FSDP: PEFT's fsdp_config_qlora.yaml (the QLoRA + FSDP guide),
    with `fsdp_offload_params` false unless `cpu_offload` (the guide offloads to fit 2 x 24 GB GPUs; it measures
    35.6 GiB per GPU without)."""
    config = {"compute_environment": "LOCAL_MACHINE", "debug": False, "downcast_bf16": "no", "machine_rank": 0,
              "main_training_function": "main", "mixed_precision": "no", "num_machines": 1,
              "num_processes": processes, "rdzv_backend": "static", "same_network": True, "tpu_env": [],
              "tpu_use_cluster": False, "tpu_use_sudo": False, "use_cpu": device == "cpu"}  # fmt: skip
    if mode == "fsdp":
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_cpu_ram_efficient_loading": True, "fsdp_forward_prefetch": False, "fsdp_offload_params": cpu_offload,
            "fsdp_sharding_strategy": "FULL_SHARD", "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_sync_module_states": True, "fsdp_use_orig_params": False,
        }  # fmt: skip
    else:
        config["distributed_type"] = "MULTI_CPU" if device == "cpu" else "MULTI_GPU"
    return config


@dataclass(frozen=True)
class Plan:
    """What one workload runs, every path in the workdir."""

    workload: Workload
    gpus: int
    model_dir: Path
    data: Path
    documents: int
    accelerate_config: Path
    commands: dict[str, list[str]]  # side -> argv
    outputs: dict[str, Path]  # side -> ours' run directory, or the reference's result file

    @property
    def global_batch(self) -> int:
        return self.workload.micro_batch * self.gpus


def plan(args, w: Workload, work: Path) -> Plan:
    n = args.gpus
    model_dir, data = work / f"model-{w.shape}", work / f"data-{w.name}-{n}.jsonl"
    config, out_ours, result = work / f"accelerate-{w.name}-{n}.json", work / f"{w.name}.ours", work / f"{w.name}.json"
    documents = max(64, args.steps * w.micro_batch * n)
    ours = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
            "--max-restarts=0", "-m", "qlora", "train", "--model", str(model_dir), "--data", str(data),
            "--output", str(out_ours), "--max-steps", str(args.steps), "--device", args.device,
            "--parallel", w.mode, "--train.micro_batch_size", str(w.micro_batch),
            "--train.global_batch_size", str(w.micro_batch * n), "--data.block_size", str(w.tokens),
            "--data.eval_fraction", "0", "--seed", str(args.seed), *shlex.split(args.ours_args)]  # fmt: skip
    if args.device == "cuda":
        launcher = ["-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", str(n)]
    else:  # accelerate launch starts one process for MULTI_CPU without mpirun: torchrun, which it wraps for GPUs
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "--max-restarts=0"]
    reference = [args.reference_python, *launcher, "-m", "bench.hf_qlora_recipe", "--model", str(model_dir),
                 "--data", str(data), "--steps", str(args.steps), "--result", str(result), "--device", args.device,
                 "--parallel", w.mode, "--text-blocks", str(w.tokens), "--micro-batch-size", str(w.micro_batch),
                 "--grad-accum", "1", "--seed", str(args.seed), *shlex.split(args.reference_args)]  # fmt: skip
    return Plan(w, n, model_dir, data, documents, config, {"ours": ours, "reference": reference},
                {"ours": out_ours, "reference": result})  # fmt: skip


# ----------------------------------------------------------------------------- summaries
def summarize_ours_run(output: Path, spawn_time: float, skip: int, per_pass: int) -> dict:
    """`train_cli.summarize_ours` (no probe: the records alone), the accumulation derived from the global batch
    (`per_pass`: examples per micro-batch over all ranks) and the per-rank peaks of the last record."""
    out = summarize_ours(output, output / "no-probe-events.jsonl", spawn_time, skip)
    for key in ("grad_accum", "source_max_len", "target_max_len"):  # the configured values, not what ran
        out.pop(key, None)
    if (output / "config.yaml").is_file():
        import yaml

        train = (yaml.safe_load((output / "config.yaml").read_text(encoding="utf-8")) or {}).get("train", {})
        if train.get("global_batch_size"):
            out["grad_accum"] = train["global_batch_size"] // per_pass
    records = [r for r in read_jsonl(output / "metrics.jsonl") if r.get("kind") == "train"]
    logged = [r["tokens_per_s"] for r in records[skip:] if isinstance(r.get("tokens_per_s"), (int, float))]
    if logged:
        out.update(tokens_per_s_logged_min=min(logged), tokens_per_s_logged_max=max(logged))
    last = records[-1] if records else {}
    out["peak_allocated_gib_max_rank"] = last.get("peak_allocated_gib")
    out["peak_allocated_gib_min_rank"] = last.get("peak_allocated_gib_min", last.get("peak_allocated_gib"))
    return out


def summarize_reference_run(result_path: Path, spawn_time: float, skip: int) -> dict:
    if not result_path.is_file():
        return {}
    result = json.loads(result_path.read_text(encoding="utf-8"))
    out = summarize_reference(result, spawn_time, skip)
    if result.get("text_blocks"):
        out.pop("source_max_len", None), out.pop("target_max_len", None)  # not used by text blocks
    peaks = [result.get(k) for k in ("load_max_allocated_gib", "train_max_allocated_gib")]
    peaks = [p for p in peaks if isinstance(p, (int, float))]
    out["peak_allocated_gib_max_rank"] = max(peaks) if peaks else None
    out["peak_allocated_gib_min_rank"] = result.get("train_max_allocated_gib_min", out["peak_allocated_gib_max_rank"])
    out.update({k: result.get(k) for k in ("world_size", "parallel", "micro_batch_size", "text_blocks")})
    return out


def hardware(device: str) -> dict:
    import torch

    out = {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda}  # fmt: skip
    if device == "cuda" and torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            out["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
        except OSError:
            out["driver"] = None
    try:
        commit = ["git", "rev-parse", "--short", "HEAD"]
        out["qlora_commit"] = subprocess.run(commit, cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        out["qlora_commit"] = None
    return out


def fmt(x, spec: str) -> str:
    return spec.format(x) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def table(runs: list[dict]) -> str:
    """One row per run and one ratio row (ours / reference) per workload."""
    lines = ["| workload | GPUs | side | tokens/s median (min-max) | ours' logged tokens/s | s/step | peak alloc GiB, "
             "max rank / min rank | GPU 0 used peak GiB | exit |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        def cell(key: str, spec: str, r: dict = r) -> str:
            return fmt(r.get(key), spec)

        if r["side"] == "ratio":
            cells = ["ours/ref", cell("tokens_per_s_median", "{:.2f}"), "", cell("step_s_median", "{:.2f}"),
                     cell("peak_allocated_gib_max_rank", "{:.2f}"), cell("device_peak_gib", "{:.2f}"), ""]  # fmt: skip
        else:
            rate = (f"{cell('tokens_per_s_median', '{:,.0f}')} ({cell('tokens_per_s_min', '{:,.0f}')}-"
                    f"{cell('tokens_per_s_max', '{:,.0f}')})")  # fmt: skip
            peaks = f"{cell('peak_allocated_gib_max_rank', '{:.2f}')} / {cell('peak_allocated_gib_min_rank', '{:.2f}')}"
            cells = [r["side"], rate, cell("tokens_per_s_logged_median", "{:,.0f}"), cell("step_s_median", "{:.3f}"),
                     peaks, cell("device_peak_gib", "{:.2f}"), str(r.get("rc"))]  # fmt: skip
        lines.append(f"| {r['workload']} | {r['gpus']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


RATIO_KEYS = ("tokens_per_s_median", "tokens_per_s_min", "tokens_per_s_max", "step_s_median",
              "peak_allocated_gib_max_rank", "device_peak_gib")  # fmt: skip


def ratio(ours: dict, ref: dict) -> dict:
    out = {"side": "ratio", "workload": ours["workload"], "gpus": ours["gpus"]}
    for key in RATIO_KEYS:
        a, b = ours.get(key), ref.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            out[key] = a / b
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.multi_gpu", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--workloads", nargs="+", default=["ddp-7b", "fsdp-70b", "fsdp-65b"], choices=list(WORKLOADS))
    ap.add_argument("--gpus", type=int, default=None, help="processes (GPUs) per run (default: every visible GPU)")
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps on each side")
    ap.add_argument("--skip", type=int, default=2, help="steps left out of the steady numbers (at least 1)")
    ap.add_argument("--tokenizer-from", type=Path, default=None,
                    help="a directory with tokenizer.json to copy, or a text/Alpaca file to train a BPE tokenizer on "
                         "(random_checkpoint.py); needed unless every checkpoint is reused")  # fmt: skip
    ap.add_argument("--workdir", type=Path, default=None,
                    help="scratch directory (default: a new temporary one); a complete checkpoint of the same shape, "
                         "seed and tokenizer source in WORKDIR/model-SHAPE is reused")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep what this run wrote in the workdir (checkpoints too)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (JSON per run, logs, summary)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a gloo self-check (tiny only)")
    ap.add_argument("--ours-args", default="", help="extra `qlora train` flags, one shell-quoted string")
    ap.add_argument("--reference-args", default="", help="extra bench/hf_qlora_recipe.py flags")
    ap.add_argument("--reference-python", default=sys.executable,
                    help="interpreter for the reference (transformers, peft, accelerate, bitsandbytes importable)")
    ap.add_argument("--reference-cpu-offload", action="store_true",
                    help="FSDP reference: offload parameters to the CPU, as PEFT's guide does for 24 GB GPUs")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights, the data and both runs")
    ap.add_argument("--shard-gb", type=float, default=5.0, help="largest safetensors shard (GB)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands; write and run nothing")
    args = ap.parse_args(argv)
    if args.skip < 1 or args.steps <= args.skip:
        ap.error(f"--skip must be at least 1 and below --steps (got --steps {args.steps} --skip {args.skip})")
    if args.gpus is None:
        import torch

        args.gpus = torch.cuda.device_count() if args.device == "cuda" else 2
        if args.gpus == 0:
            ap.error("no CUDA device is visible: pass --gpus N (with --dry-run to see the commands), or --device cpu")
    if args.gpus < 1:
        ap.error("--gpus must be at least 1")
    if args.device == "cpu" and any(WORKLOADS[w].shape != "tiny" for w in args.workloads):
        ap.error("--device cpu runs only the tiny self-checks (--workloads ddp-tiny fsdp-tiny)")
    if args.device == "cpu" and "reference" in args.sides and any(WORKLOADS[w].mode == "fsdp" for w in args.workloads):
        ap.error("--device cpu: the reference's FSDP needs accelerate launch on GPUs; run the CPU self-check of "
                 "fsdp-tiny with --sides ours")  # fmt: skip
    return args


def print_plan(p: Plan, args, tokenizer_from: Path | None) -> None:
    w = p.workload
    print(f"# {w.name}: {w.title} shape, {w.mode}, {p.gpus} GPUs x {w.micro_batch} x {w.tokens} tokens "
          f"(global batch {p.global_batch} blocks, {p.global_batch * w.tokens:,} tokens per step), {args.steps} steps")
    print(f"# checkpoint: {p.model_dir} (random {w.shape}, seed {args.seed}, tokenizer from {tokenizer_from})")
    print(f"# data: {p.data} ({p.documents} documents of {w.tokens - 2} one-token words)")
    for side in args.sides:
        if side == "reference" and args.device == "cuda":
            config = accelerate_config(w.mode, p.gpus, args.device, args.reference_cpu_offload)
            print(f"# accelerate config {p.accelerate_config}: {json.dumps(config, sort_keys=True)}")
        print(f"{side}: {shlex.join(p.commands[side])}")
    print()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    tokenizer_from = args.tokenizer_from.resolve() if args.tokenizer_from else None
    if args.dry_run:  # nothing is written: a workdir that would be made is only named
        work = (args.workdir or Path(tempfile.gettempdir()) / "multi_gpu_XXXXXXXX").resolve()
        for name in args.workloads:
            print_plan(plan(args, WORKLOADS[name], work), args, tokenizer_from)
        return 0
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="multi_gpu_"))).resolve()
    plans = [plan(args, WORKLOADS[name], work) for name in args.workloads]
    import torch

    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO_ROOT), env.get("PYTHONPATH")) if x)
    runs: list[dict] = []
    written: list[Path] = []
    by_shape: dict[str, list[Plan]] = {}
    for p in plans:
        by_shape.setdefault(p.workload.shape, []).append(p)
    failed = False
    try:
        for shape, group in by_shape.items():
            model_dir = group[0].model_dir
            info = random_checkpoint.read_complete(model_dir)
            reuse = (info is not None and (info.shape, info.seed) == (shape, args.seed)
                     and (tokenizer_from is None or info.tokenizer_source == str(tokenizer_from)))  # fmt: skip
            if not reuse:
                if tokenizer_from is None:
                    raise SystemExit(f"no complete {shape} checkpoint in {model_dir}: pass --tokenizer-from")
                print(f"writing a random {shape} checkpoint to {model_dir} ...", flush=True)
                written.append(model_dir)
                info = write_model(model_dir, shape, tokenizer_from, torch.device(args.device), args.seed,
                                   args.shard_gb)  # fmt: skip
            print(f"checkpoint {model_dir}: {info.weight_bytes / 1e9:.1f} GB in {info.shards} shards, "
                  f"{info.tokenizer}", flush=True)  # fmt: skip
            for p in group:
                runs += run_plan(p, args, env, info, written)
            if model_dir in written and not args.keep:
                shutil.rmtree(model_dir, ignore_errors=True)  # before the next shape's: 70B and 65B never both
        failed = any(r.get("rc") != 0 or not r.get("steady_steps") for r in runs if r["side"] in SIDES)
    finally:
        summary = {"tool": "bench.multi_gpu", "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "hardware": hardware(args.device), "steps": args.steps, "skip": args.skip, "runs": runs}  # fmt: skip
        text = table(runs) if runs else "(no runs)"
        print()
        print(text)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
            (args.out / "summary.md").write_text(text + "\n", encoding="utf-8")
            for r in runs:
                if r["side"] in SIDES:
                    (args.out / f"{r['workload']}.{r['side']}.json").write_text(json.dumps(r, indent=1) + "\n",
                                                                               encoding="utf-8")  # fmt: skip
                    if Path(r["log"]).is_file():
                        shutil.copyfile(r["log"], args.out / f"{r['workload']}.{r['side']}.log")
        if args.keep:
            print(f"kept {work}")
        else:
            remove_paths(written)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def run_plan(p: Plan, args, env: dict, info, written: list[Path]) -> list[dict]:
    """Both sides of one workload: the data, the accelerate config, the two runs; their summaries and the ratio."""
    w = p.workload
    print_plan(p, args, info.tokenizer_source)
    data_info = write_block_data(p.model_dir, p.data, w.tokens, p.documents, args.seed)
    written.append(p.data)
    config = accelerate_config(w.mode, p.gpus, args.device, args.reference_cpu_offload)
    p.accelerate_config.write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    written.append(p.accelerate_config)
    results = []
    for side in args.sides:
        output = p.outputs[side]
        log = p.outputs[side].parent / f"{w.name}.{side}.log"
        written += [output, log]
        if output.is_dir():
            shutil.rmtree(output)  # a fresh run: old metrics or results would mix in
        elif output.exists():
            output.unlink()
        print(f"running {side} ({w.name}, {p.gpus} processes) ...", flush=True)
        run = run_child(p.commands[side], log, args.timeout, args.device == "cuda", env=env)
        if side == "ours":
            summary = summarize_ours_run(output, run["spawn_time"], args.skip, p.global_batch)
        else:
            summary = summarize_reference_run(output, run["spawn_time"], args.skip)
        expected_tokens = p.global_batch * w.tokens
        seen = summary.get("tokens_per_step_mean")
        record = {"workload": w.name, "side": side, "gpus": p.gpus, "mode": w.mode, "shape": w.shape,
                  "micro_batch_per_gpu": w.micro_batch, "tokens_per_example": w.tokens,
                  "global_batch": p.global_batch, "expected_tokens_per_step": expected_tokens, "log": str(log),
                  "data": data_info, **run, **summary}  # fmt: skip
        notes = []
        if seen is not None and abs(seen - expected_tokens) > 0.5:
            notes.append(f"{seen:.0f} tokens per step, not the {expected_tokens} the workload means")
        if summary.get("world_size") not in (None, p.gpus):
            notes.append(f"{summary['world_size']} processes trained, not {p.gpus}")
        if notes:
            record["note"] = "; ".join(notes)
        if run["rc"] != 0 or not summary.get("steady_steps"):
            print(f"{side}: exit {run['rc']}, {summary.get('steps', 0)} steps recorded; last lines of {log}:")
            print(tail(log))
        results.append(record)
    if len(results) == 2:
        results.append(ratio(results[0], results[1]))
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k not in ("losses", "tokens", "target_tokens")}))
    return results


if __name__ == "__main__":
    sys.exit(main())
