"""Fixtures of the serve tests: stories260K with a chat template (a copy of ../shared's model whose
tokenizer_config.json gains one, so chat requests run on the tiny model in milliseconds), and random adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

# BOS written by the template (the encoder must not add a second), EOS closing each turn.
TEMPLATE = ("{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{{ m['role'] }}: {{ m['content'] }}"
            "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")  # fmt: skip


@pytest.fixture(scope="session")
def stories_chat_dir(stories260k_dir, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("stories260K-chat")
    for f in stories260k_dir.iterdir():
        shutil.copyfile(f, directory / f.name)  # copyfile: the files, without ../shared's read-only modes
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return directory


@pytest.fixture(scope="session")
def stories_adapters(stories_chat_dir, tmp_path_factory) -> dict[str, Path]:
    """Two adapters of different ranks and random B for stories260K, by the names the server gives them."""
    root = tmp_path_factory.mktemp("adapters")
    return {"tell": _random_adapter(stories_chat_dir, root / "tell", seed=1, r=4),
            "wise": _random_adapter(stories_chat_dir, root / "wise", seed=2, r=8)}  # fmt: skip


def _random_adapter(model_dir: Path, directory: Path, seed: int, r: int) -> Path:
    """A PEFT adapter for `model_dir` on every projection, its B random (LoRA's zero B would change nothing)."""
    import qlora
    from qlora.adapter import adapter_state_dict, write_adapter
    from qlora.lora import LoraSpec

    spec = LoraSpec(r=r, alpha=2.0 * r, dropout=0.0)
    model = qlora.load_model(model_dir, "nf4", compute_dtype=torch.float32, device="cpu", lora=spec)
    tensors = adapter_state_dict(model)
    gen = torch.Generator().manual_seed(seed)
    for key, value in tensors.items():
        if ".lora_B." in key:
            tensors[key] = torch.randn(value.shape, generator=gen) * 0.5
    return write_adapter(tensors, directory, spec, str(model_dir))
