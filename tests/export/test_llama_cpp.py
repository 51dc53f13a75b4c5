"""`qlora export-gguf` output runs in llama.cpp itself and gives our next-token logits.

llama.cpp comes from `llama-cpp-cffi` 0.3.1 (prebuilt manylinux_2_28 wheels on PyPI; `scripts/test.sh`
installs it into `.venv/llama-cpp`). Only its compiled CPU extension is used, loaded directly: the
package's `__init__` pulls in a transformers-4 chat formatter we do not need, and its metadata pins
transformers<5 (so it is installed --no-deps, apart from the venv). Newer releases (0.4.x) and
`llama-cpp-py-sync` were built against a newer libstdc++ / glibc than Debian 12's and do not load.

Tolerances (stories260K with the random test adapter, F32 export, last position, max |logit| 13.5):
llama.cpp's KV cache is set to F32, so only float32 summation order differs: measured 8.6e-6,
asserted 1e-4. With llama.cpp's default F16 KV cache the difference is 7.0e-3 and this test fails.
Negative control: the same weights written without llama.cpp's Q/K row permutation differ by 7.5,
asserted > 0.1.
"""

import importlib.machinery
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import qlora
from qlora.cli import main
from qlora.export import gguf_export

IDS = [1, 403, 407, 261, 378, 30, 5, 60, 2]
GGML_TYPE_F32 = 0  # ggml.h enum ggml_type


# scripts/test.sh installs llama-cpp-cffi here (--no-deps, --target: its metadata pins transformers<5).
LLAMA_CPP_DIR = Path(__file__).resolve().parents[2] / ".venv" / "llama-cpp" / "llama"


def llama_cpp_cpu():
    """The `_llama_cpp_cpu` cffi extension of llama-cpp-cffi, without running its package `__init__`."""
    spec = importlib.util.find_spec("llama")
    paths = [] if spec is None or spec.submodule_search_locations is None else list(spec.submodule_search_locations)
    found = [p for d in [*paths, LLAMA_CPP_DIR] for p in Path(d).glob("_llama_cpp_cpu.*.so")]
    if not found or importlib.util.find_spec("_cffi_backend") is None:
        pytest.skip("llama-cpp-cffi (llama.cpp's CPU build) and cffi are not installed")
    loader = importlib.machinery.ExtensionFileLoader("_llama_cpp_cpu", str(found[0]))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("_llama_cpp_cpu", loader))
    loader.exec_module(module)
    return module.lib, module.ffi


def llama_cpp_last_logits(path: Path, ids: list[int], n_vocab: int) -> torch.Tensor:
    """Decode `ids` in one batch with llama.cpp's C API and return the last position's logits."""
    lib, ffi = llama_cpp_cpu()
    lib.llama_backend_init()
    # llama.cpp renamed these in 2025; the wheel pinned may carry either name.
    load = getattr(lib, "llama_model_load_from_file", None) or lib.llama_load_model_from_file
    new_context = getattr(lib, "llama_init_from_model", None) or lib.llama_new_context_with_model
    free_model = getattr(lib, "llama_model_free", None) or lib.llama_free_model
    model = load(str(path).encode(), lib.llama_model_default_params())
    assert model != ffi.NULL, f"llama.cpp could not load {path}"
    params = lib.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 64
    params.n_threads = params.n_threads_batch = 1
    params.type_k = params.type_v = GGML_TYPE_F32  # default F16 cache would dominate the difference
    ctx = new_context(model, params)
    try:
        assert ctx != ffi.NULL, "llama.cpp could not create a context"
        tokens = ffi.new("llama_token[]", ids)
        assert lib.llama_decode(ctx, lib.llama_batch_get_one(tokens, len(ids))) == 0
        logits = lib.llama_get_logits_ith(ctx, -1)
        return torch.from_numpy(np.frombuffer(ffi.buffer(logits, 4 * n_vocab), dtype=np.float32).copy())
    finally:
        lib.llama_free(ctx)
        free_model(model)


def export(stories260k_dir, adapter, out) -> Path:
    rc = main(["export-gguf", "--model", str(stories260k_dir), "--adapter", str(adapter),
               "--output", str(out), "--type", "f32"])  # fmt: skip
    assert rc == 0
    return out


def test_llama_cpp_next_token_logits_match_ours(stories260k_dir, tmp_path, make_adapter, monkeypatch):
    llama_cpp_cpu()  # skip before any work when llama.cpp is absent
    make_adapter(stories260k_dir, tmp_path / "adapter")
    out = export(stories260k_dir, tmp_path / "adapter", tmp_path / "m.gguf")
    ours_model = qlora.load_model(out, None, compute_dtype=torch.float32, device="cpu")
    with torch.no_grad():
        ours = ours_model(torch.tensor([IDS]))[0, -1]
    theirs = llama_cpp_last_logits(out, IDS, ours.numel())
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)

    # Negative control: without llama.cpp's Q/K row permutation its rotary embedding pairs the
    # wrong dimensions, and the comparison above must see it.
    monkeypatch.setattr(gguf_export, "permute_rotary_rows", lambda w, n_heads: w)
    wrong = export(stories260k_dir, tmp_path / "adapter", tmp_path / "unpermuted.gguf")
    assert (llama_cpp_last_logits(wrong, IDS, ours.numel()) - ours).abs().max() > 0.1
