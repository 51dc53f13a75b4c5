"""Atomic, verifiable checkpoint directories: a crash at any moment never leaves a half-written newest
checkpoint, and a checkpoint damaged later is detected and skipped, never loaded.

Layout under the run directory `root`:

    root/checkpoints/step-000123/    one complete checkpoint (what the caller gave, plus MANIFEST.json)
    root/checkpoints/latest          "step-000123\\n": the newest one, for people and scripts

A save (`save_checkpoint`) writes every file into a hidden `checkpoints/.tmp-step-000123-*/`, then
`MANIFEST.json` (format version, step, every file's byte size and SHA-256), fsyncs, and commits with
one `os.rename` to `step-000123`; only then does it repoint `latest` and prune to `keep_last`. A write
that fails (disk full, read-only or vanished output) removes the temporary directory and raises a
`CheckpointError` naming the path, the reason and the bytes needed; the previous checkpoint is untouched.

Finding: `find_latest_checkpoint` trusts the manifests, not the pointer: the highest step whose files
are all present at their recorded sizes (cheap; truncation is what interrupted writes produce).
`find_intact_checkpoint` (what a resume uses) also checks every file's SHA-256, newest first, and says
which checkpoints it skipped and why (a flipped byte, a truncated copy). Format-1 manifests (sizes only)
are still read. Why each crash point is safe: docs/design-notes.md.

What a checkpoint holds is the caller's choice: `files` maps relative names to contents, encoded by
the name's suffix (and decoded the same way by `load_checkpoint_state`):

    callable        called with the destination path; writes a file or a whole directory there
    .json           json.dump of plain data (strict JSON: no NaN)
    .safetensors    safetensors.torch.save_file of a dict of tensors
    .pt             torch.save of tensors, numbers, strings, lists, tuples and dicts only, loaded with
                    `torch.load(weights_only=True)`: no arbitrary unpickling, ever
    bytes / str     written as is (any other suffix)

Single writer: this assumes one process (rank 0) saves into `root`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from qlora.train.errors import TrainingError

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MANIFEST_FILE = "MANIFEST.json"
FORMAT_VERSION = 2  # 2: sizes and SHA-256 of every file; 1 (read, not written): sizes only
READABLE_FORMATS = (1, 2)
_STEP_RE = re.compile(r"^step-(\d+)$")
_OLD_RE = re.compile(r"^\.old-step-(\d+)-")
_HASH_CHUNK = 1 << 20
# errors of the place written to, not of the program: reported with the path and the bytes needed
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOENT,
                   errno.EIO}  # fmt: skip

Writer = Callable[[Path], None]


class CheckpointError(TrainingError):
    """A checkpoint could not be written, or one on disk is incomplete, damaged or unreadable."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(
    root: str | Path, step: int, files: Mapping[str, Any], *, keep_last: int | None = None,
    size_hint: int | None = None,
) -> Path:
    """Write `files` as the checkpoint of `step` under `root/checkpoints/`, atomically; return its path.

    `size_hint`: the bytes the checkpoint will take, for the message when the disk cannot hold it."""
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint step must be a non-negative integer, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise CheckpointError(f"keep_last must be >= 1 or None, got {keep_last}")
    ckpts = Path(root) / CHECKPOINTS_DIR
    name = checkpoint_name(step)
    final = ckpts / name
    tmp = ckpts / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    old: Path | None = None
    try:
        ckpts.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(ckpts, (".tmp-", ".del-"))  # a crashed save's or deletion's remains
        tmp.mkdir()
        for rel, value in files.items():
            dest = tmp / _checked_relpath(rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            _write_one(dest, rel, value)
        entries = {
            p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(tmp.rglob("*")) if p.is_file()
        }  # fmt: skip
        manifest = {"format": FORMAT_VERSION, "step": step, "files": entries}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():
            old = ckpts / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        try:
            os.rename(tmp, final)  # the commit point
        except BaseException:
            if old is not None:
                os.rename(old, final)
                old = None
            raise
        _fsync_dir(ckpts)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = storage_errno(e)
        if cause is not None:
            raise CheckpointError(_storage_failure(e, cause, root, name, size_hint)) from e
        raise
    _write_latest(ckpts, name)
    _remove_leftovers(ckpts, (".old-",))
    if keep_last is not None:
        prune_checkpoints(root, keep_last, protect=final)
    return final


def storage_errno(e: BaseException) -> int | None:
    """The errno of a failure of the storage written to (full, read-only, quota...), or None for other errors.
    safetensors' writer reports an OS error inside its message ("... (os error 28)")."""
    if isinstance(e, OSError):
        return e.errno if e.errno in _STORAGE_ERRNOS else None
    m = re.search(r"\(os error (\d+)\)", str(e)) if isinstance(e, Exception) else None
    return int(m.group(1)) if m and int(m.group(1)) in _STORAGE_ERRNOS else None


def _storage_failure(e: BaseException, code: int, root: str | Path, name: str, size_hint: int | None) -> str:
    """What to tell the user when the output's storage refused a checkpoint."""
    where = getattr(e, "filename", None) or Path(root) / CHECKPOINTS_DIR
    need = f"it needs about {format_bytes(size_hint)}" if size_hint else "its size is not known in advance"
    free = free_bytes(root)
    free_text = f"{format_bytes(free)} free there" if free is not None else "free space unknown"
    previous = find_latest_checkpoint(root)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return (f"cannot save checkpoint {name}: {os.strerror(code)} ({where}); {need}, {free_text}; {kept}. "
            "Free space or choose another --output, then resume with --resume.")


def free_bytes(path: str | Path) -> int | None:
    """Free bytes for an unprivileged writer on the file system that holds `path` (or its nearest existing
    parent); None when it cannot be asked."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def format_bytes(n: int | float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} bytes"


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor inside `value` (nested dicts, lists and tuples): what writing it will take."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _checked_relpath(rel: str) -> PurePosixPath:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise CheckpointError(f"checkpoint file name {rel!r} must be a relative path inside the checkpoint")
    if p.as_posix() == MANIFEST_FILE:
        raise CheckpointError(f"{MANIFEST_FILE} is written by save_checkpoint itself; choose another name")
    return p


def _write_one(dest: Path, rel: str, value: Any) -> None:
    suffix = dest.suffix.lower()
    if callable(value):
        value(dest)
        if not dest.exists():
            raise CheckpointError(f"the writer for {rel!r} returned without writing anything at {dest}")
    elif isinstance(value, (bytes, bytearray)):
        dest.write_bytes(value)
    elif suffix == ".json":
        dest.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    elif suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(dict(value), str(dest))
    elif suffix == ".pt":
        with dest.open("wb") as f:  # through a Python file, so a full disk is an OSError with its errno
            torch.save(value, f)
    elif isinstance(value, str):
        dest.write_text(value, encoding="utf-8")
    else:
        raise CheckpointError(
            f"don't know how to write {rel!r} ({type(value).__name__}): give a callable(path), bytes or str, "
            "or use a .json, .safetensors or .pt name"
        )


def _fsync_tree(top: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(top, topdown=False):
        for fn in filenames:
            fd = os.open(os.path.join(dirpath, fn), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable. Windows cannot open directories."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_latest(ckpts: Path, name: str) -> None:
    tmp = ckpts / f".tmp-{LATEST_FILE}-{os.getpid()}"  # a ".tmp-" name: the next save sweeps it if we die here
    with tmp.open("w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpts / LATEST_FILE)
    _fsync_dir(ckpts)


def _remove_leftovers(ckpts: Path, prefixes: tuple[str, ...]) -> None:
    for p in ckpts.iterdir():
        if not p.name.startswith(prefixes):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Finding and validating.


def verify_checkpoint(ckpt_dir: str | Path, *, hashes: bool = False) -> dict[str, Any]:
    """Return the manifest if `ckpt_dir` is complete; else raise CheckpointError saying what is wrong.

    Sizes are always checked; `hashes` also checks each file's SHA-256 (format 2; format 1 has none)."""
    ckpt_dir = Path(ckpt_dir)
    manifest_path = ckpt_dir / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{ckpt_dir} is not a complete checkpoint: {MANIFEST_FILE} is missing"
        ) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{manifest_path} is unreadable: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_FORMATS:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(
            f"{manifest_path}: unknown checkpoint format {found!r} (this version reads {READABLE_FORMATS})"
        )
    if not isinstance(manifest.get("step"), int) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path}: malformed manifest (needs 'step' and 'files')")
    for rel, entry in manifest["files"].items():
        size, sha = _manifest_entry(manifest_path, manifest["format"], rel, entry)
        path = ckpt_dir / rel
        if not path.is_file():
            raise CheckpointError(f"{ckpt_dir} is incomplete: {rel} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"{ckpt_dir} is incomplete: {rel} has {path.stat().st_size} bytes, expected {size}"
            )
        if hashes and sha is not None and file_sha256(path) != sha:
            raise CheckpointError(f"{ckpt_dir} is damaged: {rel} does not match its SHA-256 in {MANIFEST_FILE}")
    return manifest


def _manifest_entry(manifest_path: Path, version: int, rel: Any, entry: Any) -> tuple[int, str | None]:
    """(bytes, sha256 or None) of one manifest entry, checked: a name inside the checkpoint, sane values."""
    p = PurePosixPath(rel) if isinstance(rel, str) else None
    if p is None or not rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise CheckpointError(f"{manifest_path}: file name {rel!r} is not a path inside the checkpoint")
    if version == 1:
        entry = {"bytes": entry, "sha256": None}
    if not isinstance(entry, dict):
        raise CheckpointError(f"{manifest_path}: entry for {rel} must be an object with 'bytes' and 'sha256'")
    size, sha = entry.get("bytes"), entry.get("sha256")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise CheckpointError(f"{manifest_path}: {rel}: 'bytes' must be a non-negative integer, got {size!r}")
    if version >= 2 and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise CheckpointError(f"{manifest_path}: {rel}: 'sha256' must be 64 hex digits, got {sha!r}")
    return size, sha


def is_complete(ckpt_dir: str | Path) -> bool:
    try:
        verify_checkpoint(ckpt_dir)
    except CheckpointError:
        return False
    return True


def _step_directories(root: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every directory named like a checkpoint (step-N, or the .old copy a crash left),
    complete or not, oldest first; step-N is preferred to an .old copy of the same step."""
    ckpts = Path(root) / CHECKPOINTS_DIR
    if not ckpts.is_dir():
        return []
    found: dict[int, list[Path]] = {}
    for p in ckpts.iterdir():
        m = _STEP_RE.match(p.name) or _OLD_RE.match(p.name)
        if m and p.is_dir():
            found.setdefault(int(m.group(1)), []).append(p)
    return [(step, p) for step in sorted(found) for p in sorted(found[step], key=lambda q: q.name.startswith("."))]


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under root/checkpoints (sizes checked), oldest first."""
    found: dict[int, Path] = {}
    for step, p in _step_directories(root):
        if step in found:
            continue
        try:
            if verify_checkpoint(p)["step"] == step:
                found[step] = p
        except CheckpointError:
            continue
    return sorted(found.items())


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under root/checkpoints (sizes checked), or None when there is none."""
    complete = list_checkpoints(root)
    return complete[-1][1] if complete else None


def find_intact_checkpoint(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint whose every file matches its manifest's size and SHA-256, or None;
    [(checkpoint, why it was skipped)] for the newer ones that do not)."""
    skipped: list[tuple[Path, str]] = []
    for step, p in reversed(_step_directories(root)):
        try:
            manifest = verify_checkpoint(p, hashes=True)
            if manifest["step"] != step:
                raise CheckpointError(f"{p}: its manifest says step {manifest['step']}, its name step {step}")
        except CheckpointError as e:
            skipped.append((p, str(e)))
            continue
        return p, skipped
    return None, skipped


def set_aside(ckpt_dir: str | Path) -> Path:
    """Rename a damaged checkpoint to a hidden `.damaged-*` name (kept for inspection): it no longer counts
    as a checkpoint, for resume or for pruning. Returns the new path."""
    ckpt_dir = Path(ckpt_dir)
    target = ckpt_dir.with_name(f".damaged-{ckpt_dir.name.lstrip('.')}-{uuid.uuid4().hex[:8]}")
    os.rename(ckpt_dir, target)
    return target


def prune_checkpoints(root: str | Path, keep_last: int, *, protect: Path | None = None) -> list[Path]:
    """Delete all but the `keep_last` newest complete checkpoints, never `protect` (the one just written,
    whose hashes were taken from the files on disk: the run always keeps one intact checkpoint, even when
    newer ones are damaged); return what was deleted.

    Each victim is first renamed to a hidden `.del-*` name, so an interrupted deletion never
    leaves a partial directory under a checkpoint's name. Incomplete directories are left alone.
    """
    complete = list_checkpoints(root)
    victims = [p for _, p in complete[:-keep_last]] if keep_last < len(complete) else []
    victims = [p for p in victims if protect is None or p != protect]
    for p in victims:
        doomed = p.with_name(f".del-{p.name.lstrip('.')}-{uuid.uuid4().hex[:8]}")
        os.rename(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return victims


def tidy_checkpoints(root: str | Path, keep_last: int | None) -> None:
    """Finish what a save killed after its commit left undone: remove temporaries, half-deleted and superseded
    directories (`.tmp-*`, `.del-*`, `.old-*` of a step that exists), point `latest` at the newest complete
    checkpoint and prune to `keep_last`. Run before a resume (by the one process that writes)."""
    ckpts = Path(root) / CHECKPOINTS_DIR
    if not ckpts.is_dir():
        return
    _remove_leftovers(ckpts, (".tmp-", ".del-"))
    for p in ckpts.iterdir():
        m = _OLD_RE.match(p.name)
        if m and is_complete(ckpts / checkpoint_name(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)
    newest = find_latest_checkpoint(root)
    pointer = ckpts / LATEST_FILE
    if newest is not None and (not pointer.is_file() or pointer.read_text(encoding="utf-8").strip() != newest.name):
        _write_latest(ckpts, newest.name)
    if keep_last is not None and newest is not None:
        prune_checkpoints(root, keep_last, protect=newest)


def load_checkpoint_state(
    ckpt_dir: str | Path, names: Iterable[str] | None = None, *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Verify `ckpt_dir` and load its files by suffix (.json, .safetensors, .pt); others come back as Paths.

    `names` selects files (or directories written by a callable, returned as Paths); default: all.
    `.pt` files are read with `torch.load(weights_only=True)`.
    """
    ckpt_dir = Path(ckpt_dir)
    manifest = verify_checkpoint(ckpt_dir)
    listed = list(manifest["files"])
    wanted = listed if names is None else list(names)
    out: dict[str, Any] = {}
    for rel in wanted:
        path = ckpt_dir / rel
        if rel not in manifest["files"]:
            if any(f.startswith(rel.rstrip("/") + "/") for f in listed):
                out[rel] = path
                continue
            raise CheckpointError(f"{ckpt_dir} has no {rel!r}; it holds: {', '.join(listed)}")
        out[rel] = _read_one(path, map_location)
    return out


def _read_one(path: Path, map_location: str | torch.device) -> Any:
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=str(map_location))
        if suffix == ".pt":
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load {path}: {e}") from e
    return path


# ---------------------------------------------------------------------------------------------
# Random number generator state (python `random`, torch CPU, torch CUDA), stored as tensors only.
# numpy's generator is not captured: nothing in qlora draws from it.


def capture_rng_state() -> dict[str, torch.Tensor]:
    """Every RNG the loop draws from, as a flat dict of tensors (loadable with weights_only=True)."""
    version, internal, gauss_next = random.getstate()
    state = {
        "python_version": torch.tensor(version, dtype=torch.int64),
        "python_state": torch.tensor(internal, dtype=torch.int64),  # 624 uint32 words + position
        # gauss_next is None or a float: [has_value, value]
        "python_gauss_next": torch.tensor(
            [0.0 if gauss_next is None else 1.0, 0.0 if gauss_next is None else gauss_next],
            dtype=torch.float64,
        ),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    """Inverse of `capture_rng_state`. CUDA state is restored only onto the same number of GPUs."""
    missing = {"python_version", "python_state", "python_gauss_next", "torch_cpu"} - set(state)
    if missing:
        raise CheckpointError(f"RNG state lacks {sorted(missing)}; it was not made by capture_rng_state()")
    has_gauss, gauss = state["python_gauss_next"].tolist()
    random.setstate(
        (
            int(state["python_version"]),
            tuple(int(x) for x in state["python_state"].tolist()),
            gauss if has_gauss else None,
        )
    )
    torch.set_rng_state(state["torch_cpu"].to("cpu", torch.uint8))
    if "torch_cuda" in state:
        cuda_states = list(state["torch_cuda"].to("cpu", torch.uint8).unbind(0))
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn(
                f"checkpoint has CUDA RNG state for {len(cuda_states)} GPU(s) but this process sees "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; CUDA random draws "
                "(dropout) will not continue the saved sequence",
                stacklevel=2,
            )
