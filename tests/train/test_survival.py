"""Runs that survive: stop signals, damaged checkpoints, non-finite steps, full disks and out-of-memory, each
with its expected message and state (CPU, stories260K)."""

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import ALPACA, STORIES, tiny_config

from qlora.cli import main as cli_main
from qlora.data.collate import epoch_order
from qlora.train import trainer as trainer_module
from qlora.train.checkpoint import CheckpointError, list_checkpoints
from qlora.train.errors import NonFiniteError
from qlora.train.metrics import read_metrics
from qlora.train.step import TrainStep
from qlora.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not (STORIES.exists() and ALPACA.exists()), reason=f"needs {STORIES} and {ALPACA}")
REPO = Path(__file__).resolve().parents[2]


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def _assert_equal_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _cli(tmp_path: Path, name: str, **train) -> tuple[list[str], Path]:
    """`qlora train` arguments for the tiny config (written as a file), and its output directory."""
    output = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(tiny_config(output, **train).to_yaml(), encoding="utf-8")
    return ["train", "--config", str(config)], output


def _child_env() -> dict[str, str]:
    # one thread, so the children's float32 sums are the same as each other's (bit-exact comparisons)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _steps_logged(output: Path) -> int:
    path = output / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((r["step"] for r in read_metrics(path) if r["kind"] == "train"), default=0)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_0_and_the_printed_command_resumes_exactly(tmp_path):
    args, output = _cli(tmp_path, "stopped", max_steps=40, save_every=0)
    child = subprocess.Popen([sys.executable, "-m", "qlora", *args], env=_child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while _steps_logged(output) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    assert "SIGTERM: finishing this optimizer step" in err
    stopped_at = int(out.split("after step ")[1].split()[0])
    assert 2 <= stopped_at < 40, out
    assert [step for step, _ in list_checkpoints(output)] == [stopped_at]
    assert not (output / "adapter_model.safetensors").exists()  # the run is not finished: no final adapter
    command = out.split("to continue: qlora ")[1].strip()
    assert command.endswith("--resume")
    resumed = subprocess.run([sys.executable, "-m", "qlora", *shlex.split(command)], env=_child_env(),
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    straight_args, straight = _cli(tmp_path, "straight", max_steps=40, save_every=0)
    done = subprocess.run([sys.executable, "-m", "qlora", *straight_args], env=_child_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    _assert_equal_tensors(_adapter(output), _adapter(straight))


def test_a_second_signal_exits_at_once_and_the_first_only_asks(tmp_path):
    script = textwrap.dedent("""
        import os, signal, time
        from qlora.train.preemption import StopSignals
        previous = signal.getsignal(signal.SIGINT)
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            assert stop.received == "SIGINT", stop.received
            print("asked", flush=True)
        assert signal.getsignal(signal.SIGINT) is previous  # restored on leaving
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        print("not reached", flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script], env=_child_env(), capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.stdout.split() == ["asked"], result.stderr
    assert result.returncode == 128 + signal.SIGTERM
    assert "SIGTERM again: exiting now" in result.stderr


def _fit_and_snapshot(cfg) -> tuple[Trainer, dict]:
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    return trainer, _adapter(Path(cfg.output))


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumes_exactly(tmp_path, caplog):
    _, straight = _fit_and_snapshot(tiny_config(tmp_path / "straight", max_steps=6))
    split = tmp_path / "split"
    Trainer(tiny_config(split, max_steps=4, save_every=2), progress=False).fit()
    optimizer_file = split / "checkpoints" / "step-000004" / "optimizer.pt"
    data = bytearray(optimizer_file.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit; the size is unchanged
    optimizer_file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="qlora.train"):
        trainer = Trainer(tiny_config(split, max_steps=6, resume=True), progress=False)
        trainer.fit()
    assert "skipping checkpoint step-000004" in caplog.text and "optimizer.pt does not match its SHA-256" in caplog.text
    assert [p.name.split("-")[1] for p in (split / "checkpoints").glob(".damaged-*")] == ["step"]
    _assert_equal_tensors(_adapter(split), straight)


def _poison(trainer: Trainer, bad=lambda ids: torch.ones(ids.shape[0], dtype=torch.bool)) -> None:
    """NaN embeddings for the batch rows `bad(input_ids)` selects (default: all), injected by a forward hook."""
    def hook(module, inputs, output):
        return output.masked_fill(bad(inputs[0])[:, None, None], float("nan"))

    trainer.model.model.embed_tokens.register_forward_hook(hook)


def test_a_nan_batch_is_skipped_counted_and_leaves_the_adapter_untouched(tmp_path, caplog):
    cfg = tiny_config(tmp_path, max_steps=6, micro_batch_size=1, grad_accum=1)
    trainer = Trainer(cfg, progress=False).setup()
    poisoned_step = 3  # one example per step: the third in the seeded order
    holder = trainer.batches.examples[epoch_order(len(trainer.batches.examples), cfg.seed, 0)[poisoned_step - 1]]
    ids = torch.tensor(holder.input_ids)
    _poison(trainer, lambda batch: (batch[:, : len(ids)] == ids).all(dim=1))
    before = {}
    losses = []
    with caplog.at_level(logging.WARNING, logger="qlora.train"):
        while trainer.step_count < 6:
            params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
            stats = trainer.step()
            trainer._count_nonfinite(stats)
            losses.append(stats.loss)
            if stats.nonfinite:
                before = params
                after = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
                _assert_equal_tensors(after, before)
                assert stats.skipped
    assert [i + 1 for i, v in enumerate(losses) if not torch.isfinite(torch.tensor(v))] == [poisoned_step]
    assert before and trainer.nonfinite_total == 1 and trainer.nonfinite_in_a_row == 0
    assert f"lines {holder.line}" in caplog.text and "skipped, no update" in caplog.text
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters() if p.requires_grad)


def test_non_finite_steps_in_a_row_stop_the_run_naming_steps_examples_and_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=10, save_every=1, max_nonfinite_steps=3)
    trainer = Trainer(cfg, progress=False).setup()
    trainer.step()
    trainer.save_checkpoint()
    _poison(trainer)  # every step from here on is non-finite
    trainer.config.train.max_steps = 10
    with pytest.raises(NonFiniteError) as stopped:
        trainer.fit()
    message = str(stopped.value)
    assert "3 steps in a row had a non-finite loss or gradient norm (steps 2-4" in message
    assert f"{ALPACA} lines " in message and "Last good checkpoint: " in message
    assert message.split("Last good checkpoint: ")[1].startswith(str(tmp_path / "checkpoints" / "step-000003"))
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r.get("skipped") for r in records] == [True, True, True]


def test_too_little_free_space_refuses_to_start(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "free_bytes", lambda path: 1000)
    with pytest.raises(CheckpointError, match=r"has 1000 bytes free, but one checkpoint and the adapter need about"):
        Trainer(tiny_config(tmp_path, max_steps=2), progress=False).fit()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_out_of_memory_says_what_was_asked_and_what_would_fit(tmp_path, monkeypatch, capsys):
    def no_memory(self, micro_batches, seeds=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity")

    monkeypatch.setattr(TrainStep, "__call__", no_memory)
    args, _ = _cli(tmp_path, "oom", max_steps=2)
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "qlora train: stopped: out of CPU memory in step 1: an allocation of 2.00 GiB failed" in err
    assert "--train.micro_batch_size 1 (with --train.grad_accum 4 the optimizer step sees the same batch)" in err
    assert "shorter sequences: the longest here has" in err and "Traceback" not in err


def test_a_full_disk_while_logging_is_one_message(tmp_path, monkeypatch, capsys):
    from qlora.train.metrics import MetricsLogger

    def full(self, *a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "full" / "metrics.jsonl"))

    monkeypatch.setattr(MetricsLogger, "log_train", full)
    args, _ = _cli(tmp_path, "full", max_steps=2)
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'full' / 'metrics.jsonl'}: No space left on device" in err


def test_save_every_minutes_saves_on_the_clock(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 50))  # each call to the clock is 50 s later
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: next(clock))
    Trainer(tiny_config(tmp_path, max_steps=4, save_every=0, save_every_minutes=1.5), progress=False).fit()
    saved = [step for step, _ in list_checkpoints(tmp_path)]
    assert saved == [2, 4]  # 100 s after the start at step 2, then the last step
    assert json.loads((tmp_path / "checkpoints" / "step-000002" / "trainer.json").read_text())["step"] == 2


def test_a_signal_during_setup_stops_before_the_first_step(tmp_path, monkeypatch):
    setup = Trainer.setup

    def signalled_setup(self):
        setup(self)
        os.kill(os.getpid(), signal.SIGTERM)  # as a cluster would while the model loads
        time.sleep(0.1)
        return self

    monkeypatch.setattr(Trainer, "setup", signalled_setup)
    result = Trainer(tiny_config(tmp_path, max_steps=3), progress=False).fit()
    assert result.stopped == "SIGTERM" and result.steps == 0 and result.checkpoint is None
    assert list_checkpoints(tmp_path) == [] and not (tmp_path / "metrics.jsonl").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("two") / "run"
    Trainer(tiny_config(output, max_steps=2, save_every=1), progress=False).fit()
    return output


def _checkpoint_files() -> list[str]:
    # every file a trainer checkpoint holds (checked against a real one in the test)
    return ["MANIFEST.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "data.json",
            "optimizer.pt", "rng.pt", "scaler.pt", "scheduler.pt", "trainer.json"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", _checkpoint_files())
def test_a_flipped_byte_in_any_file_of_a_trainer_checkpoint_falls_back_to_the_previous_one(
        tmp_path, two_checkpoints, name, caplog):  # fmt: skip
    import shutil

    newest = two_checkpoints / "checkpoints" / "step-000002"
    assert sorted(p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file()) == _checkpoint_files()
    output = tmp_path / "run"
    shutil.copytree(two_checkpoints, output)
    damaged = output / "checkpoints" / "step-000002" / name
    data = bytearray(damaged.read_bytes())
    data[len(data) // 3] ^= 0x04
    damaged.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="qlora.train"):
        trainer = Trainer(tiny_config(output, max_steps=3, resume=True), progress=False)
        assert trainer.resume() == 1
    assert "skipping checkpoint step-000002" in caplog.text
    assert [p.name for p in (output / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-000001"]
