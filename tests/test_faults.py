"""scripts/faults.py: a training run killed with SIGKILL at chosen moments (inside the forward, the backward, the
optimizer step, the evaluation, and at several points of checkpoint writing) and resumed each time ends bit for
bit where an uninterrupted run ends. The comparison is shown to see a difference (another training seed, one
flipped bit), and the leftovers that a kill during the last checkpoint or the final adapter write leaves today
are pinned as an expected failure until they are cleaned up."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "faults.py"
_spec = importlib.util.spec_from_file_location("faults_script", SCRIPT)
faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults)

needs_assets = pytest.mark.skipif(not (faults.MODEL.exists() and faults.DATA.exists()),
                                  reason=f"needs {faults.MODEL} and {faults.DATA}")  # fmt: skip


def run_faults(tmp_path: Path, *args: str) -> tuple[int, dict, str]:
    out = tmp_path / "faults.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(tmp_path / "work"), "--json", str(out),
                           *args], capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert out.is_file(), f"no summary written (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.returncode, json.loads(out.read_text()), proc.stdout + proc.stderr


def test_the_comparison_sees_every_bit():
    """Tensors are compared as bytes: one flipped bit, -0.0 for 0.0, another dtype; floats by their bits."""
    a = {"w": torch.linspace(-1, 1, 7), "step": 3, "lr": 0.1, "rows": [torch.zeros(2), {"x": 1.5}]}
    same = {"w": torch.linspace(-1, 1, 7), "step": 3, "lr": 0.1, "rows": [torch.zeros(2), {"x": 1.5}]}
    assert faults.diff(a, same, "s", []) == []
    flipped = {**same, "w": same["w"].clone()}
    flipped["w"].view(torch.int32)[3] ^= 1
    assert faults.diff(a, flipped, "s", []) == ["s['w']: tensors differ (1 bytes of 28)"]
    negative_zero = {**same, "rows": [torch.tensor([-0.0, 0.0]), {"x": 1.5}]}
    assert torch.equal(negative_zero["rows"][0], a["rows"][0])  # why torch.equal alone is not enough
    assert faults.diff(a, negative_zero, "s", []) == ["s['rows'][0]: tensors differ (1 bytes of 8)"]
    wider = {**same, "w": same["w"].double()}
    assert faults.diff(a, wider, "s", []) == ["s['w']: torch.float32[7] vs torch.float64[7]"]
    assert faults.diff(a, {**same, "lr": math.nextafter(0.1, 1)}, "s", []) == ["s['lr']: 0.1 vs 0.10000000000000002"]
    assert faults.diff(a, {**same, "step": 4}, "s", []) == ["s['step']: 3 vs 4"]
    assert faults.diff(a, {k: v for k, v in same.items() if k != "lr"}, "s", []) == ["s['lr']: only in the run"]
    assert faults.diff({"x": float("nan")}, {"x": float("nan")}, "s", []) == []


def test_kill_points_are_named_by_where_the_path_lies(tmp_path):
    """The schedule's vocabulary: the region of a path in the run's output directory."""
    inst = faults.Instruments(tmp_path, None, 0, census=False)
    ckpts = tmp_path / "checkpoints"
    tmp = ckpts / ".tmp-step-000003-123-abcd1234"
    assert inst.region(tmp / "optimizer.pt") == "ckpt.tmp"
    assert inst.move_region(tmp, ckpts / "step-000003") == "ckpt.commit"
    assert inst.move_region(ckpts / "step-000001", ckpts / ".del-step-000001-abcd1234") == "ckpt.prune"
    assert inst.move_region(ckpts / "latest.tmp-123", ckpts / "latest") == "ckpt.latest"
    assert inst.region(ckpts / "step-000003" / "rng.pt") == "ckpt.step"
    assert inst.region(ckpts) == "ckpt.dir"
    assert inst.region(tmp_path / ".adapter_model.safetensors.tmp-7") == "adapter"
    assert inst.region(tmp_path / "metrics.jsonl") == "output"
    assert inst.region(tmp_path.parent / "elsewhere.pt") is None
    assert [faults.category(p) for p in ("backward", "rename:after@ckpt.commit", "torch.load:after@ckpt.step",
                                         "save_file:before@adapter", "wall")] == [
        "compute", "checkpoint", "resume", "adapter", "wall"]  # fmt: skip


# One kill per start, counted from that start: step 1's optimizer update; step 1's checkpoint half written (its
# temporary directory left behind); step 1 committed but no `latest` yet; a forward of step 3 (checkpoint 2 was
# written); a backward of step 3; the prune of step 1 renamed away but not deleted; step 4's checkpoint before
# an fsync; the final evaluation. Then a last start that runs to the end.
SCHEDULE = ["optimizer=700", "torch.save:after@ckpt.tmp=2", "rename:after@ckpt.commit=1", "forward=150",
            "backward=60", "rmtree:before@ckpt.prune=1", "fsync:before@ckpt.tmp=5", "eval=3"]  # fmt: skip


@pytest.mark.slow
@needs_assets
def test_a_run_killed_eight_times_ends_bit_for_bit_as_the_uninterrupted_one(tmp_path):
    rc, summary, log = run_faults(tmp_path, "--steps", "6", "--schedule", ",".join(SCHEDULE))
    assert rc == 0 and summary["result"] == "pass", log
    assert summary["kills"] == len(SCHEDULE)
    assert [a.get("point") for a in summary["rounds"][0]["attempts"]] == [k.split("=")[0] for k in SCHEDULE] + [None]
    assert summary["kills_by_category"] == {"checkpoint": 4, "compute": 4}
    assert summary["resumes"] >= 5 and summary["fresh_starts"] == 3  # no checkpoint before the third kill
    # the negative controls: a run with another seed, and one flipped bit of the optimizer state, are reported
    controls = summary["controls"]
    assert controls["train seed 1"]["detected"] and controls["train seed 1"]["differences"] > 100
    assert controls["one optimizer bit flipped"]["differences"] == 1


@pytest.mark.slow
@needs_assets
def test_a_kill_in_the_last_checkpoint_or_the_final_adapter_leaves_nothing_behind(tmp_path):
    schedule = ["open:after@ckpt.latest=1",  # step 1: the pointer's temporary file is written, not yet renamed
                "replace:before@ckpt.latest=5",  # resumed at 1: the 5th save is the last (step 6)
                "save_file:after@adapter=1"]  # resumed at 6: the final adapter's temporary file is written
    rc, summary, log = run_faults(tmp_path, "--steps", "6", "--no-controls", "--schedule", ",".join(schedule))
    assert summary["kills"] == 3, log
    kinds = {f["kind"] for f in summary["failures"]}
    assert not kinds, log  # the state and the directories are the reference's: nothing left behind
    assert rc == 0
