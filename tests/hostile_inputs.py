"""Builders of small real input files, and the bounds the hostile-input tests hold the readers to.

Shared by tests/checkpoint_io/test_corrupt_weights.py, tests/data/test_hostile_data.py,
tests/test_adapter_mismatch.py, tests/model/test_config_limits.py and tests/test_fuzz_readers.py:
a tiny Llama checkpoint directory (config.json + model.safetensors), the same model as a GGUF file
written by the `gguf` package's own writer, a PEFT adapter written by `qlora.adapter.write_adapter`,
Alpaca data as JSON, JSON Lines and CSV; the project's error types a reader may raise; and two
guards: `time_limit` (SIGALRM, so a hang fails the test instead of stalling it) and
`address_space_limit` (RLIMIT_AS, so an allocation sized by a lying header fails instead of
quietly reserving terabytes).
"""

from __future__ import annotations

import csv
import io
import json
import re
import resource
import signal
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from qlora.adapter import AdapterError, write_adapter
from qlora.checkpoint_io import CheckpointError, GGUFError
from qlora.config import ConfigError
from qlora.data import DataError
from qlora.lora import LoraSpec
from qlora.model import LlamaForCausalLM, ModelConfig, UnsupportedModelError

# Every error type a reader of a user's file may raise; anything else escaping is a bug.
PROJECT_ERRORS = (AdapterError, CheckpointError, ConfigError, DataError, GGUFError, UnsupportedModelError)

TINY_CONFIG = {
    "model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}  # fmt: skip
ADAPTER_SPEC = LoraSpec(r=2, alpha=4, dropout=0.0, targets=("q_proj", "v_proj"))
ALPACA = [
    {"instruction": "Say hi.", "input": "", "output": "Hi."},
    {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
    {"instruction": "Name a colour, \"quoted\", with, commas.", "input": "", "output": "Blue\nand green."},
]


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(ModelConfig.from_hf(TINY_CONFIG))
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def write_model_dir(root: Path, state: dict[str, torch.Tensor] | None = None, config: dict | None = None) -> Path:
    """config.json + model.safetensors of the tiny model (or of `state` / `config` as given)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config if config is not None else TINY_CONFIG))
    save_file(state if state is not None else tiny_state(), str(root / "model.safetensors"))
    return root


def write_gguf(path: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """The tiny model as a llama-architecture GGUF file, with a token list (metadata arrays to damage)."""
    import gguf  # an optional package: the callers skip without it

    from qlora.checkpoint_io.gguf_file import GGUF_TO_HF

    to_gguf = {re.compile(re.escape(hf).replace(r"\{\}", r"(\d+)") + "$"): g for g, hf in GGUF_TO_HF.items()}
    c = TINY_CONFIG
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_token_list([f"tok{i}" for i in range(c["vocab_size"])])
    w.add_token_types([1] * c["vocab_size"])
    for name, tensor in (state if state is not None else tiny_state()).items():
        for pattern, gguf_name in to_gguf.items():
            if m := pattern.match(name):
                w.add_tensor(gguf_name.format(*m.groups()), tensor.numpy())
                break
        else:
            raise KeyError(name)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def adapter_tensors(spec: LoraSpec = ADAPTER_SPEC, seed: int = 0) -> dict[str, torch.Tensor]:
    """PEFT-named A [r, in] and B [out, r] for every target of every layer of the tiny model."""
    g = torch.Generator().manual_seed(seed)
    c = TINY_CONFIG
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    out = {"q_proj": c["hidden_size"], "v_proj": c["num_key_value_heads"] * head_dim}
    tensors = {}
    for layer in range(c["num_hidden_layers"]):
        for target in spec.targets:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(spec.r, c["hidden_size"], generator=g)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out[target], spec.r, generator=g)
    return tensors


def write_adapter_dir(directory: Path, tensors: dict[str, torch.Tensor] | None = None,
                      spec: LoraSpec = ADAPTER_SPEC) -> Path:  # fmt: skip
    return write_adapter(tensors if tensors is not None else adapter_tensors(spec), directory, spec, "tiny")


def write_data(path: Path, records: list[dict] = ALPACA) -> Path:
    """`records` as .json (one array), .jsonl or .csv/.tsv, by `path`'s suffix."""
    suffix = path.suffix
    if suffix == ".json":
        path.write_text(json.dumps(records, indent=1))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(records[0]), delimiter="\t" if suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(records)
        path.write_text(text.getvalue())
    return path


class CaseTimeout(Exception):
    """A reader ran past `time_limit` on one input: a hang."""


@contextmanager
def time_limit(seconds: int):
    """Raise CaseTimeout in the main thread after `seconds` (a generous bound for a hang, not a speed test)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def ring(signum, frame):
        raise CaseTimeout(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _address_space_now() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmSize:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


@contextmanager
def address_space_limit(extra_bytes: int):
    """Cap this process's address space at its current size + `extra_bytes` (Linux; elsewhere no cap, and the
    context yields False). Any allocation a hostile header sizes beyond that fails at once, inside the reader
    under test, so it surfaces as an error of the wrong type rather than as memory quietly reserved."""
    now = _address_space_now()
    if now is None:
        yield False
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = now + extra_bytes
    if hard != resource.RLIM_INFINITY and cap > hard:
        yield False
        return
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield True
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def assert_project_error(error: BaseException, path: Path, case: str = "") -> None:
    """`error` is one of PROJECT_ERRORS and its message names `path`."""
    assert isinstance(error, PROJECT_ERRORS), f"{case}: {type(error).__name__} escaped: {error}"
    assert str(path) in str(error), f"{case}: the message does not name {path}: {error}"
