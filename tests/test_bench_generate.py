"""bench/generate.py runs end to end on the CPU (the tiny shape, no reference): what the GPU run relies on."""

import json

import pytest

from bench.generate import main

ALPACA_REL = "data/instruct/alpaca_en_demo.json"


def test_the_decode_benchmark_smoke_run(shared_dir, tmp_path):
    corpus = shared_dir / ALPACA_REL
    if not corpus.exists():
        pytest.skip(f"needs {corpus}")
    out = tmp_path / "generate.json"
    assert main(["--device", "cpu", "--shape", "tiny", "--corpus", str(corpus), "--batches", "1,2", "--prompt-len",
                 "8", "--new-tokens", "5", "--repeats", "1", "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert {(r["adapter"], r["batch"]) for r in rows} == {(True, 1), (True, 2), (False, 1), (False, 2)}
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_s"] > 0 for r in rows)
