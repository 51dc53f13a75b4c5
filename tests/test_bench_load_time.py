"""bench/load_time.py on the CPU: every phase of a real load is charged, and the wrappers leave the loader as found."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

import qlora.loading  # noqa: E402
from bench.load_time import PHASES, main  # noqa: E402
from qlora.lora import LoRALinear  # noqa: E402
from qlora.model.llama import LlamaForCausalLM  # noqa: E402


def test_phases_are_charged_and_sum_to_the_total(stories260k_dir, tmp_path):
    before = (qlora.loading._to_device, qlora.loading.iter_weights, LoRALinear.set_base_weight,
              LlamaForCausalLM.__dict__["from_config"])  # fmt: skip
    out = tmp_path / "rows.json"
    main([str(stories260k_dir), "--device", "cpu", "--repeat", "1", "--lora-r", "4", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    timed, plain = rows
    assert timed["probes"] and not plain["probes"] and set(PHASES) <= set(timed)
    for phase in PHASES[:-1]:  # each wrapper really saw its calls ("other" is the remainder)
        assert timed[phase] > 0, phase
    assert abs(sum(timed[p] for p in PHASES) - timed["total"]) < 1e-9  # "other" is the remainder: float rounding only
    assert timed["other"] >= 0  # no phase counted twice
    after = (qlora.loading._to_device, qlora.loading.iter_weights, LoRALinear.set_base_weight,
             LlamaForCausalLM.__dict__["from_config"])  # fmt: skip
    assert after == before
