"""A random-weight Hugging Face Llama checkpoint on disk, with a tokenizer: what a user's model directory looks like.

`bench/train_cli.py` measures `qlora train` and the reference recipe the way users run them, from a
model directory. No real 7B checkpoint can reach the GPU machine (no network), so this module writes
one of Llama-2-7B's shape: `config.json`, bf16 safetensors sharded as Hugging Face shards them
(`model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`) and a tokenizer. Weights
are N(0, 0.02) (RMSNorm weights 1), the convention of `bench/llama_shapes.py` and the reference
script, so a run's loss starts near ln(vocab).

Host memory stays at one tensor: each tensor is drawn on the device (the GPU for 7B), copied out
and appended to its shard, whose safetensors header is written first from the shapes alone (the
format: a little-endian u64 header length, a JSON header of dtype, shape and byte offsets per
tensor, then the raw bytes in header order). 7B is 13.5 GB on disk.

The tokenizer is a Llama-style one (sentencepiece-like BPE over "▁"-prefixed words with byte
fallback; `<unk>`, `<s>`, `</s>` at ids 0-2 and the 256 byte pieces at 3-258, as Llama 2's), either
copied from a directory that has a `tokenizer.json` or trained here with the `tokenizers` library on
a local text file (Alpaca JSON records or plain text) up to the shape's vocabulary size; a small
corpus stops short of it (its words run out), which leaves the top embedding rows unused.
`tokenizer_config.json` names `PreTrainedTokenizerFast`, so transformers loads the file as written
and both sides of a benchmark tokenize identically.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
COMPLETE_MARK = ".random_checkpoint.json"  # written last: a directory without it is incomplete
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama 2
N_BYTE_PIECES = 256


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


SHAPES = {
    # tiny: for CPU tests; widths are multiples of 64 (the 4-bit block) and of 32 (bitsandbytes' CPU path).
    "tiny": Shape(hidden=128, intermediate=352, layers=2, heads=4, kv_heads=4, vocab=2048),
    "7b": Shape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),  # Llama-2-7B
}


def llama_config(shape: Shape) -> dict:
    """config.json of a Llama-2-style checkpoint of this shape."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "use_cache": True, "torch_dtype": "bfloat16",
    }  # fmt: skip


def tensor_shapes(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in Hugging Face's order: embeddings, layers, final norm, lm_head."""
    h, i, v = shape.hidden, shape.intermediate, shape.vocab
    kv = shape.kv_heads * (h // shape.heads)
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        ]  # fmt: skip
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], max_shard_bytes: int) -> list[list[tuple[str, tuple]]]:
    """Tensors in order, cut into shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, dims in tensors:
        nbytes = 2 * _numel(dims)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    return shards


def safetensors_header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The 8-byte length plus the JSON header of a bf16 safetensors file holding `tensors` in this order."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in tensors:
        end = offset + 2 * _numel(dims)
        entries[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, end]}
        offset = end
    header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(header)) + header


def _random_tensors(
    tensors: list[tuple[str, tuple[int, ...]]], device: torch.device, generator: torch.Generator
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, dims in tensors:
        if len(dims) == 1:  # RMSNorm weights
            yield name, torch.ones(dims, dtype=torch.bfloat16)
            continue
        t = torch.empty(dims, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=generator)
        yield name, t.to(torch.bfloat16).cpu()


def write_weights(directory: Path, shape: Shape, device: torch.device, *, max_shard_bytes: int, seed: int = 0) -> int:
    """Write the sharded safetensors and the index into `directory`; returns the bytes of weights written."""
    tensors = tensor_shapes(shape)
    shards = plan_shards(tensors, max_shard_bytes)
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, 1):
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        with open(directory / filename, "wb") as f:
            f.write(safetensors_header(shard))
            for name, tensor in _random_tensors(shard, device, generator):
                f.write(tensor.view(torch.uint8).numpy().data)  # bf16 bytes, little-endian as on disk
                weight_map[name] = filename
                total += tensor.numel() * 2
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return total


def corpus_texts(path: Path) -> Iterator[str]:
    """Text to train a tokenizer on: the string fields of Alpaca-style JSON/JSONL records, or a text file's lines."""
    if path.suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        lines = [x for x in text.splitlines() if x.strip()]
        records = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in lines]
        for record in records:
            for key in ("instruction", "input", "output", "text"):
                value = record.get(key) if isinstance(record, dict) else None
                if isinstance(value, str) and value.strip():
                    yield value
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.rstrip("\n")


def train_tokenizer(corpus: Path, vocab_size: int):
    """A Llama-style BPE `tokenizers.Tokenizer` trained on `corpus`, at most `vocab_size` ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    reserved = len(SPECIAL_TOKENS) + N_BYTE_PIECES
    if vocab_size <= reserved + 64:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for merges beyond the {reserved} reserved ids")
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    draft = Tokenizer(models.BPE())
    draft.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - reserved, min_frequency=2, show_progress=False)
    draft.train_from_iterator(corpus_texts(corpus), trainer)
    trained = json.loads(draft.to_str())["model"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b in range(N_BYTE_PIECES):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def write_tokenizer(directory: Path, source: Path, vocab_size: int) -> dict:
    """Tokenizer files into `directory`: copied from a directory with tokenizer.json, or trained on a text file."""
    if source.is_dir():
        if not (source / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{source}: no tokenizer.json (pass a directory that has one, or a text file)")
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, directory / name)
        from tokenizers import Tokenizer

        size = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size()
        how = f"copied from {source}"
    elif source.is_file():
        tok = train_tokenizer(source, vocab_size)
        tok.save(str(directory / "tokenizer.json"))
        size = tok.get_vocab_size()
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": True,
                  "add_eos_token": False, "model_max_length": 4096, "clean_up_tokenization_spaces": False}  # fmt: skip
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
        how = f"BPE trained on {source}"
    else:
        raise FileNotFoundError(f"--tokenizer-from {source}: no such file or directory")
    if size > vocab_size:
        raise ValueError(f"{source}: the tokenizer has {size} ids, more than the model's vocabulary of {vocab_size}")
    return {"tokenizer": how, "tokenizer_vocab": size}


@dataclass(frozen=True)
class CheckpointInfo:
    shape: str
    seed: int
    tokenizer_source: str
    tokenizer: str
    tokenizer_vocab: int
    weight_bytes: int
    shards: int
    write_s: float


def read_complete(directory: Path) -> CheckpointInfo | None:
    """The info of a complete checkpoint written by `write_checkpoint` in `directory`, else None."""
    try:
        return CheckpointInfo(**json.loads((directory / COMPLETE_MARK).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def write_checkpoint(
    directory: Path,
    shape_name: str,
    tokenizer_from: Path,
    device: torch.device,
    *,
    max_shard_bytes: int = 5 * 10**9,
    seed: int = 0,
) -> CheckpointInfo:
    """Write config.json, the weights and the tokenizer into `directory` (created); the completion mark last."""
    shape = SHAPES[shape_name]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / COMPLETE_MARK).unlink(missing_ok=True)
    for stale in directory.glob("model-*-of-*.safetensors"):  # another sharding's files would confuse the index
        stale.unlink()
    started = time.perf_counter()
    tok = write_tokenizer(directory, tokenizer_from, shape.vocab)
    (directory / "config.json").write_text(json.dumps(llama_config(shape), indent=2) + "\n", encoding="utf-8")
    nbytes = write_weights(directory, shape, device, max_shard_bytes=max_shard_bytes, seed=seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the device as it was for the runs that follow
    shards = len(list(directory.glob("model-*-of-*.safetensors")))
    seconds = round(time.perf_counter() - started, 2)
    info = CheckpointInfo(shape=shape_name, seed=seed, tokenizer_source=str(tokenizer_from), **tok,
                          weight_bytes=nbytes, shards=shards, write_s=seconds)  # fmt: skip
    (directory / COMPLETE_MARK).write_text(json.dumps(asdict(info), indent=2) + "\n", encoding="utf-8")
    return info
