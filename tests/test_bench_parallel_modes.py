"""bench/parallel_modes.py runs `qlora train` alone and under torchrun (here on the CPU, gloo, tiny shape) and
reads what each run logged."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json"


@pytest.mark.slow
@pytest.mark.skipif(not ALPACA.exists(), reason=f"needs {ALPACA}")
def test_smoke_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    sys.path.insert(0, str(REPO))
    from bench.parallel_modes import main

    out = tmp_path / "modes.json"
    rc = main(["--shape", "tiny", "--device", "cpu", "--data", str(ALPACA), "--tokenizer-from", str(ALPACA),
               "--workdir", str(tmp_path), "--steps", "3", "--skip", "1", "--micro-batch", "2", "--grad-accum", "1",
               "--max-len", "64", "--variants", "one process,torchrun fsdp", "--out", str(out)])  # fmt: skip
    import json

    runs = json.loads(out.read_text())["runs"]
    assert rc == 0, [r.get("error") for r in runs]
    one, fsdp = runs
    assert fsdp["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert one["tokens_per_s_median"] > 0 and len(one["losses"]) == 3
    assert any("parallel: fsdp" in line for line in fsdp["mode_lines"])
    assert one["loaded"] and "host peak RSS" in one["loaded"][0]
