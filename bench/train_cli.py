"""`qlora train` measured as users run it, against the QLoRA recipe on transformers + peft + bitsandbytes.

One command: write a random-weight Hugging Face checkpoint (`bench/random_checkpoint.py`: Llama-2-7B's
shape with `--shape 7b`, a tiny one for CPU tests), run `qlora train --model DIR --data FILE --output
OUT --max-steps N` in a subprocess with the product's defaults, run the reference recipe
(`bench/hf_qlora_recipe.py`: the QLoRA script's Trainer setup) in another, and print one table, ours
against the reference, with the ratio; `--out` appends the same numbers as JSON lines.

What is measured, the same way on both sides:

- load: seconds from the start of loading the model from disk (quantizing it on the way) until it is
  on the device (synchronised). Ours: around `qlora.train.loop.load_model`; the reference: around
  `from_pretrained`. The shards were just written, so both read them from the page cache.
- first step: seconds from spawning the process until its first optimizer step has finished
  (imports, tokenizing the data, loading, CUDA graph captures for ours, the step itself).
- steady tokens/s: tokens are the non-padding input tokens of a step (attention mask 1, summed over
  its micro-batches: what `qlora.data.collate.count_tokens` counts); a step's time is the wall time
  between the ends of consecutive optimizer steps (each end device-synchronised: ours' metrics record
  is written after the loss is read back, the reference's callback synchronises), so it includes
  everything a step costs (data, forward/backward, clipping, the paged optimizer, logging). Reported:
  the median over the steps after the first `--skip`, their range, and the aggregate (their tokens
  over their time). The two sides draw different examples (each its own order), so the mean tokens
  per step is printed beside them.
- peak memory: `torch.cuda.max_memory_allocated` inside each process, reset after loading (so "train"
  is the peak from the first step on, the model included), and the device's own used memory sampled
  from this process (`bench/device_memory.py`: counts the CUDA context and bitsandbytes' managed
  paged-optimizer memory, which torch's counters miss).
- losses of every step (both start near ln(vocab) on random weights).

Ours is measured from outside, from what `qlora train` writes: metrics.jsonl (step ends, losses,
its own tokens/s and step seconds, whose product is the step's tokens, its peak allocated memory)
and config.yaml (the truncation and accumulation it resolved). The load time and the peaks before
and after loading come from a probe: `python -m bench.train_cli --probe-ours EVENTS -- train ...`
runs `qlora.cli.main` unchanged after wrapping `qlora.loading.load_model` (and `count_tokens`, whose
counts serve only if the records carry none) to write timed events to a file.

Workload: both sides use the same truncation (`--source-max-len`/`--target-max-len`) and
accumulation (`--grad-accum`); left unset, ours runs with no flags at all and the reference takes
what ours resolved (its config.yaml), so the table compares one workload. The QLoRA script's own
dataclass defaults are 1024 / 256; its Alpaca script and our defaults are 384 / 128.

On the GPU machine (no network; bitsandbytes from a local wheel, see ../shared/bench/README.md):

    PYTHONPATH=/tmp/site python -m bench.train_cli --shape 7b --steps 12 --skip 2 \\
        --data .carry/train_cli/alpaca_en_demo.json --tokenizer-from .carry/train_cli/wiki.test.raw \\
        --out bench/results/train_cli.jsonl

`--reference-python` runs the reference under another interpreter. Nothing is imported from
../shared: every input is an argument. Run it as a module from the repository root (`python -m
bench.train_cli`): with `python bench/train_cli.py`, `bench/` comes first on `sys.path` and
bitsandbytes' optional `import kernels` finds `bench/kernels.py`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
QLORA_DEFAULT_LENS = (384, 128)  # only when ours did not run and none were given: ours' and the QLoRA Alpaca script's


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ----------------------------------------------------------------------------- ours, inside its process
def _wrap_everywhere(module_name: str, attr: str, make_wrapper) -> bool:
    """Replace `module.attr` by `make_wrapper(original)` there and in every loaded qlora module that imported it.

    Modules imported later (the CLI imports the trainer lazily) bind the wrapper by `from ... import`."""
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    original = getattr(module, attr, None)
    if original is None:
        return False
    wrapper = make_wrapper(original)
    for name, loaded in list(sys.modules.items()):
        if (name == "qlora" or name.startswith("qlora.")) and getattr(loaded, attr, None) is original:
            setattr(loaded, attr, wrapper)
    return True


def probe_ours(events_path: str, qlora_argv: list[str]) -> int:
    """Run `qlora.cli.main(qlora_argv)` as the console script does, writing load-time and memory events to a file."""
    events = open(events_path, "w", encoding="utf-8")  # noqa: SIM115 (open for the whole run, closed below)

    def emit(**record) -> None:
        events.write(json.dumps(record) + "\n")
        events.flush()

    emit(event="start", time=time.time())
    import torch

    def on_cuda() -> bool:
        return torch.cuda.is_available() and torch.cuda.is_initialized()

    def timed(load_model):
        @functools.wraps(load_model)
        def timed_load(*args, **kwargs):
            started = time.time()
            model = load_model(*args, **kwargs)
            record = {"event": "load", "start": started}
            if on_cuda():
                torch.cuda.synchronize()
                record["max_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
                torch.cuda.reset_peak_memory_stats()  # from here on: the training peak
            emit(**record, end=time.time())
            return model

        return timed_load

    def counted(count_tokens):
        @functools.wraps(count_tokens)
        def counting(batch):
            n = count_tokens(batch)
            emit(event="tokens", n=int(n))
            return n

        return counting

    emit(event="probes", load=_wrap_everywhere("qlora.loading", "load_model", timed),
         tokens=_wrap_everywhere("qlora.data.collate", "count_tokens", counted))  # fmt: skip
    from qlora.cli import main

    rc = 1
    try:
        rc = main(qlora_argv)
    finally:
        record = {"event": "end", "time": time.time(), "rc": rc}
        if on_cuda():
            record.update(max_allocated_gib=torch.cuda.max_memory_allocated() / GiB,
                          max_reserved_gib=torch.cuda.max_memory_reserved() / GiB)  # fmt: skip
        emit(**record)
        events.close()
    return rc


# ----------------------------------------------------------------------------- summaries
def steady_stats(ends: list[float], tokens: list[int | None], skip: int) -> dict:
    """Per-step times from consecutive step ends; median/min/max tokens/s and the aggregate over steps > skip."""
    rates, times, toks = [], [], []
    for k in range(max(skip, 1), len(ends)):  # step k+1 (1-based) took ends[k] - ends[k-1]
        dt = ends[k] - ends[k - 1]
        if tokens[k] is None or dt <= 0:
            continue
        rates.append(tokens[k] / dt)
        times.append(dt)
        toks.append(tokens[k])
    if not rates:
        return {"steady_steps": 0}
    return {"steady_steps": len(rates), "tokens_per_s_median": statistics.median(rates),
            "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates),
            "tokens_per_s_aggregate": sum(toks) / sum(times), "step_s_median": statistics.median(times),
            "tokens_per_step_mean": sum(toks) / len(toks)}  # fmt: skip


def remove_paths(paths) -> None:
    """Delete what a run wrote (files and directories), leaving the rest of its workdir alone."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
    return out


def graph_captures(log_text: str) -> dict[int, int]:
    """CUDA graph captures per optimizer step, from the order of `qlora train`'s log lines ("captured a CUDA
    graph ..." lines, then the step's "step N | ..." summary line)."""
    per_step, pending = {}, 0
    for line in log_text.splitlines():
        if line.startswith("captured a CUDA graph"):
            pending += 1
        elif line.startswith("step ") and " | " in line:
            head = line.split(" | ", 1)[0].removeprefix("step ")
            if head.isdigit():
                per_step[int(head)] = pending
                pending = 0
    return per_step


def summarize_ours(output: Path, events_path: Path, spawn_time: float, skip: int) -> dict:
    """Ours' numbers from its metrics.jsonl, config.yaml and the probe's events."""
    import yaml

    records = [r for r in read_jsonl(output / "metrics.jsonl") if r.get("kind") == "train"]
    events = read_jsonl(events_path)
    resolved = {}
    if (output / "config.yaml").is_file():
        resolved = yaml.safe_load((output / "config.yaml").read_text(encoding="utf-8")) or {}
    data, loop_cfg = resolved.get("data", {}), resolved.get("train", {})
    grad_accum = int(loop_cfg.get("grad_accum", 0) or 0)
    counts = [e["n"] for e in events if e.get("event") == "tokens"]
    probe_tokens = None  # count_tokens is called once per micro-batch of each step, in order
    if grad_accum and records and len(counts) == grad_accum * len(records):
        probe_tokens = [sum(counts[k * grad_accum : (k + 1) * grad_accum]) for k in range(len(records))]
    out: dict = {"grad_accum": grad_accum or None, "source_max_len": data.get("max_source_len"),
                 "target_max_len": data.get("max_target_len")}  # fmt: skip
    if records and all("tokens" in r for r in records):
        tokens = [int(r["tokens"]) for r in records]
        out["tokens_from"] = "metrics.jsonl tokens"
    elif records and all(_num(r.get("tokens_per_s")) and _num(r.get("step_seconds")) for r in records):
        tokens = [round(r["tokens_per_s"] * r["step_seconds"]) for r in records]  # the loop's own count, recovered
        out["tokens_from"] = "metrics.jsonl tokens_per_s x step_seconds"
    elif probe_tokens:
        tokens = probe_tokens
        out["tokens_from"] = "probe (count_tokens)"
    else:
        tokens = [None] * len(records)
        out["tokens_from"] = f"unavailable ({len(counts)} counts for {len(records)} steps x accumulation {grad_accum})"
    ends = [float(r["time"]) for r in records]
    out.update(steady_stats(ends, tokens, skip))
    logged = [r["tokens_per_s"] for r in records[skip:] if _num(r.get("tokens_per_s"))]
    out["tokens_per_s_logged_median"] = statistics.median(logged) if logged else None
    peaks = [r["peak_allocated_gib"] for r in records if _num(r.get("peak_allocated_gib"))]
    out["logged_peak_allocated_gib"] = max(peaks) if peaks else None
    out["steps"] = len(records)
    out["losses"] = [r.get("loss") for r in records]
    out["target_tokens"] = [r.get("target_tokens") for r in records]
    out["tokens"] = tokens
    out["probe_tokens"] = probe_tokens
    out["first_step_s"] = ends[0] - spawn_time if ends else None
    load = next((e for e in events if e.get("event") == "load"), None)
    end = next((e for e in events if e.get("event") == "end"), None)
    if load:
        out["load_s"] = load["end"] - load["start"]
        out["load_max_allocated_gib"] = load.get("max_allocated_gib")
    if end:
        out["train_max_allocated_gib"] = end.get("max_allocated_gib")
        out["train_max_reserved_gib"] = end.get("max_reserved_gib")
    return out


def summarize_reference(result: dict, spawn_time: float, skip: int) -> dict:
    steps = result.get("steps_timed", [])
    ends = [s["end_time"] for s in steps]
    out = {k: result.get(k) for k in ("device", "versions", "recipe", "optimizer", "source_max_len", "target_max_len",
                                      "grad_accum", "load_max_allocated_gib", "train_max_allocated_gib",
                                      "train_max_reserved_gib", "example_tokens_mean")}  # fmt: skip
    out.update(steady_stats(ends, [s.get("tokens") for s in steps], skip))
    out["steps"] = len(steps)
    out["losses"] = [s.get("loss") for s in steps]
    out["target_tokens"] = [s.get("target_tokens") for s in steps]
    out["tokens"] = [s.get("tokens") for s in steps]
    out["first_step_s"] = ends[0] - spawn_time if ends else None
    if "load_end_time" in result:
        out["load_s"] = result["load_end_time"] - result["load_start_time"]
    return out


# ----------------------------------------------------------------------------- running the two sides
def run_child(cmd: list[str], log_path: Path, timeout: float, cuda: bool, env: dict | None = None) -> dict:
    """Run `cmd` from the repository root, output to `log_path`; spawn time, wall seconds, rc, device peak."""
    sampler = None
    if cuda:
        from bench.device_memory import DeviceMemorySampler

        sampler = DeviceMemorySampler()
    spawn = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        if sampler:
            sampler.__enter__()
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            if sampler:
                sampler.__exit__(None, None, None)
    out = {"spawn_time": spawn, "wall_s": time.time() - spawn, "rc": rc, "cmd": shlex.join(cmd)}
    if sampler:
        out["device_peak_gib"] = sampler.peak_bytes / GiB
    return out


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_ours(args, model_dir: Path, work: Path, device: str) -> dict:
    output = work / "ours"
    if output.exists():
        shutil.rmtree(output)  # a fresh run: qlora refuses nothing here, but old metrics would mix in
    events = work / "ours.events.jsonl"
    qlora_argv = ["train", "--model", str(model_dir), "--data", str(args.data), "--output", str(output),
                  "--max-steps", str(args.steps), "--device", device]  # fmt: skip
    if args.source_max_len is not None:
        qlora_argv += ["--data.max_source_len", str(args.source_max_len)]
    if args.target_max_len is not None:
        qlora_argv += ["--data.max_target_len", str(args.target_max_len)]
    if args.grad_accum is not None:
        qlora_argv += ["--train.grad_accum", str(args.grad_accum)]
    qlora_argv += shlex.split(args.ours_args)
    cmd = [sys.executable, "-m", "bench.train_cli", "--probe-ours", str(events), "--", *qlora_argv]
    run = run_child(cmd, work / "ours.log", args.timeout, device == "cuda")
    summary = summarize_ours(output, events, run["spawn_time"], args.skip)
    captures = graph_captures((work / "ours.log").read_text(encoding="utf-8", errors="replace"))
    summary["graph_captures"] = [captures.get(k, 0) for k in range(1, summary["steps"] + 1)]
    summary["steady_steps_with_capture"] = sum(1 for c in summary["graph_captures"][args.skip :] if c)
    return {"side": "ours", "user_command": "qlora " + shlex.join(qlora_argv), **run, **summary}


def run_reference(args, model_dir: Path, work: Path, device: str, lens: tuple[int, int], grad_accum: int) -> dict:
    result_path = work / "reference.result.json"
    result_path.unlink(missing_ok=True)
    cmd = [args.reference_python, "-m", "bench.hf_qlora_recipe", "--model", str(model_dir), "--data", str(args.data),
           "--steps", str(args.steps), "--result", str(result_path), "--device", device,
           "--source-max-len", str(lens[0]), "--target-max-len", str(lens[1]), "--grad-accum", str(grad_accum),
           "--recipe", args.recipe]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    run = run_child(cmd, work / "reference.log", args.timeout, device == "cuda", env=env)
    result = json.loads(result_path.read_text(encoding="utf-8")) if result_path.is_file() else {}
    summary = summarize_reference(result, run["spawn_time"], args.skip) if result else {}
    return {"side": "reference", **run, **summary}


# ----------------------------------------------------------------------------- the table
ROWS = [  # (label, key, format)
    ("load (s)", "load_s", "{:.1f}"),
    ("first step from spawn (s)", "first_step_s", "{:.1f}"),
    ("tokens/s steady, median", "tokens_per_s_median", "{:,.0f}"),
    ("tokens/s steady, min", "tokens_per_s_min", "{:,.0f}"),
    ("tokens/s steady, max", "tokens_per_s_max", "{:,.0f}"),
    ("tokens/s steady, aggregate", "tokens_per_s_aggregate", "{:,.0f}"),
    ("tokens/s as logged, median", "tokens_per_s_logged_median", "{:,.0f}"),
    ("s/step steady, median", "step_s_median", "{:.3f}"),
    ("tokens/step steady, mean", "tokens_per_step_mean", "{:,.0f}"),
    ("peak allocated, load (GiB)", "load_max_allocated_gib", "{:.2f}"),
    ("peak allocated, train (GiB)", "train_max_allocated_gib", "{:.2f}"),
    ("peak reserved, train (GiB)", "train_max_reserved_gib", "{:.2f}"),
    ("peak allocated, as logged (GiB)", "logged_peak_allocated_gib", "{:.2f}"),
    ("device peak, whole run (GiB)", "device_peak_gib", "{:.2f}"),
    ("loss, first step", "loss_first", "{:.4f}"),
    ("loss, last step", "loss_last", "{:.4f}"),
    ("process wall (s)", "wall_s", "{:.1f}"),
]


def ratios(ours: dict, ref: dict) -> dict:
    return {key: ours[key] / ref[key] for _, key, _ in ROWS if _num(ours.get(key)) and _num(ref.get(key)) and ref[key]}


def table(sides: list[dict], ratio: dict | None) -> str:
    names = [s["side"] for s in sides] + (["ours/ref"] if ratio is not None else [])
    lines = [f"| {'':32} | " + " | ".join(f"{n:>12}" for n in names) + " |",
             "|" + "-" * 34 + "|" + "|".join("-" * 14 for _ in names) + "|"]  # fmt: skip
    for label, key, fmt in ROWS:
        cells = [fmt.format(s[key]) if _num(s.get(key)) else "-" for s in sides]
        if ratio is not None:
            cells.append(f"{ratio[key]:.2f}" if key in ratio else "-")
        lines.append(f"| {label:32} | " + " | ".join(f"{c:>12}" for c in cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.train_cli", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--shape", default="7b", choices=["tiny", "7b"], help="checkpoint shape (7b: Llama-2-7B)")
    ap.add_argument("--data", required=True, type=Path, help="Alpaca JSON/JSONL file both sides train on")
    ap.add_argument("--tokenizer-from", type=Path, default=None,
                    help="a directory with tokenizer.json to copy, or a text/Alpaca file to train a BPE tokenizer on "
                         "(default: --data)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps on each side")
    ap.add_argument("--skip", type=int, default=2, help="steps left out of the steady tokens/s (at least 1)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--workdir", type=Path, default=None,
                    help="scratch directory (default: a new temporary one, removed at the end unless --keep; a given "
                         "one keeps what it had: only what this run wrote is removed); a complete checkpoint of the "
                         "same shape, seed and tokenizer source in WORKDIR/model is reused")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the workdir (checkpoint, outputs, logs)")
    ap.add_argument("--out", type=Path, default=None,
                    help="append JSON lines here; logs are copied beside it (OUT.ours.log, ...)")  # fmt: skip
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--source-max-len", type=int, default=None, help="both sides (default: ours' default)")
    ap.add_argument("--target-max-len", type=int, default=None, help="both sides (default: ours' default)")
    ap.add_argument("--grad-accum", type=int, default=None, help="both sides (default: ours' default, 16)")
    ap.add_argument("--recipe", default="qlorapy", choices=["qlorapy", "hf"], help="see bench/hf_qlora_recipe.py")
    ap.add_argument("--ours-args", default="", help="extra `qlora train` flags, one shell-quoted string")
    ap.add_argument("--reference-python", default=sys.executable,
                    help="interpreter for the reference (transformers, peft, bitsandbytes importable)")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per side")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--shard-gb", type=float, default=5.0, help="largest safetensors shard (GB)")
    args = ap.parse_args(argv)
    if args.skip < 1:
        ap.error("--skip must be at least 1 (the first step has no previous step end to time it from)")
    if args.steps <= args.skip:
        ap.error(f"--steps {args.steps} leaves no steady step after --skip {args.skip}")
    if not args.data.is_file():
        ap.error(f"--data {args.data}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--probe-ours"]:
        if len(argv) < 3 or argv[2] != "--":
            raise SystemExit("usage: python -m bench.train_cli --probe-ours EVENTS -- train ...")
        return probe_ours(argv[1], argv[3:])
    args = parse_args(argv)
    import torch

    from bench.random_checkpoint import read_complete, write_checkpoint

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    args.data = args.data.resolve()
    tokenizer_from = (args.tokenizer_from or args.data).resolve()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="train_cli_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    # What the end removes without --keep: a temporary workdir whole; in a given one, only what this run wrote.
    ours_files = ["ours", "ours.log", "ours.events.jsonl", "reference.log", "reference.result.json"]
    written = [work] if args.workdir is None else [work / name for name in ours_files]
    lines: list[dict] = []
    try:
        info = read_complete(model_dir)
        if info and (info.shape, info.seed, info.tokenizer_source) == (args.shape, args.seed, str(tokenizer_from)):
            setup = {"side": "setup", "reused": True, **vars(info)}
        else:
            print(f"writing a random {args.shape} checkpoint to {model_dir} ...", flush=True)
            written.append(model_dir)
            info = write_checkpoint(model_dir, args.shape, tokenizer_from, torch.device(device),
                                    max_shard_bytes=int(args.shard_gb * 1e9), seed=args.seed)  # fmt: skip
            setup = {"side": "setup", "reused": False, **vars(info)}
        print(f"checkpoint: {info.shards} shards, {info.weight_bytes / 1e9:.2f} GB, {info.tokenizer} "
              f"({info.tokenizer_vocab} ids), written in {info.write_s:.1f} s", flush=True)  # fmt: skip
        lines.append(setup)
        sides = []
        ours = None
        if not args.skip_ours:
            print("running ours ...", flush=True)
            ours = run_ours(args, model_dir, work, device)
            sides.append(ours)
        if not args.skip_reference:
            lens = (args.source_max_len or (ours or {}).get("source_max_len") or QLORA_DEFAULT_LENS[0],
                    args.target_max_len or (ours or {}).get("target_max_len") or QLORA_DEFAULT_LENS[1])  # fmt: skip
            grad_accum = args.grad_accum or (ours or {}).get("grad_accum") or 16
            print("running the reference ...", flush=True)
            sides.append(run_reference(args, model_dir, work, device, lens, grad_accum))
        for s in sides:
            losses = [x for x in s.get("losses", []) if _num(x)]
            s["loss_first"], s["loss_last"] = (losses[0], losses[-1]) if losses else (None, None)
            s.update(shape=args.shape, steps_requested=args.steps, skip=args.skip)
        ratio = ratios(sides[0], sides[1]) if len(sides) == 2 else None
        print()
        print(table(sides, ratio))
        for s in sides:
            if s.get("steady_steps_with_capture"):
                n, per_step = s["steady_steps_with_capture"], s["graph_captures"]
                print(f"note: {s['side']}: {n} of the steady steps captured a CUDA graph (a new padded length; "
                      f"captures per step {per_step}); more --steps dilute them")  # fmt: skip
        truncations = {(s.get("source_max_len"), s.get("target_max_len")) for s in sides}
        if len(truncations) > 1:
            print("note: the two sides truncated examples differently (see source/target_max_len)")
        failed = [s for s in sides if s["rc"] != 0 or s.get("steady_steps", 0) == 0]
        for s in failed:
            print(f"\n{s['side']}: exit {s['rc']}, {s.get('steps', 0)} steps recorded; last lines of its log:")
            print(tail(work / f"{s['side']}.log"))
        lines += sides
        if ratio is not None:
            lines.append({"side": "ours/reference", **ratio})
        for line in lines:
            line["tool"] = "bench.train_cli"
        print()
        for line in lines:
            print(json.dumps(line))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a", encoding="utf-8") as f:
                for line in lines:
                    f.write(json.dumps(line) + "\n")
            for s in sides:
                shutil.copyfile(work / f"{s['side']}.log", f"{args.out}.{s['side']}.log")
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            remove_paths(written)


if __name__ == "__main__":
    sys.exit(main())
