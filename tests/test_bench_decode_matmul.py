"""bench/decode_matmul.py on the CPU: its smoke run (tiny shapes, the kernel through Triton's interpreter) times the
three implementations at every shape and row count, checks each result against the tolerance, and writes its JSON.
The GPU run (Llama-2-7B's shapes) is an explicit invocation (the module's docstring), not a test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from bench.decode_matmul import SMOKE_ROWS, SMOKE_SHAPES, main  # noqa: E402


def test_cpu_smoke_run_times_every_implementation_within_tolerance(tmp_path, capsys):
    out = tmp_path / "decode.json"
    rows = main(["--device", "cpu", "--out", str(out)])
    impls = ["matmul_4bit", "dequant+mm", "dense bf16"]
    want = [(name, m, impl) for name in SMOKE_SHAPES for m in SMOKE_ROWS for impl in impls]
    assert [(r["shape"], r["M"], r["impl"]) for r in rows] == want
    assert all(r["within_tolerance"] and r["us"] > 0 and r["weight GB/s"] > 0 for r in rows)
    ours = [r for r in rows if r["impl"] == "matmul_4bit"]
    assert all(r["eager us"] > 0 and r["vs dequant+mm"] > 0 for r in ours)
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["rows"] == rows and saved["info"]["reps"] == 1
    assert "| matmul_4bit |" in capsys.readouterr().out


def test_the_sweep_times_both_paths_and_a_gpu_run_refuses_too_few_reps():
    from bench.decode_matmul import sweep_launches

    launches = sweep_launches(1)
    assert {launch.get("use_dot") for launch in launches} == {True, False, None}
    assert all(launch.get("use_dot", True) for launch in sweep_launches(32))  # no CUDA-core path for 32 rows
    with pytest.raises(SystemExit, match="CUDA GPU|at least 50"):
        main(["--device", "cuda", "--reps", "10"])
