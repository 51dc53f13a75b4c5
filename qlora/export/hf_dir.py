"""Writing a Hugging Face model directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    config.json                          the source's config, `dtype`/`torch_dtype` set to what was written
    generation_config.json               copied, or bos/eos ids from the config
    model.safetensors                    one file when the weights fit `max_shard_bytes`, else
    model-0000k-of-0000n.safetensors     shards plus model.safetensors.index.json
      + model.safetensors.index.json     ({"metadata": {"total_size": bytes}, "weight_map": {name: file}})
    tokenizer files                      copied from a model directory, or built from a GGUF's metadata

Why it is shaped so. Tensors arrive one at a time (merging streams the checkpoint), so the writer
fills a shard and flushes it; the number of shards is only known at the end, so shards are written
under temporary names and renamed once the count is known (transformers' naming is 1-based
`model-00001-of-00003.safetensors`). Nothing in the output directory is half-written if the
process dies before `finish`: the index and final names appear last.

A GGUF base carries no tokenizer files; its tokenizer is rebuilt from the metadata by
`qlora.tokenizer.Tokenizer` and saved as `tokenizer.json` (the `tokenizers` library's own
serialisation) plus a `tokenizer_config.json` naming the special tokens and the chat template.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qlora.checkpoint_io.safetensors_dir import INDEX_FILE, SINGLE_FILE
from qlora.precision import DTYPES, dtype_name

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3  # 2 GiB, a common Hub shard size
# Files of a model directory that describe the tokenizer (transformers' names) and are copied as they are.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
GENERATION_CONFIG = "generation_config.json"


class ShardedSafetensorsWriter:
    """Collect tensors into safetensors shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._current: dict[str, torch.Tensor] = {}
        self._current_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._current and self._current_bytes + size > self.max_shard_bytes:
            self._flush()
        self._current[name] = tensor.detach().cpu().contiguous()
        self._current_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self._shards):05d}.tmp"
        save_file(self._current, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._current)))
        self._current, self._current_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Write the last shard, give the shards their final names and write the index if sharded."""
        if self._current or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            final = self.directory / SINGLE_FILE
            self._shards[0][0].replace(final)
            return [final]
        weight_map, files = {}, []
        for k, (tmp, names) in enumerate(self._shards, start=1):
            final = self.directory / f"model-{k:05d}-of-{n:05d}.safetensors"
            tmp.replace(final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return files


def write_config(directory: Path, config: dict[str, Any], dtype: torch.dtype, **extra: Any) -> dict[str, Any]:
    """config.json: the source config with its dtype (one of qlora.precision.DTYPES) set and any old
    quantization_config dropped."""
    name = dtype_name(dtype)
    if name not in DTYPES:
        raise ValueError(f"cannot write a model in {dtype}: the written dtype is one of {', '.join(DTYPES)}")
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    out["dtype"] = out["torch_dtype"] = name
    out.update(extra)
    (Path(directory) / "config.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def write_generation_config(directory: Path, source: Path, config: dict[str, Any]) -> None:
    """Copy the source's generation_config.json, or write one holding the config's bos/eos/pad ids."""
    src = source / GENERATION_CONFIG if source.is_dir() else None
    if src is not None and src.is_file():
        shutil.copyfile(src, Path(directory) / GENERATION_CONFIG)
        return
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    (Path(directory) / GENERATION_CONFIG).write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")


def write_tokenizer(directory: Path, source: Path) -> list[str]:
    """Copy the tokenizer files of a model directory, or build them from a GGUF file. Returns the names."""
    directory = Path(directory)
    if source.is_dir():
        copied = [n for n in TOKENIZER_FILES if (source / n).is_file()]
        if not copied:
            raise FileNotFoundError(f"{source}: no tokenizer files to copy (looked for {', '.join(TOKENIZER_FILES)})")
        for name in copied:
            shutil.copyfile(source / name, directory / name)
        return copied
    from qlora.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(source)
    # The wrapper keeps its `tokenizers` backend private; its own serialisation is the faithful copy.
    tokenizer._backend.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    for name in ("bos", "eos", "pad", "unk"):
        token = getattr(tokenizer, f"{name}_token")
        if token is not None:
            config[f"{name}_token"] = token
    written = ["tokenizer.json", "tokenizer_config.json"]
    if tokenizer.chat_template is not None:
        (directory / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
        written.append("chat_template.jinja")
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return written
