#!/usr/bin/env bash
# Create (or reuse) the project-local venv in .venv and install qlora into it.
# Usage: scripts/setup_venv.sh [extra]   e.g. "test" installs the test-only references.
# torch is pinned to 2.13.0 first: the CPU machines have that wheel on local disk, and an unpinned
# torch would pull a multi-GB CUDA build. The package itself accepts torch >=2.4,<2.15.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${PIP[@]}" install "torch==2.13.0"
fi
stamp=".venv/.qlora-installed${extra:+-$extra}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    if [ -n "$extra" ]; then
        "${PIP[@]}" install -e ".[$extra]"
    else
        "${PIP[@]}" install -e .
    fi
    touch "$stamp"
fi
