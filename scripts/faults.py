"""Fault injection: a training run killed with SIGKILL at any moment and resumed ends bit for bit where an
uninterrupted run ends.

    python scripts/faults.py --kills 100 --seed 0 [--steps 12] [--json out.json] [--workdir DIR]
    python scripts/faults.py --schedule "forward=40,rename:after@ckpt.commit=1" --steps 6   # chosen kills

The run is `qlora train` on the tiny stories260K model and the Alpaca sample (CPU, float32, dropout on, a
fixed training seed, a checkpoint every `--save-every` steps, `--keep-last` kept). The script

1. trains once without interruption (`python -m qlora train`, nothing wrapped): the reference;
2. trains once more through the worker below with every kill point counted and none fired (the census):
   how often each point is reached per step, and proof that the instrumentation changes nothing (its
   result must equal the reference's);
3. runs rounds: the worker is started, killed with SIGKILL, started again with `--resume` (or from scratch
   while no checkpoint exists yet), ... until it finishes; each finished round is compared with the
   reference; rounds repeat until `--kills` kills have happened;
4. runs the negative controls: a reference with another training seed, and the reference with one bit of one
   optimizer moment flipped, must both be reported as different (so a pass means something);
5. prints a summary and writes it as JSON (`--json`); exits 1 on any difference.

Kill moments. (a) Wall clock: the parent sleeps a random time and sends SIGKILL. (b) Targeted: the worker
(`--worker`, this file) imports qlora only after wrapping stable low-level functions and hooks, counts each
point as it is reached, and kills itself (`os.kill(getpid(), SIGKILL)`) at the N-th arrival of the chosen one:

    forward    a module's forward starts (a global forward pre-hook), outside backward
    recompute  the same, inside backward (gradient checkpointing recomputes the layers)
    backward   a module output's gradient arrives (tensor hooks registered by a global forward hook)
    optimizer  a torch operation inside `Optimizer.step` (the global step hooks enter a TorchFunctionMode)
    eval       a module's forward starts without gradients (held-out evaluation)
    FN:WHEN@REGION   before or after a call of os.rename, os.replace, os.fsync, os.mkdir, os.unlink,
               os.rmdir, shutil.rmtree, open (writing), torch.save, safetensors.torch.save_file, torch.load,
               safetensors load_file / safe_open, on a path of the run. REGION is read from the path:
               ckpt.tmp (a checkpoint being written), ckpt.commit (its rename into place), ckpt.latest (the
               `latest` pointer), ckpt.prune (deleting old checkpoints), ckpt.old, ckpt.step (a committed
               checkpoint, e.g. read by a resume), ckpt.dir (the checkpoints directory itself), adapter (the
               final adapter files), output (metrics, TensorBoard, config.yaml, loss.png).

Only these names are assumed of the product: the command line (`qlora train --config --resume`), the
documented layout (`checkpoints/step-NNNNNN`, `latest`, `adapter_model.safetensors`, `metrics.jsonl`) and
`qlora.train.checkpoint`'s verify/load functions; internals can be refactored without touching this file.

Checked after every kill: every `checkpoints/step-*` directory is complete (atomic commit), and a resume reads
the newest one. Checked after each round: every checkpoint file (adapter, optimizer, scheduler, scaler, RNG,
data position, step) and the output adapter equal the reference's bit for bit (tensors compared as bytes), the
metrics records equal (timings aside), the checkpoints directory and the output directory list the same entries
as the reference's (no leftover temporary files or directories, same `latest`), and the adapter loads.

Every process imports a copy of `qlora/` made when the script starts (the working tree, or `--git-ref`), so an
edit made to the tree meanwhile cannot make the reference and a resumed run differ. What this does not test:
SIGKILL loses the process, not the page cache, so what a power cut does to data not yet fsynced is not seen
here; nor are several processes (torchrun) or CUDA.
"""

from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
MODEL = SHARED / "models" / "stories260K"
DATA = SHARED / "data" / "instruct" / "alpaca_en_demo.json"
MARK = "FAULTS"  # the worker's stdout lines for the parent: "FAULTS kill POINT N", "FAULTS read DIR"
COMPUTE_POINTS = ("forward", "recompute", "backward", "optimizer", "eval")
METRIC_NOISE = ("time", "seconds", "per_s", "gib")  # metrics keys that measure the machine, not the run


def category(point: str) -> str:
    """The family a kill point belongs to, for the summary: compute, checkpoint, adapter, output, resume, wall."""
    if point == "wall":
        return "wall"
    if point in COMPUTE_POINTS:
        return "compute"
    fn, _, region = point.partition("@")
    if fn.split(":")[0] in ("torch.load", "load_file", "safe_open"):
        return "resume"
    if region.startswith("ckpt."):
        return "checkpoint"
    return region or "other"


# =============================================================================================== the worker


class Instruments:
    """Counts every kill point the worker reaches; kills the process at the N-th arrival of `target`.

    Installed before qlora is imported (qlora.adapter binds safetensors' save_file and safe_open at import).
    With `census` it records the counts after setup and after every optimizer step, with their times."""

    def __init__(self, output: Path, target: str | None, n: int, census: bool):
        self.output = os.path.realpath(output)
        self.target, self.n, self.census = target, n, census
        self.counts: Counter[str] = Counter()
        self.in_backward = 0
        self.started = time.perf_counter()
        self.starts: list[dict] = []  # counts and time when each step's first forward starts (census)
        self.steps: list[dict] = []  # counts and time after each step's optimizer update (census)
        self._in_step = False
        self.read_dirs: set[str] = set()
        self._mode = None

    # --- counting and killing ------------------------------------------------------------------
    def hit(self, point: str) -> None:
        self.counts[point] += 1
        if point == self.target and self.counts[point] == self.n:
            print(f"{MARK} kill {point} {self.n}", flush=True)
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # SIGKILL is not delivered synchronously everywhere; never run on

    def snapshot(self) -> dict:
        return {"t": time.perf_counter() - self.started, "counts": dict(self.counts)}

    # --- paths -----------------------------------------------------------------------------------
    def region(self, path) -> str | None:
        """Where `path` lies in the run (see the module docstring), or None outside the output directory."""
        try:
            p = os.path.realpath(os.fsdecode(path))
        except TypeError:
            return None
        if p == self.output:
            return "output"
        if not p.startswith(self.output + os.sep):
            return None
        parts = p[len(self.output) + 1 :].split(os.sep)
        if parts[0] == "checkpoints":
            if len(parts) == 1:
                return "ckpt.dir"
            for prefix, name in ((".tmp-latest", "ckpt.latest"), (".tmp-", "ckpt.tmp"), (".del-", "ckpt.prune"),
                                 (".old-", "ckpt.old"), ("latest", "ckpt.latest"), ("step-", "ckpt.step")):  # fmt: skip
                if parts[1].startswith(prefix):
                    return name
            return "ckpt.other"
        return "adapter" if "adapter" in parts[0] else "output"

    @staticmethod
    def fd_path(fd: int, name=None) -> str | None:
        try:
            base = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        return base if name is None else os.path.join(base, os.fsdecode(name))

    def path_of(self, path, dir_fd=None):
        if isinstance(path, int):
            return self.fd_path(path)
        if dir_fd is not None:
            return self.fd_path(dir_fd, path)
        return path

    def move_region(self, src, dst) -> str | None:
        a, b = self.region(src), self.region(dst)
        if a == "ckpt.tmp" and b == "ckpt.step":
            return "ckpt.commit"
        if b in ("ckpt.prune", "ckpt.old"):
            return b
        return b or a

    # --- wrappers --------------------------------------------------------------------------------
    def around(self, fn_name: str, func, region_of):
        """`func` with points `fn_name:before@REGION` and `fn_name:after@REGION` where region_of(args) is not None."""

        def wrapped(*args, **kwargs):
            region = region_of(*args, **kwargs)
            if region is None:
                return func(*args, **kwargs)
            self.hit(f"{fn_name}:before@{region}")
            result = func(*args, **kwargs)
            self.hit(f"{fn_name}:after@{region}")
            return result

        wrapped.__wrapped__ = func
        return wrapped

    def reading(self, fn_name: str, func, path_arg=0):
        """`func` reading a file: notes which checkpoint directory a resume reads; points as `around`."""

        def region_of(*args, **kwargs):
            path = args[path_arg] if len(args) > path_arg else next(iter(kwargs.values()), None)
            region = self.region(path) if isinstance(path, (str, os.PathLike)) else None
            if region == "ckpt.step":
                rel = os.path.relpath(os.path.realpath(path), os.path.join(self.output, "checkpoints"))
                name = rel.split(os.sep)[0]
                if name not in self.read_dirs:
                    self.read_dirs.add(name)
                    print(f"{MARK} read {name}", flush=True)
            return region

        return self.around(fn_name, func, region_of)

    def install(self) -> None:
        import safetensors
        import safetensors.torch
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        from torch.overrides import TorchFunctionMode

        region = self.region

        def first(*args, **kwargs):
            return region(args[0]) if args else None

        def dir_fd_region(path, *args, dir_fd=None, **kwargs):
            return region(self.path_of(path, dir_fd))

        def two(src, dst, *args, **kwargs):
            return self.move_region(src, dst)

        def fd_region(fd, *args, **kwargs):
            return region(self.fd_path(fd))

        def open_region(file, mode="r", *args, **kwargs):
            if isinstance(file, int) or not any(c in mode for c in "wax+"):
                return None
            return region(file)

        def save_region(obj, f, *args, **kwargs):
            return region(f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None))

        def save_file_region(tensors, filename, *args, **kwargs):
            return region(filename)

        os.rename = self.around("rename", os.rename, two)
        os.replace = self.around("replace", os.replace, two)
        os.fsync = self.around("fsync", os.fsync, fd_region)
        os.mkdir = self.around("mkdir", os.mkdir, dir_fd_region)
        os.unlink = self.around("unlink", os.unlink, dir_fd_region)
        os.remove = os.unlink
        os.rmdir = self.around("rmdir", os.rmdir, dir_fd_region)
        shutil.rmtree = self.around("rmtree", shutil.rmtree, first)
        builtins.open = io.open = self.around("open", io.open, open_region)
        torch.save = self.around("torch.save", torch.save, save_region)
        torch.load = self.reading("torch.load", torch.load)
        safetensors.torch.save_file = self.around("save_file", safetensors.torch.save_file, save_file_region)
        safetensors.torch.load_file = self.reading("load_file", safetensors.torch.load_file)
        safetensors.safe_open = self.reading("safe_open", safetensors.safe_open)

        instruments = self

        def forward_pre(module, args):
            if instruments.in_backward:
                instruments.hit("recompute")
            elif not torch.is_grad_enabled():
                instruments.hit("eval")
            else:
                if instruments.census and not instruments._in_step:
                    instruments.starts.append(instruments.snapshot())
                    instruments._in_step = True
                instruments.hit("forward")

        def gradient_arrived(grad):
            instruments.hit("backward")

        def forward_post(module, args, output):
            if torch.is_grad_enabled() and not instruments.in_backward and isinstance(output, torch.Tensor) \
                    and output.requires_grad:  # fmt: skip
                output.register_hook(gradient_arrived)

        torch.nn.modules.module.register_module_forward_pre_hook(forward_pre)
        torch.nn.modules.module.register_module_forward_hook(forward_post)

        autograd_backward = torch.autograd.backward

        def backward(*args, **kwargs):
            instruments.in_backward += 1
            try:
                return autograd_backward(*args, **kwargs)
            finally:
                instruments.in_backward -= 1

        torch.autograd.backward = backward

        class InsideStep(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                instruments.hit("optimizer")
                return func(*args, **(kwargs or {}))

        def step_pre(optimizer, args, kwargs):
            self._mode = InsideStep()
            self._mode.__enter__()

        def step_post(optimizer, args, kwargs):
            mode, self._mode = self._mode, None
            if mode is not None:
                mode.__exit__(None, None, None)
            if self.census:
                self.steps.append(self.snapshot())
                self._in_step = False

        register_optimizer_step_pre_hook(step_pre)
        register_optimizer_step_post_hook(step_post)


def worker_main(args) -> int:
    import yaml

    config = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    target, n = (args.kill.rsplit("=", 1)[0], int(args.kill.rsplit("=", 1)[1])) if args.kill else (None, 0)
    instruments = Instruments(Path(config["output"]), target, n, census=bool(args.census))
    instruments.install()
    from qlora.cli import main  # only now: every wrapper is in place

    rc = main(["train", "--config", args.config] + (["--resume"] if args.resume else []))
    if args.census:
        Path(args.census).write_text(json.dumps({"starts": instruments.starts, "steps": instruments.steps,
                                                 "end": instruments.snapshot()}) + "\n")  # fmt: skip
    return rc


# =============================================================================================== the parent


def run_config(output: Path, steps: int, save_every: int, keep_last: int, train_seed: int) -> dict:
    """The training run (tests/train/train_fixtures.py's tiny config with periodic checkpoints)."""
    return {
        "model": {"path": str(MODEL), "compute_dtype": "float32"},
        "quant": {"quant_type": "nf4"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "data": {"path": str(DATA), "max_source_len": 48, "max_target_len": 32, "eval_fraction": 0.01},
        "optim": {"lr": 1e-3},
        "train": {"max_steps": steps, "micro_batch_size": 2, "grad_accum": 2, "warmup_steps": 2,
                  "save_every": save_every, "keep_last": keep_last},
        "output": str(output),
        "seed": train_seed,
        "device": "cpu",
    }  # fmt: skip


def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")  # JSON is YAML
    return path


def child_env(code: Path) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # the same in every process: float sums depend on the thread count
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    return env


def snapshot_code(workdir: Path, git_ref: str | None) -> tuple[Path, dict]:
    """A copy of the `qlora` package that every process of this run imports (PYTHONPATH comes before the
    editable install): the working tree as it is now, or the commit `git_ref`. Others may edit the tree
    while the run goes on; a reference and a resumed run built from different code compare nothing."""
    code = workdir / "code"
    shutil.rmtree(code, ignore_errors=True)
    code.mkdir(parents=True)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True).stdout.strip()

    if git_ref:
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", git_ref, "qlora"], capture_output=True)
        if archive.returncode != 0:
            raise SystemExit(f"faults: git archive {git_ref} qlora failed: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive.stdout, check=True)
    else:
        shutil.copytree(REPO_ROOT / "qlora", code / "qlora", ignore=shutil.ignore_patterns("__pycache__"))
    info = {"source": f"git {git_ref}" if git_ref else "working tree", "head": git("rev-parse", "HEAD"),
            "ref": git("rev-parse", git_ref) if git_ref else None,
            "uncommitted": [] if git_ref else git("status", "--porcelain", "--", "qlora").splitlines()}  # fmt: skip
    return code, info


def committed(output: Path) -> list[int]:
    """Steps of the `checkpoints/step-N` directories (committed checkpoints, complete or not)."""
    ckpts = output / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpts.iterdir() if (m := re.fullmatch(r"step-(\d+)", p.name)))


class Attempt:
    """One start of the worker: what it was told, how it ended, what it read."""

    def __init__(self, code: Path, config_path: Path, log_path: Path, resume: bool, kill: str | None,
                 delay: float | None, timeout: float, census: Path | None = None):  # fmt: skip
        self.kill, self.delay, self.resume = kill, delay, resume
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--config", str(config_path)]
        cmd += ["--resume"] if resume else []
        cmd += ["--kill", kill] if kill else []
        cmd += ["--census", str(census)] if census else []
        started = time.perf_counter()
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=code.parent, env=child_env(code))
            self.timed_out = False
            try:
                proc.wait(timeout=delay if delay is not None else timeout)
            except subprocess.TimeoutExpired:
                if delay is None:
                    self.timed_out = True
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        self.seconds = time.perf_counter() - started
        self.rc = proc.returncode
        self.log_path = log_path
        text = log_path.read_text(encoding="utf-8", errors="replace")
        marks = [line.split()[1:] for line in text.splitlines() if line.startswith(MARK + " ")]
        self.killed_at = next((m[1:] for m in marks if m[0] == "kill"), None)  # [point, n]
        self.read = sorted({m[1] for m in marks if m[0] == "read"})
        self.tail = "\n".join(text.splitlines()[-15:])

    @property
    def killed(self) -> bool:
        return self.rc == -signal.SIGKILL

    @property
    def finished(self) -> bool:
        return self.rc == 0


# --------------------------------------------------------------------------------------------- comparison


def _bits(t):
    import torch

    flat = t.detach().reshape(-1).contiguous()
    return flat.view(torch.uint8) if flat.dtype != torch.bool else flat


def diff(a, b, where: str, out: list[str]) -> list[str]:
    """Append to `out` every place where `a` and `b` differ: tensors bit for bit (dtype, shape, bytes), floats
    by their bits, containers recursively."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            out.append(f"{where}: {type(a).__name__} vs {type(b).__name__}")
        elif a.dtype != b.dtype or a.shape != b.shape:
            out.append(f"{where}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
        elif not torch.equal(_bits(a), _bits(b)):
            n = int((_bits(a) != _bits(b)).sum()) if a.dtype != torch.bool else int((a != b).sum())
            out.append(f"{where}: tensors differ ({n} bytes of {_bits(a).numel()})")
    elif isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                out.append(f"{where}[{key!r}]: only in {'the run' if key in a else 'the reference'}")
            else:
                diff(a[key], b[key], f"{where}[{key!r}]", out)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} items vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            diff(x, y, f"{where}[{i}]", out)
    elif isinstance(a, float) and isinstance(b, float):
        if a.hex() != b.hex() and not (a != a and b != b):
            out.append(f"{where}: {a!r} vs {b!r}")
    elif type(a) is not type(b) or a != b:
        out.append(f"{where}: {a!r} vs {b!r}")
    return out


def read_metrics_records(path: Path) -> list[dict]:
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        records.append({k: v for k, v in record.items() if not any(s in k for s in METRIC_NOISE)})
    return records


def load_run(output: Path) -> dict:
    """Everything of a finished run that must equal the reference's (see the module docstring)."""
    from safetensors.torch import load_file

    from qlora.train.checkpoint import load_checkpoint_state

    ckpts = output / "checkpoints"
    state: dict = {
        "checkpoints/ entries": sorted(os.listdir(ckpts)) if ckpts.is_dir() else [],
        "output entries": sorted(os.listdir(output)),
        "latest": (ckpts / "latest").read_text(encoding="utf-8") if (ckpts / "latest").is_file() else None,
        "metrics": read_metrics_records(output / "metrics.jsonl"),
        "adapter": load_file(str(output / "adapter_model.safetensors")),
        "adapter_model.safetensors bytes": (output / "adapter_model.safetensors").read_bytes(),
        "adapter_config.json": json.loads((output / "adapter_config.json").read_text(encoding="utf-8")),
        "checkpoints": {},
    }
    for step in committed(output):
        name = f"step-{step:06d}"
        state["checkpoints"][name] = load_checkpoint_state(ckpts / name, map_location="cpu")
    return state


def compare(reference: dict, run: dict) -> list[str]:
    """Differences between two `load_run` results (empty: equal)."""
    out: list[str] = []
    for key in reference:
        if key == "adapter_model.safetensors bytes":
            if reference[key] != run[key]:
                out.append(f"{key}: the files differ ({len(run[key])} vs {len(reference[key])} bytes)")
        elif key.endswith("entries"):  # extra: leftovers (directory); missing: lost outputs (state)
            extra, missing = sorted(set(run[key]) - set(reference[key])), sorted(set(reference[key]) - set(run[key]))
            if extra:
                out.append(f"{key}: extra {extra}")
            if missing:
                out.append(f"{key}: missing {missing}")
        elif key == "checkpoints":  # those in both; the entries say which are extra or missing
            for name in sorted(set(run[key]) & set(reference[key])):
                diff(run[key][name], reference[key][name], f"{key}[{name!r}]", out)
        else:
            diff(run[key], reference[key], key, out)
    return out


def adapter_loads(output: Path) -> str | None:
    """None if `output`'s adapter loads onto the model (PEFT format, every tensor used); else the error."""
    try:
        import qlora

        qlora.load(str(MODEL), adapter=str(output), device="cpu")
    except Exception as e:  # reported, not raised: the summary names it
        return f"{type(e).__name__}: {e}"
    return None


def complete_check(output: Path) -> list[str]:
    """Every `checkpoints/step-N` directory must be complete: a commit is one rename of a finished directory."""
    from qlora.train.checkpoint import CheckpointError, verify_checkpoint

    problems = []
    for step in committed(output):
        path = output / "checkpoints" / f"step-{step:06d}"
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            problems.append(f"{path.name} is incomplete under its final name: {e}")
    return problems


def flip_one_bit(state: dict) -> dict:
    """A copy of a `load_run` result with the lowest bit of one optimizer moment element flipped."""
    import copy

    import torch

    state = copy.deepcopy(state)
    newest = state["checkpoints"][max(state["checkpoints"])]
    moments = newest["optimizer.pt"]["state"]
    first = moments[min(moments)]
    key = next(k for k, v in first.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 1)
    flat = first[key].reshape(-1).view(torch.int32)  # float32 moments
    flat[0] ^= 1
    return state


# ---------------------------------------------------------------------------------------------- census


class Census:
    """How often each point is reached in an uninterrupted run: when each step's first forward starts (the first
    one: after setup), after each step's update, and in all; with the times."""

    def __init__(self, data: dict, seconds: float):
        self.starts = [s["counts"] for s in data["starts"]]
        self.steps = [s["counts"] for s in data["steps"]]
        self.total = data["end"]["counts"]
        self.t_starts, self.t_steps = [s["t"] for s in data["starts"]], [s["t"] for s in data["steps"]]
        self.t_end = data["end"]["t"]
        self.startup = max(0.0, seconds - self.t_end)  # interpreter start before the worker's clock

    def remaining(self, point: str, resumed: int) -> int:
        """Arrivals of `point` in a start that resumes after step `resumed` (0: from scratch): setup's, then
        those from step `resumed + 1` on. Resumed after the last step, those after its update are counted (its
        evaluation and checkpoint too, which a resume does not redo: an overestimate)."""
        if resumed == 0:
            return self.total.get(point, 0)
        after = self.starts[resumed] if resumed < len(self.starts) else self.steps[resumed - 1]
        return self.starts[0].get(point, 0) + self.total.get(point, 0) - after.get(point, 0)

    def points(self, resumed: int) -> list[str]:
        """Points a start resumed after step `resumed` reaches. After the last step only setup and the outputs
        are left: no compute, and no checkpoint unless setup writes one."""
        last = resumed >= len(self.steps)
        return sorted(p for p in self.total if self.remaining(p, resumed) > 0
                      and not (last and category(p) in ("compute", "checkpoint") and not self.starts[0].get(p)))

    def seconds(self, resumed: int) -> float:
        """How long a start that resumes after step `resumed` takes, roughly."""
        done = self.t_starts[resumed] if resumed < len(self.t_starts) else self.t_steps[resumed - 1]
        return self.startup + self.t_starts[0] + self.t_end - done


# ---------------------------------------------------------------------------------------------- the rounds

# What each kind of failure means; `result` fails on any of them.
KINDS = {
    "state": "a finished run's state differs from the reference's (adapter, optimizer, schedule, RNG, data "
    "position, step, metrics), or its adapter does not load",
    "atomicity": "after a kill, a checkpoint under its final name is incomplete, or a resume read another "
    "checkpoint than the newest",
    "directory": "a finished run's directories list other entries than the reference's (leftover temporary "
    "files or directories, more checkpoints than keep_last, a stale latest pointer)",
    "error": "a start exited on its own with an error, hung, or was not killed where it was told to be",
    "control": "a negative control was not reported as a difference",
    "instruments": "the instrumented run differs from the reference (the worker's wrappers changed something)",
}
DIRECTORY_KEYS = ("checkpoints/ entries: extra", "output entries: extra", "latest")
CATEGORY_WEIGHTS = {"compute": 0.3, "checkpoint": 0.5, "adapter": 0.1, "output": 0.05, "resume": 0.05}


class Faults:
    def __init__(self, args, workdir: Path, code: Path):
        self.args, self.workdir, self.code = args, workdir, code
        self.rng = random.Random(args.seed)
        self.failures: list[dict] = []
        self.kills: Counter[str] = Counter()
        self.schedule = [s.strip() for s in args.schedule.split(",") if s.strip()] if args.schedule else None
        (workdir / "logs").mkdir(parents=True, exist_ok=True)

    def fail(self, kind: str, what: str, **where) -> None:
        self.failures.append({"kind": kind, "what": what, **where})

    def config(self, name: str, train_seed: int | None = None) -> tuple[Path, Path]:
        a = self.args
        output = self.workdir / name
        cfg = run_config(output, a.steps, a.save_every, a.keep_last, a.train_seed if train_seed is None else train_seed)
        return write_config(self.workdir / f"{name}.yaml", cfg), output

    def reference(self, name: str, train_seed: int | None = None) -> tuple[Path, float]:
        """An uninterrupted run through `python -m qlora train`, nothing wrapped."""
        cfg, output = self.config(name, train_seed)
        shutil.rmtree(output, ignore_errors=True)
        started = time.perf_counter()
        log = self.workdir / "logs" / f"{name}.log"
        with open(log, "w", encoding="utf-8") as f:
            rc = subprocess.call([sys.executable, "-m", "qlora", "train", "--config", str(cfg)], stdout=f,
                                 stderr=subprocess.STDOUT, cwd=self.workdir, env=child_env(self.code))  # fmt: skip
        if rc != 0:
            raise SystemExit(f"faults: the reference run {name} failed (exit {rc}); its log: {log}")
        return output, time.perf_counter() - started

    def census(self) -> tuple[Census, Path]:
        cfg, output = self.config("census")
        shutil.rmtree(output, ignore_errors=True)
        data, log = self.workdir / "census.json", self.workdir / "logs" / "census.log"
        attempt = Attempt(self.code, cfg, log, False, None, None, self.args.timeout, data)
        if not attempt.finished:
            raise SystemExit(f"faults: the census run failed (exit {attempt.rc}); its log: {log}\n{attempt.tail}")
        return Census(json.loads(data.read_text()), attempt.seconds), output

    def choose(self, census: Census | None, resumed: int, kills_in_round: int, kills_at_end: int, output: Path):
        """(kill "POINT=N" or None, delay in seconds or None) for the next start of a round."""
        if self.schedule is not None:
            if not self.schedule:
                return None, None
            entry = self.schedule.pop(0)
            if entry.startswith("wall="):
                return None, float(entry.split("=", 1)[1])
            return entry, None
        if kills_in_round >= self.args.max_kills_per_round:
            return None, None
        if resumed >= self.args.steps and kills_at_end >= self.args.max_kills_at_end:
            return None, None  # only the outputs are left: a few kills there, then a new round
        if self.rng.random() < self.args.wall_fraction:  # 0.9: the estimate runs long; a start that ends first
            return None, round(self.rng.uniform(0.0, 0.9 * census.seconds(resumed)), 3)  # ends the round
        points = census.points(resumed)
        if resumed:  # a resume reads the checkpoint: a kill while it loads (not in the census, which starts fresh)
            points += ["torch.load:before@ckpt.step", "torch.load:after@ckpt.step"]
        families = {c: [p for p in points if category(p) == c] for c in CATEGORY_WEIGHTS}
        families = {c: ps for c, ps in families.items() if ps}
        family = self.rng.choices(list(families), weights=[CATEGORY_WEIGHTS[c] for c in families])[0]
        point = self.rng.choice(families[family])
        if point.startswith("torch.load") and point not in census.total:
            count = sum(1 for _ in (output / "checkpoints" / f"step-{resumed:06d}").glob("*.pt"))
        else:
            count = census.remaining(point, resumed)
        return f"{point}={self.rng.randint(1, max(1, count))}", None

    def round(self, index: int, census: Census | None, reference: dict) -> dict:
        """Kill and resume one run until it finishes; compare it with the reference."""
        name = f"round-{index:03d}"
        cfg, output = self.config(name)
        shutil.rmtree(output, ignore_errors=True)
        kills, attempts = 0, []
        while True:
            steps = committed(output)
            resumed = steps[-1] if steps else 0
            at_end = sum(1 for a in attempts if "point" in a and a["resume_from"] >= self.args.steps)
            kill, delay = self.choose(census, resumed, kills, at_end, output)
            log = self.workdir / "logs" / f"{name}-start-{len(attempts):03d}.log"
            a = Attempt(self.code, cfg, log, bool(steps), kill, delay, self.args.timeout)
            record = {"resume_from": resumed, "kill": kill, "delay_s": delay, "rc": a.rc,
                      "seconds": round(a.seconds, 2), "read": a.read}  # fmt: skip
            attempts.append(record)
            if steps and a.read and a.read != [f"step-{resumed:06d}"]:
                self.fail("atomicity", f"the resume read {a.read}, not the newest checkpoint step-{resumed:06d}",
                          round=index, log=str(log))  # fmt: skip
            if a.finished:
                if kill is not None or delay is not None:
                    record["note"] = "the kill point was not reached; the start finished"
                    if self.schedule is not None:
                        self.fail("error", f"the scheduled kill {kill} was not reached", round=index, log=str(log))
                break
            if not a.killed or a.timed_out:
                why = "hung" if a.timed_out else f"exited {a.rc}"
                self.fail("error", f"the worker {why} (kill {kill}, delay {delay}):\n{a.tail}", round=index,
                          log=str(log))  # fmt: skip
                return {"round": index, "kills": kills, "attempts": attempts, "result": "error"}
            if kill is not None and a.killed_at != kill.rsplit("=", 1):
                self.fail("error", f"killed, but not at {kill} (marker {a.killed_at})", round=index, log=str(log))
            point = "wall" if delay is not None else kill.rsplit("=", 1)[0]
            record["point"] = point
            self.kills[point] += 1
            kills += 1
            ckpts = output / "checkpoints"
            record["after"] = sorted(os.listdir(ckpts)) if ckpts.is_dir() else []
            for problem in complete_check(output):
                self.fail("atomicity", f"after the kill at {point}: {problem}", round=index, log=str(log))
        differences = compare(reference, load_run(output))
        load_error = adapter_loads(output)
        if load_error:
            differences.append(f"the output adapter does not load: {load_error}")
        for d in differences:
            self.fail("directory" if d.startswith(DIRECTORY_KEYS) else "state", d, round=index)
        for hidden in hidden_complete(output):
            self.fail("directory", f"{hidden} is a leftover hidden directory that looks complete", round=index)
        if not self.args.keep and not differences:
            shutil.rmtree(output, ignore_errors=True)
        return {"round": index, "kills": kills, "starts": len(attempts), "differences": differences,
                "result": "pass" if not differences else "fail", "attempts": attempts}  # fmt: skip


def hidden_complete(output: Path) -> list[str]:
    """Hidden directories under checkpoints/ that pass verification (a temporary or doomed copy left behind)."""
    from qlora.train.checkpoint import is_complete

    ckpts = output / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(p.name for p in ckpts.iterdir() if p.name.startswith(".") and p.is_dir() and is_complete(p))


def summarize(summary: dict) -> str:
    lines = [f"faults: {summary['kills']} kills in {summary['rounds_run']} rounds, {summary['starts']} starts "
             f"({summary['resumes']} resumed, {summary['fresh_starts']} from scratch), {summary['wall_s']:.0f} s; "
             f"result: {summary['result'].upper()}"]  # fmt: skip
    for cat, n in sorted(summary["kills_by_category"].items()):
        lines.append(f"  {cat:<11} {n:4d}")
    for point, n in sorted(summary["kills_by_point"].items()):
        lines.append(f"    {point:<42} {n:4d}")
    for name, c in summary["controls"].items():
        lines.append(f"  control {name}: {'detected' if c['detected'] else 'NOT DETECTED'} ({c['differences']} "
                     "differences)")  # fmt: skip
    for kind, ok in summary["checks"].items():
        lines.append(f"  {kind:<11} {'ok' if ok else 'FAIL: ' + KINDS[kind]}")
    lines.extend(f"  FAIL [{f['kind']}] round {f.get('round', '-')}: {f['what']}" for f in summary["failures"])
    return "\n".join(lines)


def parent_main(args) -> int:
    for path in (MODEL, DATA):
        if not path.exists():
            print(f"faults: {path} not found (the assets beside the repository, ../shared)", file=sys.stderr)
            return 2
    started = time.perf_counter()
    workdir = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="qlora-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    code, code_info = snapshot_code(workdir, args.git_ref)
    sys.path.insert(0, str(code))  # this process reads checkpoints with the same code
    faults = Faults(args, workdir, code)
    ref_dir, ref_seconds = faults.reference("reference")
    reference = load_run(ref_dir)
    census = None
    if faults.schedule is None:
        census, census_dir = faults.census()
        for d in compare(reference, load_run(census_dir)):
            faults.fail("instruments", d)
    rounds = []
    while not any(f["kind"] in ("instruments", "error") for f in faults.failures):
        rounds.append(faults.round(len(rounds), census, reference))
        if faults.schedule is not None or sum(faults.kills.values()) >= args.kills:
            break
        if args.fail_fast and faults.failures:
            break
    controls = {}
    if not args.no_controls:
        other_dir, _ = faults.reference("control-seed", args.train_seed + 1)
        other = compare(reference, load_run(other_dir))
        controls[f"train seed {args.train_seed + 1}"] = {"detected": bool(other), "differences": len(other),
                                                         "first": other[:5]}  # fmt: skip
        flipped = compare(reference, flip_one_bit(reference))
        controls["one optimizer bit flipped"] = {"detected": len(flipped) == 1, "differences": len(flipped),
                                                 "first": flipped[:5]}  # fmt: skip
        for k, c in controls.items():
            if not c["detected"]:
                faults.fail("control", f"{k}: the comparison did not report it")
    import torch

    by_category: Counter[str] = Counter()
    for point, n in faults.kills.items():
        by_category[category(point)] += n
    attempts = [a for r in rounds for a in r["attempts"]]
    summary = {
        "tool": "scripts/faults.py",
        "argv": sys.argv[1:],
        "seed": args.seed,
        "train_seed": args.train_seed,
        "steps": args.steps,
        "save_every": args.save_every,
        "keep_last": args.keep_last,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                 "torch": torch.__version__, "OMP_NUM_THREADS": child_env(code)["OMP_NUM_THREADS"]},  # fmt: skip
        "code": code_info,
        "wall_s": round(time.perf_counter() - started, 1),
        "reference_s": round(ref_seconds, 1),
        "kills": sum(faults.kills.values()),
        "kills_by_category": dict(sorted(by_category.items())),
        "kills_by_point": dict(sorted(faults.kills.items())),
        "rounds_run": len(rounds),
        "starts": len(attempts),
        "resumes": sum(1 for a in attempts if a["resume_from"]),
        "fresh_starts": sum(1 for a in attempts if not a["resume_from"]),
        "census": None if census is None else {"points": dict(sorted(census.total.items()))},
        "controls": controls,
        "checks": {kind: not any(f["kind"] == kind for f in faults.failures) for kind in KINDS},
        "failures": faults.failures,
        "result": "pass" if not faults.failures else "fail",
        "rounds": rounds,
        "workdir": str(workdir) if args.keep or args.workdir else None,
    }
    print(summarize(summary))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    if not (args.keep or args.workdir):
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if not faults.failures else 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kills", type=int, default=100, help="kill at least this many times (random mode)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps of the run")
    p.add_argument("--save-every", type=int, default=1)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--train-seed", type=int, default=0, help="the training run's seed")
    p.add_argument("--schedule", help="comma-separated kills, one per start, instead of random ones: POINT=N or "
                   "wall=SECONDS (see the module docstring for POINT); one round")  # fmt: skip
    p.add_argument("--max-kills-per-round", type=int, default=12)
    p.add_argument("--max-kills-at-end", type=int, default=2,
                   help="kills per round once the last step is checkpointed (only the outputs are left)")
    p.add_argument("--wall-fraction", type=float, default=0.2, help="share of random kills sent by the clock")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a start counts as hung")
    p.add_argument("--git-ref", help="test the qlora package of this commit (default: the working tree, copied)")
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--workdir", help="keep the runs and logs here (default: a temporary directory, removed)")
    p.add_argument("--keep", action="store_true", help="keep the runs of passing rounds too")
    p.add_argument("--fail-fast", action="store_true", help="stop after the first round with a failure")
    p.add_argument("--no-controls", action="store_true", help="skip the negative controls")
    # the worker (started by the parent)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kill", help=argparse.SUPPRESS)
    p.add_argument("--census", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        sys.exit(worker_main(arguments))
    sys.exit(parent_main(arguments))
