"""Regenerate tests/train/golden_losses.json: the first 8 losses of the fixed-seed tiny run.

Regenerate only when a change is *meant* to alter training numerics, and say why in the commit.
Run: .venv/bin/python tests/reference/golden_losses.py
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

from train_fixtures import tiny_config  # noqa: E402

from qlora.train.loop import train  # noqa: E402
from qlora.train.metrics import read_metrics  # noqa: E402

with tempfile.TemporaryDirectory() as out:
    train(tiny_config(out), progress=False)
    losses = [r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if r["kind"] == "train"]
path = Path(__file__).resolve().parents[1] / "train" / "golden_losses.json"
path.write_text(json.dumps({"losses": losses}, indent=1) + "\n")
print(path, losses)
