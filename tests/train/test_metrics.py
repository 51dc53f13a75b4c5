"""metrics.jsonl (flushed, strict JSON, resume trimming), TensorBoard events, loss.png, the progress bar."""

from __future__ import annotations

import io
import json
import math
import struct

import pytest
import torch

from qlora.train.metrics import (
    METRICS_FILE,
    MetricsLogger,
    ProgressBar,
    memory_in_use,
    plot_losses,
    read_metrics,
    summarize,
)


def _strict_lines(path) -> list[dict]:
    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def test_each_record_is_on_disk_before_close(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log_train(1, loss=2.5, lr=1e-4, tokens_per_s=1000.0)
    logger.log_eval(1, eval_loss=2.25, perplexity=math.exp(2.25))
    records = _strict_lines(tmp_path / METRICS_FILE)  # read while the logger is still open
    assert [r["kind"] for r in records] == ["train", "eval"]
    assert records[0]["step"] == 1 and records[0]["loss"] == 2.5 and records[0]["lr"] == 1e-4
    assert records[0]["tokens_per_s"] == 1000.0 and isinstance(records[0]["time"], float)
    assert records[1]["eval_loss"] == 2.25 and records[1]["perplexity"] == pytest.approx(math.exp(2.25))
    logger.close()
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(2, loss=1.0)


def test_non_finite_values_become_null_and_tensors_become_numbers(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log_train(1, loss=float("nan"), lr=torch.tensor(1e-4, dtype=torch.float64), tokens_per_s=math.inf)
        logger.log_train(2, loss=torch.tensor(1.5), lr=1e-4, tokens_per_s=10)
    records = _strict_lines(tmp_path / METRICS_FILE)  # would raise on NaN / Infinity tokens
    assert records[0]["loss"] is None and records[0]["tokens_per_s"] is None
    assert records[0]["lr"] == 1e-4
    assert records[1]["loss"] == 1.5


def _write_run(tmp_path, steps, *, offset=0.0, tensorboard=False, resume_step=None):
    with MetricsLogger(tmp_path, tensorboard=tensorboard, resume_step=resume_step) as logger:
        for step in steps:
            logger.log_train(step, loss=10.0 - step + offset, lr=1e-4, tokens_per_s=100.0)
            if step % 4 == 0:
                logger.log_eval(step, eval_loss=9.0 - step + offset)


def test_resume_drops_records_after_the_checkpoint_and_a_torn_line(tmp_path):
    _write_run(tmp_path, range(1, 11))
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"kind": "train", "step": 11, "lo')  # a crash mid-write
    _write_run(tmp_path, range(7, 10), offset=0.5, resume_step=6)
    records = list(read_metrics(tmp_path / METRICS_FILE))
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r["kind"] == "eval"]
    assert [s for s, _ in train] == list(range(1, 10))  # no duplicated step, nothing past 9
    assert train[5] == (6, 4.0) and train[6] == (7, 3.5)  # old up to 6, new from 7
    assert evals == [(4, 5.0), (8, 1.5)]


def test_a_fresh_run_truncates(tmp_path):
    _write_run(tmp_path, range(1, 5))
    _write_run(tmp_path, range(1, 3))
    assert [r["step"] for r in read_metrics(tmp_path / METRICS_FILE) if r["kind"] == "train"] == [1, 2]


def test_read_metrics_warns_about_a_torn_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"kind": "train", "step": 1, "loss": 1.0}\n{"kind": "tr')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:2: skipping a line that is not JSON"):
        records = list(read_metrics(path))
    assert records == [{"kind": "train", "step": 1, "loss": 1.0}]


def test_tensorboard_scalars_and_purge_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _write_run(tmp_path, range(1, 11), tensorboard=True)
    _write_run(tmp_path, range(7, 10), offset=0.5, tensorboard=True, resume_step=6)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/eval_loss"} <= set(acc.Tags()["scalars"])
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    # Steps 7..10 of the first run were purged; 7..9 of the resumed run replace them.
    assert loss == [(s, 10.0 - s) for s in range(1, 7)] + [(s, 10.5 - s) for s in range(7, 10)]


def test_plot_losses_writes_a_png_of_the_run(tmp_path):
    _write_run(tmp_path, range(1, 200))
    out = plot_losses(tmp_path)
    data = out.read_bytes()
    assert out.name == "loss.png" and data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (800, 500)
    assert not list(tmp_path.glob("*.tmp"))


def test_plot_draws_both_curves(tmp_path, monkeypatch):
    # Capture what reaches the axes: train (raw + smoothed) and eval, nulls skipped.
    from matplotlib.axes import Axes

    drawn = []
    original = Axes.plot

    def spy(self, *args, **kwargs):
        drawn.append((kwargs.get("label"), list(args[0]), list(args[1])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log_train(1, loss=3.0, lr=1e-4, tokens_per_s=1.0)
        logger.log_train(2, loss=float("nan"), lr=1e-4, tokens_per_s=1.0)
        logger.log_train(3, loss=2.0, lr=1e-4, tokens_per_s=1.0)
        logger.log_eval(3, eval_loss=2.5)
    plot_losses(tmp_path)
    assert drawn == [("train loss", [1, 3], [3.0, 2.0]), ("eval loss", [3], [2.5])]


def test_plot_of_an_empty_run_still_writes(tmp_path):
    (tmp_path / METRICS_FILE).write_text("")
    assert plot_losses(tmp_path).stat().st_size > 0


def test_progress_bar_is_off_when_not_a_terminal():
    stream = io.StringIO()  # isatty() is False
    with ProgressBar(10, file=stream) as bar:
        assert bar.enabled is False
        shown = bar.update(1, loss=1.23456, lr=2e-4, tokens_per_s=1234.5)
        bar.write("eval loss 1.0")
    assert shown == "loss 1.2346, lr 2.00e-04, 1,234 tok/s"
    assert stream.getvalue() == "eval loss 1.0\n"  # the bar drew nothing; write() still prints


def test_progress_bar_shows_numbers_and_memory_when_on():
    stream = io.StringIO()
    with ProgressBar(10, file=stream, enabled=True, device="cpu") as bar:
        bar.update(3, loss=0.5, lr=1e-4, tokens_per_s=99.0)
        bar.write("hello")
    text = stream.getvalue()
    assert "3/10" in text and "loss 0.5000" in text and "99 tok/s" in text and "rss" in text
    assert "hello" in text


def test_memory_in_use_on_cpu():
    gib, what = memory_in_use("cpu")
    assert what in ("rss", "peak rss")
    assert 0.01 < gib < 1024  # this process has torch loaded: tens of MiB at least


def test_summarize():
    line = summarize({"kind": "train", "step": 3, "time": 1.0, "loss": 1.23456, "lr": 2e-4, "grad_norm": None})
    assert line == "step 3 | loss 1.2346 | lr 2.000e-04 | grad_norm nan/inf"


@pytest.mark.gpu
def test_memory_in_use_on_cuda():
    torch.cuda.reset_peak_memory_stats()
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB
    gib, what = memory_in_use("cuda")
    assert what == "cuda max alloc" and gib >= 0.25
    del block
