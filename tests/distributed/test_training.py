"""Many processes on the CPU (gloo), started by torchrun from the tests: DDP and FSDP2 follow the one-process
run with the same global batch, checkpoints move between world sizes, and a dead or hung rank ends the job.

The runs train stories260K on the Alpaca sample (tests/train/train_fixtures.py) for 4 steps with a global
batch of 8 (micro-batch 2; 4, 2 and 1 accumulation steps on 1, 2 and 4 processes), dropout 0.1 on: the
dropout masks are seeded by each micro-batch's place in the global step, so the runs agree to float
reduction order. Tolerance: losses and gradient norms rel 1e-5 (seen: about 1e-7); adapter weights rel 1e-4,
abs 1e-5, i.e. 1% of one step at lr 1e-3 (seen: 1.2e-6; Adam's normalised update turns a float-level
difference in a near-zero gradient into a visible one).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_fixtures import ALPACA, STORIES, tiny_config  # noqa: E402

from qlora.train.metrics import read_metrics  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not (STORIES.exists() and ALPACA.exists()), reason=f"needs {STORIES} and {ALPACA}"),
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="needs torch.distributed with gloo"),  # fmt: skip
]

WORKER = Path(__file__).with_name("worker.py")
REPO = Path(__file__).resolve().parents[2]
STEPS = 4


def write_config(output: Path, mode: str = "auto", *, max_steps: int = STEPS, resume: bool = False,
                 timeout_s: float = 120.0, save_every: int = 2, device: str = "cpu") -> Path:  # fmt: skip
    cfg = tiny_config(output, max_steps=max_steps, micro_batch_size=2, global_batch_size=8, save_every=save_every,
                      resume=resume)  # fmt: skip
    cfg.parallel.mode, cfg.parallel.timeout_s, cfg.device = mode, timeout_s, device
    path = output.parent / f"{output.name}-{max_steps}{'-resume' if resume else ''}.yaml"
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    return path


def launch(processes: int, *args: str, timeout: float = 300, restarts: int = 0) -> subprocess.CompletedProcess:
    """torchrun --standalone with `processes` workers (one thread each: 2 cores), or one plain process."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    if processes == 0:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               f"--max-restarts={restarts}", *args]  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def train_worker(processes: int, config: Path, *extra: str) -> None:
    done = launch(processes, str(WORKER), str(config), *extra)
    assert done.returncode == 0, done.stderr[-4000:]


def records(output: Path) -> list[dict]:
    return [r for r in read_metrics(output / "metrics.jsonl") if r["kind"] == "train"]


def assert_same_run(output: Path, reference: Path) -> None:
    ours, theirs = records(output), records(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "target_tokens"):
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in theirs], rel=1e-5), key
    a, b = load_file(output / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: the same global batch on one process (4 accumulation steps)."""
    output = tmp_path_factory.mktemp("one") / "run"
    train_worker(0, write_config(output))
    return output


@pytest.mark.slow
@pytest.mark.parametrize("mode,processes", [("ddp", 2), ("ddp", 4), ("fsdp", 2), ("fsdp", 4)])
def test_many_processes_follow_one(tmp_path, one_process, mode, processes):
    output = tmp_path / "run"
    train_worker(processes, write_config(output, mode))
    assert_same_run(output, one_process)
    assert len(records(output)) == STEPS  # one writer: rank 0


@pytest.mark.slow
def test_wrong_gradient_reduction_is_caught(tmp_path, one_process):
    """Negative control: the mean over 2 ranks left uncompensated halves every gradient; the comparison fails."""
    output = tmp_path / "run"
    train_worker(2, write_config(output, "fsdp"), "--wrong-reduction")
    with pytest.raises(AssertionError):
        assert_same_run(output, one_process)
    ours, theirs = records(output), records(one_process)
    assert ours[0]["grad_norm"] == pytest.approx(theirs[0]["grad_norm"] / 2, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("first,then,mode", [(2, 0, "fsdp"), (2, 4, "ddp"), (0, 2, "fsdp")])
def test_resume_on_another_world_size(tmp_path, one_process, first, then, mode):
    """Save at step 2 on `first` processes (0: one plain process), resume on `then`: equals the uninterrupted run."""
    output = tmp_path / "run"
    train_worker(first, write_config(output, mode, max_steps=2))
    train_worker(then, write_config(output, mode, resume=True))
    assert_same_run(output, one_process)


@pytest.mark.slow
def test_fsdp_shards_the_4bit_base(tmp_path):
    """Each of 2 ranks holds its half of the packed codes and scales (FSDP pads each tensor to a multiple of 2
    rows, so at most a row more); together exactly the unsharded bytes."""
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    launch_report = ("--report-shards",)
    train_worker(0, write_config(tmp_path / "one", "auto", max_steps=2), *launch_report, str(whole))
    train_worker(2, write_config(tmp_path / "two", "fsdp", max_steps=2), *launch_report, str(halves))
    total = json.loads((whole / "rank-0.json").read_text())
    ranks = [json.loads((halves / f"rank-{r}.json").read_text()) for r in range(2)]
    assert sum(r["base"] for r in ranks) == total["base"]
    assert sum(r["adapter"] for r in ranks) == total["adapter"]
    for r in ranks:
        assert abs(r["base"] - total["base"] / 2) <= total["base"] * 0.05, (r, total)


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_the_checkpoint_survives(tmp_path):
    output = tmp_path / "run"
    config = write_config(output, "ddp")
    done = launch(2, str(WORKER), str(config), "--die-at-step", "3", "--rank", "1", timeout=240)
    assert done.returncode != 0
    assert "rank" in done.stderr and "exitcode" in done.stderr and ": 3" in done.stderr, done.stderr[-3000:]
    from qlora.train.checkpoint import find_latest_checkpoint, verify_checkpoint

    latest = find_latest_checkpoint(output)
    assert latest is not None and latest.name == "step-000002"
    verify_checkpoint(latest)
    train_worker(2, write_config(output, "ddp", resume=True))  # torchrun --max-restarts does this by itself
    assert [r["step"] for r in records(output)] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_torchrun_restarts_resume_from_the_last_checkpoint(tmp_path, one_process):
    """`torchrun --max-restarts 1 ... --resume`: the first attempt starts at step 0 (no checkpoint yet), rank 1 dies
    after step 3, torchrun restarts both, they resume at step 2: the run equals the uninterrupted one."""
    output = tmp_path / "run"
    config = write_config(output, "fsdp", resume=True)
    done = launch(2, str(WORKER), str(config), "--die-at-step", "3", "--rank", "1", restarts=1, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exitcode: 3" in done.stderr, done.stderr[-3000:]  # the first attempt did fail (and the job still passed)
    assert_same_run(output, one_process)


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_within_the_timeout(tmp_path):
    output = tmp_path / "run"
    config = write_config(output, "ddp", timeout_s=20)
    started = time.monotonic()
    done = launch(2, str(WORKER), str(config), "--hang-at-step", "2", "--rank", "1", timeout=400)
    elapsed = time.monotonic() - started
    assert done.returncode != 0, done.stderr[-3000:]
    assert elapsed < 200, elapsed
    assert "rank" in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_a_sigterm_on_one_rank_stops_every_rank_after_the_same_step(tmp_path, one_process):
    """SIGTERM reaches rank 1 only, during step 1: both ranks stop after step 1, the job saves that step's
    checkpoint and exits 0; a resume on 2 processes then equals the uninterrupted run."""
    output = tmp_path / "run"
    done = launch(2, str(WORKER), str(write_config(output, "ddp", save_every=0)), "--signal-at-step", "1",
                  "--rank", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stopped by a stop signal on another rank after step 1" in done.stderr, done.stderr[-3000:]
    from qlora.train.checkpoint import list_checkpoints

    assert [step for step, _ in list_checkpoints(output)] == [1]
    train_worker(2, write_config(output, "ddp", resume=True, save_every=0))
    assert_same_run(output, one_process)


@pytest.mark.slow
def test_a_sigterm_to_torchrun_reaches_the_ranks_and_they_save_before_it_gives_up(tmp_path):
    """What a cluster does: SIGTERM to torchrun, which forwards it to every worker and waits (30 s) before
    SIGKILL. The workers finish their step and save; torchrun itself reports the signal (non-zero exit)."""
    output = tmp_path / "run"
    config = write_config(output, "ddp", max_steps=400, save_every=0)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            str(WORKER), str(config)], env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path},
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (output / "metrics.jsonl").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    while not records(output) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=240)
    assert "stopped by SIGTERM after step" in err, err[-3000:]
    from qlora.train.checkpoint import find_intact_checkpoint

    latest, skipped = find_intact_checkpoint(output)
    assert latest is not None and not skipped
    assert int(latest.name.split("-")[1]) == max(r["step"] for r in records(output))


@pytest.mark.slow
def test_a_nan_on_one_rank_is_skipped_by_all_and_stops_the_job(tmp_path):
    """Rank 1's forward turns NaN from step 2: the reduced gradient norm is NaN on every rank, so every rank skips
    steps 2-4 alike, and the third in a row stops the job with one message from rank 0."""
    output = tmp_path / "run"
    config = write_config(output, "fsdp", max_steps=6, save_every=1)
    done = launch(2, str(WORKER), str(config), "--poison-from-step", "2", "--rank", "1")
    assert done.returncode != 0
    assert done.stderr.count("NonFiniteError: 3 steps in a row") >= 1, done.stderr[-3000:]
    assert "(steps 2-4;" in done.stderr and "Last good checkpoint: " in done.stderr, done.stderr[-3000:]
    assert [r.get("skipped") for r in records(output)] == [None, True, True, True]


@pytest.mark.slow
def test_qlora_train_under_torchrun(tmp_path):
    """The product as users run it: `torchrun -m qlora train --config ... --parallel ddp`."""
    output = tmp_path / "run"
    config = write_config(output, "auto", max_steps=2)
    done = launch(2, "-m", "qlora", "train", "--config", str(config), "--parallel", "ddp")
    assert done.returncode == 0, done.stderr[-4000:]
    assert (output / "adapter_model.safetensors").is_file()
    assert [r["step"] for r in records(output)] == [1, 2]
    assert done.stderr.count("parallel: ddp") == 1, done.stderr[-3000:]  # rank 0 alone logs


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_nccl_world_of_one_follows_one_process(tmp_path, mode):
    """On one GPU: torchrun with NCCL at world size 1 (DDP's reducer, FSDP2's gathers of the 4-bit base, the
    Triton kernels) against the plain single-process run on the same GPU (float32 compute; CUDA graphs off
    on both sides, as they are under DDP and FSDP)."""
    plain, launched = tmp_path / "plain", tmp_path / "launched"
    train_worker(0, write_config(plain, "auto", device="cuda"), "--no-cuda-graphs")
    train_worker(1, write_config(launched, mode, device="cuda"))
    assert_same_run(launched, plain)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_tiny_random_llama_follows_one_process(tmp_path, mode):
    """The same on another model: a random Llama directory (bench/random_checkpoint.py's tiny shape: 2 layers,
    hidden 128, its own BPE tokenizer trained on the Alpaca sample)."""
    from bench.random_checkpoint import write_checkpoint

    model = tmp_path / "model"
    write_checkpoint(model, "tiny", ALPACA, torch.device("cpu"))
    runs = {}
    for name, processes, parallel in (("one", 0, "auto"), ("many", 2, mode)):
        output = tmp_path / name
        cfg = tiny_config(output, max_steps=STEPS, micro_batch_size=2, global_batch_size=8)
        cfg.model.path, cfg.parallel.mode = str(model), parallel
        config = tmp_path / f"{name}.yaml"
        config.write_text(cfg.to_yaml(), encoding="utf-8")
        train_worker(processes, config)
        runs[name] = output
    assert_same_run(runs["many"], runs["one"])
