"""The paper's parity claim at small scale: does 4-bit QLoRA match 16-bit LoRA and full finetuning?

Four methods on the same data, steps and seeds (`--methods`, `--seeds`):

  full16        every weight trained (fp32 master weights, `--dtype` autocast on CUDA), AdamW
  lora16        LoRA on all linear layers of a 16-bit frozen base
  qlora_nf4_dq  LoRA on an NF4 base with double quantization (the paper's QLoRA)
  qlora_fp4     LoRA on an FP4 (E2M1) base without double quantization (the paper's "Float4" rows)

The data is an instruction set plus the demo's date-normalisation task (`qlora.demo.make_task`),
split once (not per seed) into train and held-out files under `--output/data/`: the Alpaca sample
(`--alpaca`, `--alpaca-heldout` records held out) and `--task-train` / `--task-heldout` task
records. Each run reports the held-out loss (all held-out records), MMLU 5-shot accuracy
(`--mmlu`, optionally `--mmlu-subjects`, `--mmlu-limit` questions per subject) and the task's
held-out exact match. The summary gives mean and sample standard deviation over seeds per method,
in `summary.json`, `summary.md` and `loss_curves.png` (training loss per step, mean over seeds).

LoRA runs go through `qlora.train.loop.train` (the product path: paper defaults except the knobs
below); full finetuning has no product path, so it is a short loop here over the same data
pipeline, loss and schedule. The lrs differ by method on purpose (full finetuning needs a smaller
one: `--full-lr`, default 2e-5; adapters `--lr`, default 2e-4, the paper's).

    python scripts/parity_study.py --model .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --output runs/parity --steps 300 --seeds 0 1 2 --device cuda     # the study (GPU)
    python scripts/parity_study.py --model ... --output /tmp/parity-smoke --smoke   # minutes on a CPU
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
METHODS = {
    "full16": {"kind": "full"},
    "lora16": {"kind": "lora", "quant_type": "none", "double_quant": False},
    "qlora_nf4_dq": {"kind": "lora", "quant_type": "nf4", "double_quant": True},
    "qlora_fp4": {"kind": "lora", "quant_type": "fp4", "double_quant": False},
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", required=True)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4, help="Adapter lr (LoRA, QLoRA).")
    p.add_argument("--full-lr", type=float, default=2e-5, help="Full finetuning lr.")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--alpaca", type=Path, default=SHARED / "data/instruct/alpaca_en_demo.json")
    p.add_argument("--alpaca-heldout", type=int, default=100)
    p.add_argument("--task-train", type=int, default=512)
    p.add_argument("--task-heldout", type=int, default=100)
    p.add_argument("--max-source-len", type=int, default=384)
    p.add_argument("--max-target-len", type=int, default=128)
    p.add_argument("--mmlu", type=Path, default=SHARED / "data/mmlu/cais-mmlu-csv")
    p.add_argument("--mmlu-subjects", nargs="+")
    p.add_argument("--mmlu-limit", type=int, help="At most N questions per subject.")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="A tiny configuration: 1 seed, 4 steps, few records.")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.micro_batch_size, args.grad_accum = args.seeds[:1], 4, 4, 1
        args.alpaca_heldout, args.task_train, args.task_heldout = 8, 16, 8
        args.mmlu_subjects, args.mmlu_limit, args.lora_r = args.mmlu_subjects or ["astronomy"], 4, 8
        args.max_source_len, args.max_target_len = 128, 64
    return args


# --- data ------------------------------------------------------------------------------------------
def write_data(args) -> tuple[Path, Path, list[dict]]:
    """train.jsonl, heldout.jsonl (Alpaca records) and the task's held-out records; fixed across seeds."""
    from qlora.demo import make_task

    d = args.output / "data"
    d.mkdir(parents=True, exist_ok=True)
    alpaca = json.loads(args.alpaca.read_text(encoding="utf-8"))
    if args.smoke:
        alpaca = alpaca[: 2 * args.alpaca_heldout]
    task_train, task_heldout = make_task(args.task_train, args.task_heldout, seed=0)
    train = alpaca[args.alpaca_heldout :] + task_train
    heldout = alpaca[: args.alpaca_heldout] + task_heldout
    for path, records in ((d / "train.jsonl", train), (d / "heldout.jsonl", heldout)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return d / "train.jsonl", d / "heldout.jsonl", task_heldout


def encoded(path: Path, tokenizer, args):
    from qlora.data.formats import load_dataset

    examples, _ = load_dataset(path, tokenizer, "alpaca", max_source_len=args.max_source_len,
                               max_target_len=args.max_target_len)  # fmt: skip
    return examples


# --- training ----------------------------------------------------------------------------------------
def train_lora(method: str, seed: int, train_path: Path, out: Path, args) -> tuple[object, list[tuple[int, float]]]:
    from qlora.adapter import load_adapter_weights, read_adapter_config
    from qlora.config import TrainConfig
    from qlora.loading import load_model
    from qlora.train.loop import resolve_device, train

    spec = METHODS[method]
    cfg = TrainConfig.from_dict({
        "model": {"path": str(args.model), "compute_dtype": args.dtype, "gradient_checkpointing": False},
        "quant": {"quant_type": spec["quant_type"], "double_quant": spec["double_quant"]},
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout},
        "data": {"path": str(train_path), "format": "alpaca", "max_source_len": args.max_source_len,
                 "max_target_len": args.max_target_len, "eval_fraction": 0},
        "optim": {"lr": args.lr},
        "train": {"max_steps": args.steps, "micro_batch_size": args.micro_batch_size, "grad_accum": args.grad_accum,
                  "save_every": 0, "log_every": 1},
        "output": str(out), "seed": seed, "device": args.device,
    }, source="parity_study")  # fmt: skip
    train(cfg, progress=False)
    curve = [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r.get("kind") == "train"]  # fmt: skip
    quant = None if spec["quant_type"] == "none" else spec["quant_type"]
    model = load_model(args.model, quant, spec["double_quant"], getattr(torch, args.dtype),
                       resolve_device(args.device), lora=read_adapter_config(out))  # fmt: skip
    load_adapter_weights(model, out)
    return model.eval(), curve


def train_full(seed: int, train_path: Path, out: Path, args, tokenizer) -> tuple[object, list[tuple[int, float]]]:
    """Every parameter trained: fp32 master weights, autocast to `--dtype` on CUDA, the same batches and loss."""
    from qlora.data.collate import BatchIterator
    from qlora.loading import load_model
    from qlora.train.loop import resolve_device, seed_everything
    from qlora.train.loss import loss_sum

    device = resolve_device(args.device)
    seed_everything(seed)
    # quantized_modules=() keeps every linear a plain nn.Linear: nothing frozen, nothing quantized
    model = load_model(args.model, None, compute_dtype=torch.float32, device=device, quantized_modules=())
    model.tie_weights()
    params = list(dict.fromkeys(model.parameters()))  # tied embedding counted once
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.full_lr, betas=(0.9, 0.999), weight_decay=0.0)
    warmup = math.ceil(0.03 * args.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    batches = BatchIterator(encoded(train_path, tokenizer, args), args.micro_batch_size, pad_id=pad, seed=seed)
    autocast = torch.autocast(device.type, dtype=getattr(torch, args.dtype), enabled=device.type == "cuda")
    curve = []
    model.train()
    for step in range(1, args.steps + 1):
        micro = [next(batches) for _ in range(args.grad_accum)]
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total = 0.0
        for b in micro:
            with autocast:
                s, _ = loss_sum(model, {k: v.to(device) for k, v in b.items()})
            (s / max(n_tokens, 1)).backward()
            total += float(s.detach())
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append((step, total / max(n_tokens, 1)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps(curve))
    return model.eval(), curve


# --- evaluation --------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_run(model, tokenizer, heldout_path: Path, task_records: list[dict], args) -> dict:
    from qlora.demo import DemoSettings, accuracy, answer
    from qlora.eval.mmlu import evaluate_mmlu
    from qlora.eval.mmlu_data import load_examples
    from qlora.train.loop import evaluate

    device = next(model.parameters()).device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    heldout_loss = evaluate(model, encoded(heldout_path, tokenizer, args), 8, pad, device)
    examples = load_examples(args.mmlu, 5, "test", args.mmlu_subjects, args.mmlu_limit)
    mmlu = evaluate_mmlu(model, tokenizer, examples, batch_size=4)
    settings = DemoSettings(model=Path(args.model), output=args.output)
    task = accuracy(answer(model, tokenizer, task_records, settings), task_records)
    return {"heldout_loss": heldout_loss, "mmlu_5shot": mmlu.accuracy, "mmlu_questions": mmlu.questions,
            "task_exact_match": task}  # fmt: skip


def summarize(results: list[dict], out: Path) -> str:
    metrics = ("heldout_loss", "mmlu_5shot", "task_exact_match")
    summary: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        summary[method] = {"seeds": [r["seed"] for r in runs]}
        for m in metrics:
            values = [r[m] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[method][m] = {"mean": statistics.fmean(values), "sd": sd, "values": values}
    (out / "summary.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n")
    lines = ["| method | seeds | held-out loss | MMLU 5-shot | task exact match |", "|---|---|---|---|---|"]
    for method, s in summary.items():
        cells = [f"{s[m]['mean']:.4f} ± {s[m]['sd']:.4f}" for m in metrics]
        lines.append(f"| {method} | {len(s['seeds'])} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n")
    return table


def plot_curves(curves: dict[str, list[list[tuple[int, float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, runs in curves.items():
        steps = [s for s, _ in runs[0]]
        mean = [statistics.fmean(run[i][1] for run in runs) for i in range(len(steps))]
        ax.plot(steps, mean, label=f"{method} (mean of {len(runs)})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from qlora.tokenizer import Tokenizer

    args.output.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_pretrained(args.model)
    train_path, heldout_path, task_records = write_data(args)
    results, curves = [], {}
    for method in args.methods:
        for seed in args.seeds:
            started = time.perf_counter()
            out = args.output / f"{method}-seed{seed}"
            if METHODS[method]["kind"] == "full":
                model, curve = train_full(seed, train_path, out, args, tokenizer)
            else:
                model, curve = train_lora(method, seed, train_path, out, args)
            scores = evaluate_run(model, tokenizer, heldout_path, task_records, args)
            result = {"method": method, "seed": seed, **scores, "seconds": time.perf_counter() - started}
            print(json.dumps(result), flush=True)
            results.append(result)
            curves.setdefault(method, []).append(curve)
            del model
    table = summarize(results, args.output)
    plot_curves(curves, args.output / "loss_curves.png")
    print(table)
    print(f"summary.json, summary.md and loss_curves.png are in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
