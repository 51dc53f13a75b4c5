"""Seeded fuzzing of every reader of a user's file: cut and byte-changed copies of real files.

Real files, each read the whole way a command reads it: a safetensors model directory (config.json +
model.safetensors) through `load_model`, the same model as a GGUF file through `read_gguf` and `load_model`,
a PEFT adapter written by `write_adapter` through `read_adapter_config`, `read_adapter` and
`load_adapter_weights`, Alpaca data as JSON, JSON Lines and CSV through `read_any` and `validate_alpaca`.
Each damaged copy must either read (a changed byte inside a weight is still a weight) or raise one of the
project's error types (`hostile_inputs.PROJECT_ERRORS`) with a message naming the file. Each case runs
under a generous alarm (a hang fails, it is not a speed test) and the whole run under an address-space cap
of the current size + 2 GiB, so an allocation sized by a lying count or length fails inside the reader
(as an error of the wrong type) instead of quietly reserving memory the files cannot account for.

Mutations (`mutations`): a third are cuts at a random length, the rest change 1-4 bytes (a bit flip or a
random byte), half of those within the header where the counts, lengths and offsets live. 200 cases per
reader here; `test_fuzz_many` (slow) runs 1,000 per reader and the stories260K directory from ../shared.
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hostile_inputs import (
    PROJECT_ERRORS,
    address_space_limit,
    assert_project_error,
    time_limit,
    write_adapter_dir,
    write_data,
    write_gguf,
    write_model_dir,
)

import qlora
from qlora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter_weights, read_adapter, read_adapter_config
from qlora.checkpoint_io import read_gguf
from qlora.data import read_any, validate_alpaca

REPO_ROOT = Path(__file__).resolve().parents[1]
STORIES = REPO_ROOT.parent / "shared" / "models" / "stories260K"
CASES = 200
HEADROOM = 2 << 30  # address space a case may add: far above what reading these small files needs


def mutations(data: bytes, count: int, seed: int, header: int) -> Iterator[tuple[str, bytes]]:
    """`count` damaged copies of `data` with a description of each (see the module docstring)."""
    rng = random.Random(seed)
    for i in range(count):
        if i % 3 == 0:
            cut = rng.randrange(len(data))
            yield f"cut to {cut} bytes", data[:cut]
            continue
        damaged = bytearray(data)
        span = min(header, len(data)) if i % 3 == 1 else len(data)
        changed = []
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(span)
            damaged[at] = damaged[at] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
            changed.append(at)
        yield f"bytes {changed} changed", bytes(damaged)


def load(path, lora=None):
    return qlora.load_model(path, None, compute_dtype=torch.float32, device="cpu", lora=lora)


def fuzz(targets: list[tuple[Path, int]], named: Path, read: Callable[[], object], count: int, seed: int) -> int:
    """Damage each of `targets` (file, header length) in turn, `count` cases in all, and `read()` each; return
    how many cases raised. Every failure must be a project error naming `named`."""
    originals = {file: file.read_bytes() for file, _ in targets}
    failures = 0
    with address_space_limit(HEADROOM):
        for number, (file, header) in enumerate(targets):
            share = count // len(targets) + (number < count % len(targets))
            for case, data in mutations(originals[file], share, seed + number, header):
                file.write_bytes(data)
                try:
                    with time_limit(30):
                        read()
                except Exception as e:  # noqa: BLE001 - the assertion is what it may be
                    assert_project_error(e, named, f"{file.name} {case}")
                    failures += 1
            file.write_bytes(originals[file])
    return failures


def safetensors_header(file: Path) -> int:
    return 8 + struct.unpack_from("<Q", file.read_bytes())[0]


def fuzz_model_dir(root: Path, count: int, seed: int) -> int:
    weights = root / "model.safetensors"
    # two shares of the cases for the weights (each with its own seed), one for config.json
    targets = [(weights, safetensors_header(weights)), (weights, safetensors_header(weights)),
               (root / "config.json", 1 << 20)]  # fmt: skip
    return fuzz(targets, root, lambda: load(root), count, seed)


def fuzz_gguf(path: Path, count: int, seed: int) -> int:
    gguf = pytest.importorskip("gguf", reason="the gguf package writes the GGUF file")
    header = gguf.GGUFReader(path).data_offset

    def read():
        checkpoint = read_gguf(path)
        for _ in checkpoint.iter_tensors():
            pass
        load(path)

    return fuzz([(path, header)], path, read, count, seed)


def fuzz_adapter(base: Path, directory: Path, count: int, seed: int) -> int:
    weights = directory / ADAPTER_WEIGHTS

    def read():
        read_adapter(directory)
        model = load(base, read_adapter_config(directory))
        load_adapter_weights(model, directory)

    targets = [(weights, safetensors_header(weights)), (directory / ADAPTER_CONFIG, 1 << 20)]
    return fuzz(targets, directory, read, count, seed)


def fuzz_data(path: Path, count: int, seed: int) -> int:
    return fuzz([(path, 1 << 20)], path, lambda: [validate_alpaca(r) for r in read_any(path)], count, seed)


# ------------------------------------------------------------------------------------------------- tests


def test_the_guards_can_fail():
    """Negative controls: the address-space cap stops a lying allocation, and the alarm stops a hang."""
    with address_space_limit(HEADROOM) as capped:
        if capped:
            with pytest.raises(RuntimeError, match="can't allocate memory"):
                torch.empty(1 << 36, dtype=torch.uint8)
    with pytest.raises(Exception, match="still running after 1 s"), time_limit(1):
        while True:
            pass
    with pytest.raises(AssertionError, match="KeyError escaped"):
        assert_project_error(KeyError("x"), Path("f"))
    with pytest.raises(AssertionError, match="does not name"):
        assert_project_error(PROJECT_ERRORS[0]("other.bin: bad"), Path("/data/this.bin"))


def test_fuzz_safetensors_directory(tmp_path):
    failures = fuzz_model_dir(write_model_dir(tmp_path / "m"), CASES, seed=1)
    assert failures > CASES // 3  # the cuts alone fail: the fuzzing reached the readers


def test_fuzz_gguf(tmp_path):
    pytest.importorskip("gguf", reason="the gguf package writes the GGUF file")
    assert fuzz_gguf(write_gguf(tmp_path / "m.gguf"), CASES, seed=2) > CASES // 3


def test_fuzz_adapter(tmp_path):
    base = write_model_dir(tmp_path / "base")
    assert fuzz_adapter(base, write_adapter_dir(tmp_path / "a"), CASES, seed=3) > CASES // 3


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_fuzz_data(tmp_path, suffix):
    # cuts of a CSV or JSON Lines file at a record boundary read fine: fewer failures than the other kinds
    assert fuzz_data(write_data(tmp_path / f"d{suffix}"), CASES, seed=4) > CASES // 10


@pytest.mark.slow
def test_fuzz_many(tmp_path):
    count = 5 * CASES
    assert fuzz_model_dir(write_model_dir(tmp_path / "m"), count, seed=11) > count // 3
    if STORIES.is_dir():
        stories = tmp_path / "stories"
        stories.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(STORIES / name, stories / name)
        assert fuzz_model_dir(stories, count, seed=12) > count // 3
    if importlib.util.find_spec("gguf") is not None:
        assert fuzz_gguf(write_gguf(tmp_path / "m.gguf"), count, seed=13) > count // 3
    base = write_model_dir(tmp_path / "base")
    assert fuzz_adapter(base, write_adapter_dir(tmp_path / "a"), count, seed=14) > count // 3
    for suffix in (".json", ".jsonl", ".csv", ".tsv"):
        assert fuzz_data(write_data(tmp_path / f"d{suffix}"), count, seed=15) > count // 10
