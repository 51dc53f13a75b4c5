"""Atomic checkpoints: round trips, weights_only loading, and crashes at every stage of a save."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qlora.train import checkpoint as ckpt_mod
from qlora.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_intact_checkpoint,
    find_latest_checkpoint,
    is_complete,
    list_checkpoints,
    load_checkpoint_state,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)


def _files(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "adapter_model.safetensors": {"a": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)},
        "trainer_state.json": {"step": step, "data_position": {"epoch": 0, "index": step * 16}},
        "extra.pt": {"step": torch.tensor(step), "name": "x", "values": [1.5, (2, 3)]},
    }


def _assert_is_step(path: Path, step: int) -> None:
    state = load_checkpoint_state(path)
    expected = _files(step)
    assert state["trainer_state.json"] == expected["trainer_state.json"]
    for k, v in expected["adapter_model.safetensors"].items():
        assert torch.equal(state["adapter_model.safetensors"][k], v)
    assert int(state["extra.pt"]["step"]) == step and state["extra.pt"]["values"] == [1.5, (2, 3)]


def test_round_trip_and_layout(tmp_path):
    path = save_checkpoint(tmp_path, 123, _files(123))
    assert path == tmp_path / "checkpoints" / "step-000123"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000123\n"
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert manifest["step"] == 123
    entry = manifest["files"]["trainer_state.json"]
    assert manifest["format"] == 2 and entry["bytes"] == (path / "trainer_state.json").stat().st_size
    assert entry["sha256"] == hashlib.sha256((path / "trainer_state.json").read_bytes()).hexdigest()
    assert find_latest_checkpoint(tmp_path) == path
    _assert_is_step(path, 123)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000123"]


def test_callable_writers_may_write_directories_and_selective_loading(tmp_path):
    def write_adapter(dest: Path) -> None:
        dest.mkdir()
        (dest / "adapter_config.json").write_text('{"r": 8}')
        (dest / "adapter_model.safetensors").write_bytes(b"\0" * 10)

    path = save_checkpoint(tmp_path, 5, {"adapter": write_adapter, "notes.txt": "hello"})
    manifest = verify_checkpoint(path)
    assert set(manifest["files"]) == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "notes.txt"}
    state = load_checkpoint_state(path, ["adapter", "adapter/adapter_config.json", "notes.txt"])
    assert state["adapter"] == path / "adapter" and state["adapter/adapter_config.json"] == {"r": 8}
    assert state["notes.txt"] == path / "notes.txt"
    with pytest.raises(CheckpointError, match=r"has no 'optimizer.pt'; it holds: adapter/adapter_config.json"):
        load_checkpoint_state(path, ["optimizer.pt"])


def test_optimizer_and_rng_state_resume_exactly(tmp_path):
    def model_and_opt():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train(model, opt, steps):
        for _ in range(steps):
            x = torch.randn(16, 4)  # draws from the global CPU generator, as dropout does
            loss = model(x).pow(2).mean() + random.random() * 0  # and python's random, to be restored
            opt.zero_grad()
            loss.backward()
            opt.step()

    torch.manual_seed(1)
    random.seed(1)
    model, opt = model_and_opt()
    torch.manual_seed(1)
    train(model, opt, 6)
    reference = [p.detach().clone() for p in model.parameters()]

    model, opt = model_and_opt()
    torch.manual_seed(1)
    random.seed(1)
    train(model, opt, 3)
    save_checkpoint(
        tmp_path,
        3,
        {
            "model.safetensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer.pt": opt.state_dict(),
            "rng.pt": capture_rng_state(),
        },
    )
    train(model, opt, 1)  # the state moves on; a resume must undo this

    model, opt = model_and_opt()
    state = load_checkpoint_state(find_latest_checkpoint(tmp_path))
    model.load_state_dict(state["model.safetensors"])
    opt.load_state_dict(state["optimizer.pt"])
    restore_rng_state(state["rng.pt"])
    train(model, opt, 3)
    for p, r in zip(model.parameters(), reference, strict=True):
        assert torch.equal(p, r)


def test_rng_state_round_trip_covers_python_gauss_and_torch():
    random.seed(3)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached second normal in python's state (gauss_next)
    state = capture_rng_state()
    first = (random.gauss(0, 1), random.random(), torch.rand(3))
    restore_rng_state(state)
    again = (random.gauss(0, 1), random.random(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    third = (random.gauss(0, 1), random.random(), torch.rand(3))  # negative control: not restored
    assert third[:2] != first[:2] and not torch.equal(third[2], first[2])
    with pytest.raises(CheckpointError, match="not made by capture_rng_state"):
        restore_rng_state({"torch_cpu": state["torch_cpu"]})


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pt_files_are_loaded_weights_only(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"evil.pt": {"payload": _Evil()}})
    with pytest.raises(CheckpointError, match=r"cannot load .*evil.pt.*Weights only load failed"):
        load_checkpoint_state(path)


def test_a_writer_that_raises_leaves_the_previous_checkpoint_newest(tmp_path):
    good = save_checkpoint(tmp_path, 10, _files(10))

    def boom(dest: Path) -> None:
        dest.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 20, {**_files(20), "optimizer.pt": boom})
    assert find_latest_checkpoint(tmp_path) == good
    _assert_is_step(good, 10)
    assert not (tmp_path / "checkpoints" / "step-000020").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_a_failed_commit_rename_leaves_the_previous_checkpoint_newest(tmp_path, monkeypatch):
    good = save_checkpoint(tmp_path, 10, _files(10))

    def failing_rename(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(ckpt_mod.os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(tmp_path, 20, _files(20))
    monkeypatch.undo()
    assert find_latest_checkpoint(tmp_path) == good
    _assert_is_step(good, 10)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000010\n"


def test_a_failed_pointer_update_after_the_commit_still_finds_the_new_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 10, _files(10))

    def failing_replace(src, dst):
        raise OSError("replace failed")

    monkeypatch.setattr(ckpt_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="replace failed"):
        save_checkpoint(tmp_path, 20, _files(20))
    monkeypatch.undo()
    # The directory rename is the commit point: step 20 is complete, so it is the newest.
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000010\n"
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000020"
    _assert_is_step(find_latest_checkpoint(tmp_path), 20)


def test_a_killed_process_mid_save_leaves_the_previous_checkpoint_newest(tmp_path):
    good = save_checkpoint(tmp_path, 10, _files(10))
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from qlora.train.checkpoint import save_checkpoint

        def die(dest: Path) -> None:
            dest.write_bytes(b"half")
            os._exit(9)  # no cleanup, no finally: as a SIGKILL or a power cut

        save_checkpoint(Path({str(tmp_path)!r}), 20, {{"a.json": {{"x": 1}}, "b.bin": die}})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1  # the crash really happened mid-save
    assert find_latest_checkpoint(tmp_path) == good
    _assert_is_step(good, 10)
    save_checkpoint(tmp_path, 30, _files(30))  # the next save sweeps the leftover away
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_truncated_or_unmarked_directories_are_skipped(tmp_path):
    good = save_checkpoint(tmp_path, 10, _files(10))
    bad = save_checkpoint(tmp_path, 20, _files(20))
    with (bad / "adapter_model.safetensors").open("r+b") as f:
        f.truncate(16)
    assert not is_complete(bad)
    assert find_latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match=r"step-000020 is incomplete: adapter_model.safetensors has 16 bytes"):
        load_checkpoint_state(bad)
    unmarked = tmp_path / "checkpoints" / "step-000030"
    unmarked.mkdir()
    (unmarked / "optimizer.pt").write_bytes(b"x")
    assert find_latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match="MANIFEST.json is missing"):
        verify_checkpoint(unmarked)


def test_no_checkpoint_yet(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    assert find_latest_checkpoint(tmp_path) is None


def test_steps_sort_numerically(tmp_path):
    save_checkpoint(tmp_path, 1_000_000, _files(1))
    save_checkpoint(tmp_path, 999_999, _files(2))
    assert find_latest_checkpoint(tmp_path).name == "step-1000000"


def test_keep_last_prunes_the_oldest(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 10, _files(step * 10), keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [40, 50]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000040", "step-000050"]
    _assert_is_step(find_latest_checkpoint(tmp_path), 50)


def test_resaving_a_step_replaces_it(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 10, _files(10))
    path = save_checkpoint(tmp_path, 10, _files(11))
    assert load_checkpoint_state(path)["trainer_state.json"]["step"] == 11
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000010"]

    # The commit fails after the old copy was moved aside: the old copy is put back.
    real_rename = os.rename
    calls = []

    def second_rename_fails(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "rename", second_rename_fails)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 10, _files(12))
    monkeypatch.undo()
    assert calls[0].startswith(".old-step-000010") and calls[1] == "step-000010"
    assert load_checkpoint_state(find_latest_checkpoint(tmp_path))["trainer_state.json"]["step"] == 11


def test_an_old_copy_left_by_a_crash_is_still_found(tmp_path):
    path = save_checkpoint(tmp_path, 10, _files(10))
    os.rename(path, path.with_name(".old-step-000010-deadbeef"))  # as a crash between move and commit
    found = find_latest_checkpoint(tmp_path)
    assert found is not None and found.name == ".old-step-000010-deadbeef"
    _assert_is_step(found, 10)


@pytest.mark.parametrize("name", ["../escape.json", "/abs.json", "MANIFEST.json", ""])
def test_bad_file_names(tmp_path, name):
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path, 1, {name: {"x": 1}})
    assert find_latest_checkpoint(tmp_path) is None


def test_unknown_value_type_says_what_to_use(tmp_path):
    with pytest.raises(CheckpointError, match=r"don't know how to write 'x.bin' \(dict\)"):
        save_checkpoint(tmp_path, 1, {"x.bin": {"a": 1}})


@pytest.mark.gpu
def test_cuda_rng_state_round_trip(tmp_path):
    torch.cuda.manual_seed_all(5)
    path = save_checkpoint(tmp_path, 1, {"rng.pt": capture_rng_state()})
    first = torch.rand(4, device="cuda")
    restore_rng_state(load_checkpoint_state(path)["rng.pt"])
    assert torch.equal(torch.rand(4, device="cuda"), first)
    assert not torch.equal(torch.rand(4, device="cuda"), first)  # negative control: the stream moved on


# --- damage after the save: hashes, fallback, set-aside, pruning ------------------------------------------


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "trainer_state.json", "extra.pt"])
def test_a_flipped_byte_in_any_file_is_found_and_the_previous_checkpoint_used(tmp_path, name):
    good = save_checkpoint(tmp_path, 10, _files(10))
    damaged = save_checkpoint(tmp_path, 20, _files(20))
    _flip_byte(damaged / name, 7)
    assert is_complete(damaged)  # the sizes still match: only the hashes can tell
    found, skipped = find_intact_checkpoint(tmp_path)
    assert found == good
    assert [p for p, _ in skipped] == [damaged]
    assert f"{name} does not match its SHA-256" in skipped[0][1]
    with pytest.raises(CheckpointError, match="is damaged"):
        verify_checkpoint(damaged, hashes=True)


def test_a_damaged_manifest_is_skipped_with_its_reason(tmp_path):
    good = save_checkpoint(tmp_path, 10, _files(10))
    damaged = save_checkpoint(tmp_path, 20, _files(20))
    (damaged / "MANIFEST.json").write_text('{"format": 2, "step": 20, "files": {"../../etc/passwd": {}}}')
    found, skipped = find_intact_checkpoint(tmp_path)
    assert found == good and "is not a path inside the checkpoint" in skipped[0][1]
    (damaged / "MANIFEST.json").write_bytes(b"\xff\xfe{not json")
    found, skipped = find_intact_checkpoint(tmp_path)
    assert found == good and "unreadable" in skipped[0][1]


def test_nothing_intact_says_so(tmp_path):
    only = save_checkpoint(tmp_path, 10, _files(10))
    _flip_byte(only / "extra.pt", 100)
    assert find_intact_checkpoint(tmp_path) == (None, [(only, find_intact_checkpoint(tmp_path)[1][0][1])])


def test_format_1_manifests_are_still_read(tmp_path):
    path = save_checkpoint(tmp_path, 10, _files(10))
    manifest = json.loads((path / "MANIFEST.json").read_text())
    old = {"format": 1, "step": 10, "files": {k: v["bytes"] for k, v in manifest["files"].items()}}
    (path / "MANIFEST.json").write_text(json.dumps(old))
    assert find_intact_checkpoint(tmp_path) == (path, [])
    _assert_is_step(path, 10)


def test_set_aside_hides_a_damaged_checkpoint_from_resume_and_pruning(tmp_path):
    save_checkpoint(tmp_path, 10, _files(10))
    damaged = save_checkpoint(tmp_path, 20, _files(20))
    moved = ckpt_mod.set_aside(damaged)
    assert moved.name.startswith(".damaged-step-000020-") and moved.is_dir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10]


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    # A resume fell back from a damaged step 30 to step 10; the next save (step 11) must survive keep_last=1.
    save_checkpoint(tmp_path, 10, _files(10))
    damaged = save_checkpoint(tmp_path, 30, _files(30))
    _flip_byte(damaged / "extra.pt", 50)
    new = save_checkpoint(tmp_path, 11, _files(11), keep_last=1)
    assert new.is_dir() and find_intact_checkpoint(tmp_path)[0] == new


def test_every_truncation_and_byte_flip_of_a_checkpoint_is_caught(tmp_path):
    """A fuzz over the checkpoint reader: each damaged copy is skipped with a CheckpointError, never loaded."""
    rng = random.Random(0)
    src = save_checkpoint(tmp_path / "src", 5, _files(5))
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for case in range(60):
        root = tmp_path / f"case{case}"
        copy = root / "checkpoints" / src.name
        copy.parent.mkdir(parents=True)
        shutil.copytree(src, copy)
        victim = copy / rng.choice(files).relative_to(src)
        data = bytearray(victim.read_bytes())
        if case % 2:
            data = data[: rng.randrange(len(data))]
        else:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        victim.write_bytes(bytes(data))
        found, skipped = find_intact_checkpoint(root)
        assert found is None and len(skipped) == 1, (case, victim.name)
        with pytest.raises(CheckpointError):
            verify_checkpoint(copy, hashes=True)
            load_checkpoint_state(copy)


# --- the disk refuses: full, read-only ------------------------------------------------------------------------

_NAMESPACE = ["unshare", "--user", "--map-root-user", "--mount"]


def _namespaces_work() -> bool:
    try:
        return subprocess.run([*_NAMESPACE, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_namespaces = pytest.mark.skipif(not _namespaces_work(),
                                      reason="needs `unshare --user --mount` to mount a small tmpfs")  # fmt: skip


def _run_in_namespace(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    """Run `body` (Python) with a 256 KiB tmpfs mounted at tmp_path/out, in a private mount namespace."""
    script = textwrap.dedent(
        f"""
        import json, subprocess, sys, torch
        from pathlib import Path
        from qlora.train.checkpoint import (CheckpointError, find_intact_checkpoint, find_latest_checkpoint,
                                            save_checkpoint)
        out = Path({str(tmp_path / "out")!r})
        out.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(out)], check=True)
        """
    ) + textwrap.dedent(body)
    return subprocess.run([*_NAMESPACE, sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})  # fmt: skip


@needs_namespaces
def test_a_full_disk_names_the_path_and_the_bytes_and_keeps_the_previous_checkpoint(tmp_path):
    result = _run_in_namespace(tmp_path, """
        good = save_checkpoint(out, 1, {"small.safetensors": {"w": torch.zeros(1000)}})
        big = {"big.safetensors": {"w": torch.zeros(1_000_000)}}  # 4 MB on a 256 KiB disk
        try:
            save_checkpoint(out, 2, big, size_hint=4_000_000)
        except CheckpointError as e:
            print(json.dumps({"message": str(e), "intact": str(find_intact_checkpoint(out)[0]),
                              "entries": sorted(p.name for p in (out / "checkpoints").iterdir())}))
        else:
            sys.exit("no error")
    """)
    assert result.returncode == 0, result.stderr + result.stdout
    seen = json.loads(result.stdout.splitlines()[-1])
    assert "cannot save checkpoint step-000002" in seen["message"]
    assert "No space left on device" in seen["message"] and "needs about 3.81 MiB" in seen["message"]
    assert "step-000001 is intact" in seen["message"]
    assert seen["intact"].endswith("step-000001")
    assert seen["entries"] == ["latest", "step-000001"]  # no temporary directory left behind


@needs_namespaces
def test_a_read_only_output_is_a_clear_error(tmp_path):
    result = _run_in_namespace(tmp_path, """
        save_checkpoint(out, 1, {"a.json": {"x": 1}})
        subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True)
        try:
            save_checkpoint(out, 2, {"a.json": {"x": 2}})
        except CheckpointError as e:
            print(json.dumps({"message": str(e), "latest": str(find_latest_checkpoint(out))}))
        else:
            sys.exit("no error")
    """)
    assert result.returncode == 0, result.stderr + result.stdout
    seen = json.loads(result.stdout.splitlines()[-1])
    assert "Read-only file system" in seen["message"] and "step-000001 is intact" in seen["message"]
    assert seen["latest"].endswith("step-000001")


def test_tidy_finishes_what_a_killed_save_left_after_its_commit(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, _files(step))
    ckpts = tmp_path / "checkpoints"
    (ckpts / "latest").write_text("step-000002\n")  # killed before the pointer moved
    (ckpts / ".tmp-latest-999").write_text("step-000003\n")  # ... or while writing it
    (ckpts / ".del-step-000001-abcd1234").mkdir()  # ... or while pruning
    shutil.copytree(ckpts / "step-000003", ckpts / ".old-step-000003-deadbeef")  # ... or after a re-save's commit
    ckpt_mod.tidy_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000002", "step-000003"]
    assert (ckpts / "latest").read_text() == "step-000003\n"
