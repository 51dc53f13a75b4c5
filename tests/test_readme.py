"""The README's Python example runs as printed (the paths it names are the shared test assets)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def python_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python\n") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_example_is_short():
    lines = [line for line in python_example().splitlines() if line.strip()]
    assert len(lines) <= 16, f"the README's Python example has {len(lines)} lines"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "models" / "stories260K").is_dir(), reason=f"needs {SHARED}/models/stories260K")
def test_the_example_trains_saves_and_generates(tmp_path):
    code = python_example().replace("../shared", str(SHARED))
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert re.fullmatch(r"loss \d+\.\d{3}, held-out loss \d+\.\d{3}", lines[0]), lines
    assert len(lines) >= 2 and lines[1].strip(), "generation printed nothing"
    assert (tmp_path / "runs" / "python-example" / "adapter_model.safetensors").is_file()
