"""Reading a local Hugging Face checkpoint directory, one tensor at a time.

A Hugging Face model directory holds `config.json` and the weights, either in one
`model.safetensors` or in shards `model-0000k-of-0000n.safetensors` listed by
`model.safetensors.index.json` (`{"metadata": {...}, "weight_map": {tensor name: shard file}}`).
This module finds and validates those files and streams their tensors; it builds no model and
knows nothing about quantization, so the loader above it can quantize each weight as it arrives.

Why it is shaped so.
- `iter_tensors` yields `(name, tensor)` one at a time through `safetensors.safe_open`, which reads
  the header and memory-maps the file; `get_tensor` copies out just that tensor. We never build a
  shard's dict, so the extra host memory is one tensor (plus clean page cache the OS can drop), not
  one shard. The order is shard order (the index's first-appearance order), then the shard's own.
- Only safetensors. A `pytorch_model.bin` / `.pt` is a pickle, and unpickling runs arbitrary code
  from the file; we refuse it with an error saying so and how to convert.
- Strict bookkeeping, errors that name names: an index that lists a shard which is not on disk, an
  index that disagrees with a shard's header (a tensor listed but absent, or present but not
  listed), and, through `check_keys`, a checkpoint missing a parameter the model needs or carrying
  one it has no place for.
- `expected_keys(model)` reads the model's own state-dict names (fine on the meta device). A tied
  `lm_head.weight` is *optional*: many tied checkpoints omit it, some store a copy. Stale non-weight
  entries that old exports carry (`...rotary_emb.inv_freq`) are ignored.
- Pre-quantized bitsandbytes 4-bit checkpoints (`quantization_config.quant_method` "bitsandbytes",
  format-spec 1.6-1.7) store each quantized linear as six keys (`W`, `W.absmax`, `W.quant_map`,
  `W.quant_state.bitsandbytes__nf4`, and with double quantization `W.nested_absmax`,
  `W.nested_quant_map`). `iter_weights` reassembles them into one `QuantizedTensor` named `W`, so
  the loader uses the stored codes as they are. Which names are quantized is read from the headers
  first (no data), so a group may span shards; only one group's small tensors are held at a time.
- Damaged files are `CheckpointError`s naming the file. `safe_open` itself checks a header against
  the file before any tensor is read (length, JSON, dtype names, shape x dtype = byte span, offsets
  inside the file, no overlaps), so a truncated or lying header costs no allocation; we only turn its
  error into ours (`open_safetensors`). The JSON files (config.json, the index) are read by
  `read_json_file`: at most `MAX_JSON_BYTES`, and bad UTF-8, bad JSON or JSON nested past Python's
  recursion limit are errors naming the file too. `header_shapes` gives every tensor's shape from the
  headers alone, so the loader can compare a checkpoint with the model before allocating anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from qlora.quant.tensor import QuantizedTensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# Entries some exports carry that are not weights of the model (recomputed at init).
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Keys bitsandbytes stores beside a packed 4-bit weight `W` (as `W.<suffix>`), format-spec 1.6.
BNB_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
BNB_BLOB = "quant_state.bitsandbytes__"
# config.json, an index or adapter_config.json is a few KiB (a 2,000-shard index: ~0.3 MiB); a larger one is
# not one of them, and reading it would only spend memory (json holds ~10x the text).
MAX_JSON_BYTES = 64 << 20


class CheckpointError(ValueError):
    """A checkpoint directory or file is malformed, incomplete or in a refused format."""


class CheckpointKeyError(CheckpointError):
    """The checkpoint's tensor names do not match the model's (missing or unexpected keys)."""


def read_json_file(file: Path, error: type[Exception] = CheckpointError) -> Any:
    """The JSON value in `file`. Anything wrong (unreadable, larger than MAX_JSON_BYTES, not UTF-8, invalid JSON,
    nesting deeper than Python's recursion limit, an integer of more digits than Python converts) raises
    `error` with a message naming the file (and line:column where the JSON parser gives them)."""
    try:
        size = file.stat().st_size
        data = file.read_bytes() if size <= MAX_JSON_BYTES else None
    except OSError as e:
        raise error(f"{file}: cannot read the file: {e.strerror or e}") from None
    if data is None:
        raise error(f"{file}: {size:,} bytes, more than a JSON file of this kind can be ({MAX_JSON_BYTES:,})")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{file}: invalid UTF-8 at byte offset {e.start}") from None
    except json.JSONDecodeError as e:
        raise error(f"{file}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise error(f"{file}: the JSON is nested too deeply to read") from None
    except ValueError as e:  # json's int() of a number with more digits than Python converts
        raise error(f"{file}: invalid JSON: {e}") from None


@contextmanager
def open_safetensors(file: Path, error: type[Exception] = CheckpointError) -> Iterator[Any]:
    """`safe_open(file)` on the CPU; a damaged file (see the module docstring) raises `error` naming it."""
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise error(f"{file}: not a readable safetensors file ({e}); it is truncated or corrupt, "
                    "download or write it again") from None  # fmt: skip
    with handle as f:
        yield f


def read_tensor(f: Any, file: Path, key: str, error: type[Exception] = CheckpointError) -> torch.Tensor:
    """`f.get_tensor(key)`, its failure (a dtype torch cannot hold) an `error` naming the file and tensor."""
    try:
        return f.get_tensor(key)
    except (SafetensorError, TypeError, ValueError) as e:
        raise error(f"{file}: cannot read tensor {key!r}: {e}") from None


def read_config(path: str | Path) -> dict[str, Any]:
    """The directory's config.json as a dict; errors name the file."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {Path(path)}: expected a Hugging Face model directory")
    config = read_json_file(file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def _read_index(index_file: Path) -> dict[str, str]:
    index = read_json_file(index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_file}: has no 'weight_map' object mapping tensor names to shard files")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(
                f"{index_file}: tensor {name!r} maps to {shard!r}; expected a shard file name in the same directory"
            )
    return weight_map


def list_checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a model directory, in reading order.

    `model.safetensors` if present (as transformers prefers it), else the shards named by
    `model.safetensors.index.json`, each of which must exist.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {root}")
    single = root / SINGLE_FILE
    if single.is_file():
        return [single]
    index_file = root / INDEX_FILE
    if index_file.is_file():
        shards = list(dict.fromkeys(_read_index(index_file).values()))  # first-appearance order
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{index_file} lists shard(s) missing from {root}: {', '.join(missing)}; "
                "the download is incomplete, fetch the missing files"
            )
        return [root / s for s in shards]
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{root} holds only pickle checkpoint file(s) ({', '.join(pickles)}). We load safetensors only: "
            "unpickling runs code stored in the file. Convert once in a trusted environment, e.g. "
            "`transformers.AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`"
        )
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {root}")


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from a model directory one tensor at a time, on the CPU, as stored."""
    root = Path(path)
    files = list_checkpoint_files(root)
    index_file = root / INDEX_FILE
    listed: dict[str, set[str]] | None = None
    if files[0].name != SINGLE_FILE:
        listed = {}
        for name, shard in _read_index(index_file).items():
            listed.setdefault(shard, set()).add(name)
    seen: set[str] = set()
    for file in files:
        with open_safetensors(file) as f:
            keys = list(f.keys())
            if listed is not None:
                in_shard, in_index = set(keys), listed[file.name]
                absent, unlisted = sorted(in_index - in_shard), sorted(in_shard - in_index)
                if absent or unlisted:
                    raise CheckpointError(
                        f"{index_file} disagrees with shard {file.name}: "
                        + "; ".join(
                            part
                            for part in (
                                f"listed but absent: {_name_list(absent)}" if absent else "",
                                f"present but not listed: {_name_list(unlisted)}" if unlisted else "",
                            )
                            if part
                        )
                    )
            for key in keys:
                if key in seen:
                    raise CheckpointError(f"tensor {key!r} appears twice in {root} (again in {file.name})")
                seen.add(key)
                yield key, read_tensor(f, file, key)


def bnb_4bit_config(config: dict[str, Any], source: str = CONFIG_FILE) -> dict[str, Any] | None:
    """The `quantization_config` of a bitsandbytes 4-bit checkpoint; None for an unquantized one.

    Any other quantization method (8-bit, GPTQ, AWQ, ...) is refused: its keys would not load.
    """
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if (
        not isinstance(qc, dict)
        or qc.get("quant_method") != "bitsandbytes"
        or not (qc.get("load_in_4bit") or qc.get("_load_in_4bit"))
    ):
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise CheckpointError(
            f"{source}: quantization_config {method!r} is not supported; only bitsandbytes 4-bit "
            "(quant_method 'bitsandbytes', load_in_4bit) checkpoints load pre-quantized. Use the unquantized model."
        )
    return qc


def _tensor_names(files: list[Path]) -> list[str]:
    names = []
    for file in files:
        with open_safetensors(file) as f:
            names += list(f.keys())
    return names


def header_shapes(path: str | Path) -> dict[str, tuple[int, ...] | None]:
    """{name: shape} of every tensor `iter_weights(path)` yields, read from the headers alone (no tensor data);
    a bitsandbytes 4-bit weight's shape is None here (its logical shape is inside its quant-state blob)."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    for file in list_checkpoint_files(path):
        with open_safetensors(file) as f:
            names = f.keys()
            shapes.update((key, tuple(f.get_slice(key).get_shape())) for key in names)
    quantized = {n.partition("." + BNB_BLOB)[0] for n in shapes if "." + BNB_BLOB in n}
    if not quantized:
        return shapes
    out: dict[str, tuple[int, ...] | None] = {}
    for name, shape in shapes.items():
        owner = _bnb_owner(name, quantized)
        out[name if owner is None else owner] = shape if owner is None else None
    return out


def _bnb_owner(name: str, quantized: set[str]) -> str | None:
    """The packed-weight name a bitsandbytes key belongs to (itself for the packed weight), or None."""
    if name in quantized:
        return name
    for suffix in BNB_STATE_SUFFIXES:
        if name.endswith("." + suffix) and name[: -len(suffix) - 1] in quantized:
            return name[: -len(suffix) - 1]
    head, sep, tail = name.partition("." + BNB_BLOB)
    return head if sep and head in quantized else None


def iter_weights(path: str | Path) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """Like `iter_tensors`, with each bitsandbytes 4-bit group yielded as one `QuantizedTensor`."""
    root = Path(path)
    names = _tensor_names(list_checkpoint_files(root))
    quantized = {n.partition("." + BNB_BLOB)[0] for n in names if "." + BNB_BLOB in n}
    if not quantized:
        yield from iter_tensors(root)
        return
    expected: dict[str, set[str]] = {}
    for n in names:
        owner = _bnb_owner(n, quantized)
        if owner is not None:
            expected.setdefault(owner, set()).add(n)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in iter_tensors(root):
        owner = _bnb_owner(name, quantized)
        if owner is None:
            yield name, tensor
            continue
        group = pending.setdefault(owner, {})
        group[name] = tensor
        if set(group) == expected[owner]:
            del pending[owner]
            try:
                yield owner, QuantizedTensor.from_bnb_state_dict(group, prefix=owner)
            except (KeyError, ValueError) as e:
                raise CheckpointError(f"{root}: bitsandbytes 4-bit weight {owner!r}: {e}") from None


@dataclass(frozen=True)
class ExpectedKeys:
    """Tensor names a model needs (`required`) and may take (`optional`, e.g. a tied lm_head)."""

    required: frozenset[str]
    optional: frozenset[str] = field(default_factory=frozenset)


def expected_keys(model: torch.nn.Module) -> ExpectedKeys:
    """State-dict names of `model` (works on meta). lm_head.weight is optional when tied to the embedding."""
    state = model.state_dict(keep_vars=True)
    required = set(state)
    optional: set[str] = set()
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if head is not None and head is embed:
        required.discard("lm_head.weight")
        optional.add("lm_head.weight")
    return ExpectedKeys(frozenset(required), frozenset(optional))


def check_keys(seen: Iterable[str], expected: ExpectedKeys | Iterable[str], *, source: str = "checkpoint") -> None:
    """Raise CheckpointKeyError naming every missing and unexpected key; ignore IGNORED_KEY_SUFFIXES."""
    if not isinstance(expected, ExpectedKeys):
        expected = ExpectedKeys(frozenset(expected))
    seen = {k for k in seen if not k.endswith(IGNORED_KEY_SUFFIXES)}
    missing = sorted(expected.required - seen)
    unexpected = sorted(seen - expected.required - expected.optional)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) the model needs: {_name_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) the model has no place for: {_name_list(unexpected)}")
        raise CheckpointKeyError(
            f"{source} does not match the model: " + "; ".join(parts) + ". Check that config.json describes "
            "this checkpoint (model_type, num_hidden_layers, tie_word_embeddings, biases)."
        )


def _name_list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"
