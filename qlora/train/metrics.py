"""What a run reports: `metrics.jsonl`, TensorBoard events, `loss.png`, and a progress bar.

`metrics.jsonl` is the record of truth: one JSON object per line, appended and flushed on every
call, so a crash loses at most the line being written (flushed to the OS, not fsync'ed: a power cut
can still lose the last seconds; an fsync per step would cost more than the step on small models).
Train records carry `kind="train"`, `step`, `loss`, `lr`, `tokens_per_s`; eval records carry
`kind="eval"`, `step`, `eval_loss`; both carry `time` (Unix seconds) and whatever else the caller
passes. `step` is the number of optimizer steps completed.

Non-finite numbers (a NaN or infinite loss) are written as JSON `null`: the file stays strict JSON
(`json.dumps(..., allow_nan=False)`), which `jq`, pandas and browsers read, where Python's default
`NaN` token would break them. The cost is that NaN and inf are not told apart; a run whose loss is
null has diverged either way, and the loop should stop on it rather than log it.

Resuming: `MetricsLogger(out, resume_step=k)` keeps the file, drops the records with `step > k`
(written after the checkpoint being resumed, and about to be written again) and any torn last
line, rewrites it atomically, then appends. TensorBoard is told the same with `purge_step=k + 1`.
Without `resume_step` a fresh run truncates the file; whether reusing an output directory is
allowed at all is the training loop's decision, not this module's.

`plot_losses` redraws `loss.png` from `metrics.jsonl` alone (matplotlib's object API with the Agg
canvas: no pyplot global state, no display needed), so it works on a finished, running or
crashed run. `ProgressBar` is a thin tqdm wrapper that shows step, loss, lr, tokens/s and memory,
and turns itself off when the stream it draws on (stderr by default) is not a terminal, so logs
redirected to a file do not fill with carriage returns.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOSS_PLOT = "loss.png"


def _plain(value: Any) -> Any:
    """A JSON-safe value: tensors and numpy scalars become Python numbers; NaN/inf become None."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a metrics.jsonl file; unreadable lines (a torn last line) are skipped with a warning."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(
                    f"{path}:{lineno}: skipping a line that is not JSON (torn write?)", stacklevel=2
                )
                continue
            if isinstance(record, dict):
                yield record


class MetricsLogger:
    """Appends metric records to `output_dir/metrics.jsonl` and to TensorBoard (`output_dir/tensorboard`)."""

    def __init__(
        self, output_dir: str | Path, *, resume_step: int | None = None, tensorboard: bool = True
    ) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
            mode = "a"
        else:
            mode = "a" if resume_step is not None else "w"
        self._file: IO[str] | None = self.path.open(mode, encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is a dependency; keep the run alive if it is broken
                warnings.warn(f"TensorBoard logging is off: {e}", stacklevel=2)
            else:
                purge = resume_step + 1 if resume_step is not None else None
                self._tb = SummaryWriter(log_dir=str(self.output_dir / TENSORBOARD_DIR), purge_step=purge)

    def _truncate_after(self, resume_step: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a torn last line is expected after a crash
            kept = [
                r
                for r in read_metrics(self.path)
                if not isinstance(r.get("step"), int) or r["step"] <= resume_step
            ]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for record in kept:
                f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def log(self, step: int, kind: str = "train", **values: Any) -> dict[str, Any]:
        """Write one record `{"kind", "step", "time", **values}` and return it."""
        if self._file is None:
            raise RuntimeError(f"MetricsLogger for {self.path} is closed")
        record: dict[str, Any] = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key in ("kind", "step", "time") or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{kind}/{key}", value, global_step=int(step))
        return record

    def log_train(
        self, step: int, *, loss: Any, lr: float, tokens_per_s: float, **extra: Any
    ) -> dict[str, Any]:
        return self.log(step, "train", loss=loss, lr=lr, tokens_per_s=tokens_per_s, **extra)

    def log_eval(self, step: int, *, eval_loss: Any, **extra: Any) -> dict[str, Any]:
        return self.log(step, "eval", eval_loss=eval_loss, **extra)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plot_losses(output_dir: str | Path, *, path: str | Path | None = None) -> Path:
    """Draw train loss (raw and smoothed) and eval loss against step from metrics.jsonl into loss.png."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    output_dir = Path(output_dir)
    out = Path(path) if path is not None else output_dir / LOSS_PLOT
    train: list[tuple[int, float]] = []
    evals: list[tuple[int, float]] = []
    for r in read_metrics(output_dir / METRICS_FILE):
        if r.get("kind") == "train" and isinstance(r.get("loss"), (int, float)):
            train.append((r["step"], float(r["loss"])))
        elif r.get("kind") == "eval" and isinstance(r.get("eval_loss"), (int, float)):
            evals.append((r["step"], float(r["eval_loss"])))

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        steps, losses = zip(*train, strict=True)
        window = max(1, len(losses) // 50)
        if window > 1:
            ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
            ax.plot(
                steps,
                _moving_average(losses, window),
                color="tab:blue",
                label=f"train loss ({window}-record mean)",
            )
        else:
            ax.plot(
                steps, losses, color="tab:blue", marker="." if len(losses) < 30 else None, label="train loss"
            )
    if evals:
        steps, losses = zip(*evals, strict=True)
        ax.plot(steps, losses, color="tab:orange", marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title(output_dir.resolve().name)
    ax.grid(True, alpha=0.3)
    if train or evals:
        ax.legend()
    else:
        ax.text(
            0.5,
            0.5,
            f"no loss records in {METRICS_FILE} yet",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)  # a reader (or a crash) never sees a half-written image
    return out


def _moving_average(values: tuple[float, ...], window: int) -> list[float]:
    """Trailing mean over up to `window` values (shorter at the start), same length as `values`."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def memory_in_use(device: torch.device | str | None = None) -> tuple[float, str]:
    """(GiB, what it measures): CUDA peak allocated by torch on a GPU, else this process's resident memory."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max alloc"
    try:
        with open("/proc/self/statm") as f:
            rss_pages = int(f.read().split()[1])
        return rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**30, "rss"
    except (OSError, ValueError, IndexError, AttributeError):
        import resource  # not on Windows; /proc is Linux only

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak / (2**30 if sys.platform == "darwin" else 2**20), "peak rss"


class ProgressBar:
    """A tqdm bar over optimizer steps showing loss, lr, tokens/s and memory.

    `enabled=None` (default) turns it on only when `file` (default stderr) is a terminal.
    `write()` prints a line without breaking the bar (and still prints when the bar is off).
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        enabled: bool | None = None,
        device: torch.device | str | None = None,
        file: IO[str] | None = None,
    ) -> None:
        from tqdm import tqdm

        self.file = file if file is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.file, "isatty", lambda: False)())
        self.enabled = enabled
        self.device = device
        self._tqdm = tqdm
        self._bar = tqdm(
            total=total, initial=initial, file=self.file, disable=not enabled, unit="step", dynamic_ncols=True
        )

    def update(
        self,
        step: int,
        *,
        loss: float | None = None,
        lr: float | None = None,
        tokens_per_s: float | None = None,
    ) -> str:
        """Move to `step` (optimizer steps completed) and show the numbers; returns the shown postfix."""
        parts = []
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        if lr is not None:
            parts.append(f"lr {float(lr):.2e}")
        if tokens_per_s is not None:
            parts.append(f"{float(tokens_per_s):,.0f} tok/s")
        if self.enabled:
            gib, what = memory_in_use(self.device)
            parts.append(f"{what} {gib:.2f} GiB")
        postfix = ", ".join(parts)
        if self.enabled:
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(step - self._bar.n)
        return postfix

    def write(self, message: str) -> None:
        if self.enabled:
            self._tqdm.write(message, file=self.file)
        else:
            print(message, file=self.file, flush=True)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def summarize(records: Mapping[str, Any]) -> str:
    """One human line for a record, for logs when the bar is off: "step 10 | loss 1.2345 | lr 2.00e-04"."""
    parts = [f"step {records.get('step')}"]
    for key, value in records.items():
        if key in ("kind", "step", "time"):
            continue
        if isinstance(value, float):
            parts.append(f"{key} {value:.3e}" if key == "lr" or abs(value) < 1e-3 else f"{key} {value:.4f}")
        elif value is not None:
            parts.append(f"{key} {value}")
        else:
            parts.append(f"{key} nan/inf")
    return " | ".join(parts)


def memory_summary(device: torch.device) -> str:
    """This process's peak memory so far, for a log line: the device's peak allocated (CUDA) and the host's
    peak resident set (what loading streams through host memory)."""
    import resource  # Linux and macOS; the run's host memory bound is stated for Linux

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)
    parts = [f"host peak RSS {peak:.2f} GiB"]
    if device.type == "cuda":
        parts.insert(0, f"GPU peak allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    return ", ".join(parts)
