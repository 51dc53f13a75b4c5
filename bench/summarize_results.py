"""Median and range of every recorded side-by-side run, so headlines quote the typical run, not the best.

The reference stack's speed moves with the host (it is bound by Python and kernel launches), so one
command's ratio says little; BENCHMARKS.md's summary and the README quote the median over the recorded
runs of the same command, with the range and the number of runs, as this script prints them.

It reads every `bench/results/**/*.jsonl` that `bench/train_throughput.py` wrote (ours: `"tool": "qlora"`;
the reference, `reference_stack.py`: `"tool": "bench_hf_bnb"`). One file is one command. Ours and the
reference are paired only inside one file (same workload: shape, mode, batch, seq), and each run's ratio
is ours / reference of that command. Runs are grouped by GPU, results folder, workload and our setting:

- setting: the flags the JSON records (CUDA graph, page policy, adapter dtype, residual dtype, dense
  weights reused, update in backward, checkpoints offloaded); a flag the record lacks ("?") predates
  that option. A page policy under `--step-in-backward` is shown as "in-bwd": it does not apply there
  (the fifth session recorded it as "auto", later ones as "in backward (paged)").
- results folder (`h100-2026-11-27f`, ...): the JSON records no commit; each folder is one working
  session, whose side-by-side commands ran that session's code (it can still differ between a
  session's runs: BENCHMARKS.md names each run's commit; `--runs` lists the files). `--pool-folders`
  merges folders: runs of different code with the same flags then fall together.

Only commands that measured the reference too are counted unless `--ours-only` is given: the ours-only
files are same-lease comparisons against other code (`before.jsonl`, a branch), not the command.
A second table gives the reference alone per GPU and workload over every command (its script and
versions did not change), which is how much its speed moves between hosts.

    python -m bench.summarize_results                      # every group
    python -m bench.summarize_results --folder h100-2026-11-27f --runs
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "results"
SETTING_FIELDS = (
    "cuda_graph",
    "page_policy",
    "lora_dtype",
    "residual_dtype",
    "reuse_dense_weights",
    "step_in_backward",
    "offload_checkpoints",
)
MODES = {"qlora": "QLoRA", "lora16": "bf16 LoRA"}


@dataclass(frozen=True)
class Run:
    """One workload of one command: ours and (if measured in the same command) the reference."""

    file: str  # relative to the results root
    gpu: str  # "H100" / "H200"
    folder: str  # first folder under the results root
    workload: tuple[str, str, int, int]  # shape, mode, batch, seq
    setting: str
    ours: dict | None
    ref: dict | None


def gpu_of(name: str, where: str) -> str:
    for gpu in ("H100", "H200", "A100", "L40S"):
        if gpu in name:
            return gpu
    raise ValueError(f"{where}: device {name!r} is none of H100/H200/A100/L40S; add it to gpu_of")


def setting_of(row: dict) -> str:
    """A short label of our flags, one per field; '?' where the record predates the option."""
    flags = {k: row.get(k) for k in SETTING_FIELDS}
    if flags["step_in_backward"]:
        flags["page_policy"] = "in-bwd"

    def on(value) -> str:
        return "?" if value is None else ("on" if value else "off")

    return (
        f"{'graph' if flags['cuda_graph'] else ('eager' if flags['cuda_graph'] is False else 'graph?')}"
        f" page={flags['page_policy'] or '?'} lora={flags['lora_dtype'] or '?'}"
        f" resid={flags['residual_dtype'] or '?'} reuse={on(flags['reuse_dense_weights'])}"
        f" offload={on(flags['offload_checkpoints'])}"
    )


def read_runs(root: Path) -> list[Run]:
    runs = []
    for path in sorted(root.glob("**/*.jsonl")):
        rel = str(path.relative_to(root))
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON ({e}); fix or move the file") from e
        header = next((r["device"] for r in rows if "tool" not in r and "device" in r), None)
        ours, ref = {}, {}
        for r in rows:
            if r.get("tool") not in ("qlora", "bench_hf_bnb") or r.get("tokens_per_s") is None or r.get("error"):
                continue  # learning curves, kernel sweeps, failed workloads
            key = (r["shape"], r["mode"], r["batch"], r["seq"])
            side = ours if r["tool"] == "qlora" else ref
            if key in side:
                raise ValueError(f"{path}: two {r['tool']} rows for {key}; one file should be one command")
            side[key] = r
        for key in sorted(set(ours) | set(ref)):
            device = (ref.get(key) or {}).get("device") or header or path.relative_to(root).parts[0]
            runs.append(
                Run(
                    file=rel,
                    gpu=gpu_of(device, rel),
                    folder=path.relative_to(root).parts[0],
                    workload=key,
                    setting=setting_of(ours[key]) if key in ours else "-",
                    ours=ours.get(key),
                    ref=ref.get(key),
                )
            )
    return runs


def spread(values: Iterable[float], fmt: str) -> str:
    """'median (min-max)' or the single value."""
    values = sorted(values)
    if not values:
        return ""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(values[0])}-{fmt.format(values[-1])})"


def workload_label(workload: tuple[str, str, int, int]) -> str:
    shape, mode, batch, seq = workload
    return f"{shape} {MODES.get(mode, mode)} {batch} x {seq}"


def run_label(file: str) -> str:
    """run41/t7b.jsonl -> run41; t7b.jsonl -> t7b (the folder's only command of that name)."""
    parts = Path(file).parts
    return parts[-2] if len(parts) > 2 else Path(parts[-1]).stem


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="results folder (default: bench/results)")
    parser.add_argument("--folder", action="append", help="only these results folders (repeatable)")
    parser.add_argument("--shape", action="append", help="only these shapes, e.g. 7b (repeatable)")
    parser.add_argument("--pool-folders", action="store_true", help="group across results folders (code versions)")
    parser.add_argument("--ours-only", action="store_true", help="also count files without the reference")
    parser.add_argument("--runs", action="store_true", help="list each group's runs with their ratios")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        raise SystemExit(f"{args.root}: no such results folder; pass --root")
    runs = [
        r
        for r in read_runs(args.root)
        if (not args.folder or r.folder in args.folder) and (not args.shape or r.workload[0] in args.shape)
    ]

    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        if r.ours is None or (r.ref is None and not args.ours_only):
            continue
        folder = "(pooled)" if args.pool_folders else r.folder
        groups[(r.gpu, folder, r.workload, r.setting)].append(r)

    print("Ours against the reference, one group per GPU, results folder, workload and our setting;")
    print("each cell: median (min-max) over the group's runs; ratio = ours / reference of the same command.\n")
    print(
        "| GPU | folder | workload | our setting | runs | ours tok/s | ref tok/s | ratio | ours MFU % | ref MFU % "
        "| ours peak alloc GiB | ref peak alloc GiB |"
    )
    print("|" + "---|" * 12)
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2][0], k[2][1], -k[2][2], k[2][3], k[3])):
        gpu, folder, workload, setting = key
        group = groups[key]
        paired = [r for r in group if r.ref is not None]
        cells = [
            gpu,
            folder,
            workload_label(workload),
            setting,
            f"{len(group)}" + (f" ({len(paired)} with ref)" if len(paired) != len(group) else ""),
            spread((r.ours["tokens_per_s"] for r in group), "{:,.0f}"),
            spread((r.ref["tokens_per_s"] for r in paired), "{:,.0f}"),
            spread((r.ours["tokens_per_s"] / r.ref["tokens_per_s"] for r in paired), "{:.2f}x"),
            spread((100 * r.ours["mfu"] for r in group), "{:.1f}"),
            spread((100 * r.ref["mfu"] for r in paired), "{:.1f}"),
            spread((r.ours["peak_alloc_GiB"] for r in group), "{:.1f}"),
            spread((r.ref["peak_alloc_GiB"] for r in paired), "{:.1f}"),
        ]
        print("| " + " | ".join(cells) + " |")
        if args.runs:
            for r in group:
                ratio = f" = {r.ours['tokens_per_s'] / r.ref['tokens_per_s']:.2f}x" if r.ref else ""
                ref = f" / {r.ref['tokens_per_s']:,.0f}" if r.ref else ""
                print(f"|  |  |  |  | {run_label(r.file)} | {r.ours['tokens_per_s']:,.0f}{ref}{ratio} | {r.file} |")

    refs: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        if r.ref is not None:
            refs[(r.gpu, r.workload)].append(r)
    print("\nThe reference alone, every command that ran it (its script and versions never changed):\n")
    print("| GPU | workload | commands | ref tok/s median (min-max) | slowest | fastest |")
    print("|---|---|---|---|---|---|")
    for key in sorted(refs, key=lambda k: (k[0], k[1][0], k[1][1], -k[1][2], k[1][3])):
        group = sorted(refs[key], key=lambda r: r.ref["tokens_per_s"])
        speeds = spread((r.ref["tokens_per_s"] for r in group), "{:,.0f}")
        print(f"| {key[0]} | {workload_label(key[1])} | {len(group)} | {speeds} | {group[0].file} | {group[-1].file} |")


if __name__ == "__main__":
    main()
