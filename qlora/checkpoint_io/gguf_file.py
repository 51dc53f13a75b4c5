"""Reading a GGUF file (llama.cpp's format) as a Hugging Face checkpoint.

A GGUF file is one header of typed key/value metadata (architecture hyper-parameters under
`{arch}.*`, the tokenizer under `tokenizer.*`) followed by named tensors, each possibly quantized
in one of ggml's block formats (Q4_0, Q4_1, Q8_0, K-quants, ...). `read_gguf` turns it into what
the rest of the engine expects from a Hugging Face directory:

- `.hf_config`: a transformers-style config dict built from the metadata (architectures "llama",
  which llama.cpp also uses for Mistral/SmolLM2/TinyLlama, "qwen2" and "qwen3"), ready for
  `ModelConfig.from_hf`;
- `.metadata`: every key/value as plain Python (str, int, float, bool, lists of them), so the
  tokenizer can be built from `tokenizer.ggml.tokens` (list[str]), `tokenizer.ggml.merges`
  (list[str]), `tokenizer.ggml.token_type` (list[int]), `tokenizer.chat_template` (str), ...;
- `.iter_tensors()`: `(HF name, float32 tensor in HF shape)` one tensor at a time, dequantized by
  the `gguf` package's reference `gguf.quants.dequantize`. The file is memory-mapped, so the extra
  host memory is about one float32 tensor.

Three translations, each explicit:
1. Names: the literal `GGUF_TO_HF` map below (`blk.{}` is the layer index). A tensor name it does not
   know is an error naming it: silently dropping a weight would compute a different model.
2. Shapes: ggml lists dimensions innermost first (`ne0` = in_features), so a GGUF [in, out] matrix is
   the HF [out, in] weight; the byte order is already row-major [out, in].
3. Rotary layout: for the "llama" architecture llama.cpp's HF->GGUF converter permutes the rows of
   q_proj and k_proj within each head, because llama.cpp rotates adjacent pairs (2i, 2i+1) while
   HF rotates halves (i, i + hd/2). HF row `half * hd/2 + i` of head h is stored at GGUF row
   `h * hd + 2i + half`. We undo it: view the rows as [heads, hd/2, 2], swap to [heads, 2, hd/2],
   flatten (heads = num_key_value_heads for k_proj). Biases, if any, get the same row permutation.
   qwen2/qwen3 are stored in HF's layout (llama.cpp uses its NEOX rope for them): no permutation.
   The parity test against transformers' own GGUF loader on SmolLM2 proves the direction.

Llama 3.1/3.2 RoPE scaling is not in the metadata: the converter stores the per-frequency divisors
as a `rope_freqs.weight` tensor. We recover Meta's published parameters (low_freq_factor 1,
high_freq_factor 4, original context from `rope.scaling.original_context_length` or 8192, factor =
the largest divisor) and accept them only if they reproduce the stored divisors; otherwise the
file is refused with an error saying so. Linear scaling comes from `rope.scaling.type/factor`;
other scaling types (yarn, ...) are refused. Split files (`split.count` > 1) are refused: merge them
first with llama.cpp's `gguf-split --merge`.

A damaged or hostile file is one `GGUFError` naming it. The `gguf` package's reader trusts the header's
counts and lengths and slices its memory map without bounds checks, so a truncated file reads as
short arrays: an array whose length says 2^62 loops that many times appending empty ones (no error,
no end), and a tensor whose data lies past the end fails in a reshape. `check_gguf_layout` therefore
walks the header first with `struct`, checking every count, length, type, dimension and tensor
extent against the bytes the file has, in time linear in the header and no memory beyond a few
integers per tensor; only a file that passes is handed to the reader.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS
from gguf.quants import dequantize

from qlora.model.config import ModelConfig, UnsupportedModelError
from qlora.model.llama import rope_inverse_frequencies

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_HF_ARCHITECTURE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_output.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_gate.bias": "model.layers.{}.mlp.gate_proj.bias",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_up.bias": "model.layers.{}.mlp.up_proj.bias",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
    "blk.{}.ffn_down.bias": "model.layers.{}.mlp.down_proj.bias",
}
# Tensors that are not weights of the HF model: RoPE tables (folded into hf_config, or recomputed).
NON_WEIGHT_TENSORS = ("rope_freqs.weight", "blk.{}.attn_rot_embd")

# Meta's published Llama 3.1 RoPE scaling parameters (besides `factor`), see `_llama3_scaling`.
_LLAMA3_LOW_FREQ_FACTOR = 1.0
_LLAMA3_HIGH_FREQ_FACTOR = 4.0
_LLAMA3_ORIGINAL_CONTEXT = 8192


class GGUFError(ValueError):
    """A GGUF file we cannot read as a supported Hugging Face model; the message names the file."""


# Bytes of each scalar metadata value type (GGUF spec); STRING is a u64 length + bytes, ARRAY a u32 element
# type + u64 count + elements.
_SCALAR_BYTES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1, GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2, GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}  # fmt: skip
_MAX_ARRAY_DEPTH = 4  # arrays of arrays: nothing we read uses them; bounds the walk's recursion
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
_MAX_NAME_BYTES = 65535  # the spec's limit on a key; tensor names are far shorter (ggml: 64)


class _Cursor:
    """Reads a GGUF header in order, refusing any read that would pass the end of the file."""

    def __init__(self, path: Path, buffer: mmap.mmap, order: str):
        self.path, self.buffer, self.order, self.pos = path, buffer, order, 0

    def fail(self, what: str, detail: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what} at byte {self.pos:,}: {detail}; the file is truncated or corrupt")

    def take(self, n: int, what: str) -> int:
        if n > len(self.buffer) - self.pos:
            raise self.fail(what, f"needs {n:,} bytes but the file ends {len(self.buffer) - self.pos:,} bytes on")
        start, self.pos = self.pos, self.pos + n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from(self.order + "I", self.buffer, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from(self.order + "Q", self.buffer, self.take(8, what))[0]

    def name(self, what: str) -> str:
        n = self.u64(f"{what} length")
        if n > _MAX_NAME_BYTES:
            raise self.fail(what, f"a name of {n:,} bytes")
        raw = self.buffer[self.take(n, what) : self.pos]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(what, f"a name that is not UTF-8 ({e.reason} at its byte {e.start})") from None

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _SCALAR_BYTES:
            self.take(_SCALAR_BYTES[vtype], what)
        elif vtype == GGUFValueType.STRING:
            self.take(self.u64(f"{what} length"), what)
        elif vtype == GGUFValueType.ARRAY and depth < _MAX_ARRAY_DEPTH:
            itype, count = self.u32(f"{what} element type"), self.u64(f"{what} length")
            if itype in _SCALAR_BYTES:
                self.take(count * _SCALAR_BYTES[itype], what)
                return
            least = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}.get(itype)
            if least is None:
                raise self.fail(what, f"unknown array element type {itype}")
            if count * least > len(self.buffer) - self.pos:
                raise self.fail(what, f"an array of {count:,} elements cannot fit in the rest of the file")
            for i in range(count):
                self.skip_value(itype, f"{what}[{i}]", depth + 1)
        else:
            raise self.fail(what, f"unknown or too deeply nested value type {vtype}")


def check_gguf_layout(path: Path) -> None:
    """Walk the header of the GGUF file `path` (see the module docstring); GGUFError names what is wrong."""
    size = path.stat().st_size
    if size < 24:  # magic, version, tensor count, metadata count
        raise GGUFError(f"{path}: {size} bytes, too short for a GGUF header; the file is truncated or not GGUF")
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        if buffer[:4] != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (it starts with {bytes(buffer[:4])!r}, not b'GGUF')")
        version = struct.unpack_from("<I", buffer, 4)[0]
        order = ">" if version & 0xFFFF == 0 else "<"  # as GGUFReader: a big-endian file reads as 0x0N000000
        version = struct.unpack_from(order + "I", buffer, 4)[0]
        if version not in READER_SUPPORTED_VERSIONS:
            raise GGUFError(f"{path}: GGUF version {version} is not supported (supported: {READER_SUPPORTED_VERSIONS})")
        cur = _Cursor(path, buffer, order)
        cur.pos = 8
        tensor_count, kv_count = cur.u64("the tensor count"), cur.u64("the metadata count")
        if kv_count * 13 > size or tensor_count * 24 > size:  # the smallest entry of each kind
            raise cur.fail("the header", f"{tensor_count:,} tensors and {kv_count:,} metadata entries cannot fit")
        alignment = 32  # GGUF's default: general.alignment
        for i in range(kv_count):
            key = cur.name(f"metadata key {i}")
            vtype = cur.u32(f"the type of {key!r}")
            if key == "general.alignment" and vtype == GGUFValueType.UINT32:
                alignment = struct.unpack_from(order + "I", buffer, cur.pos)[0] if cur.pos + 4 <= size else 0
            cur.skip_value(vtype, f"metadata {key!r}")
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{path}: general.alignment {alignment} is not a power of two")
        extents = []
        for i in range(tensor_count):
            name = cur.name(f"the name of tensor {i}")
            n_dims = cur.u32(f"the dimension count of tensor {name!r}")
            if n_dims > _MAX_DIMS:
                raise cur.fail(f"tensor {name!r}", f"{n_dims} dimensions (at most {_MAX_DIMS})")
            dims = [cur.u64(f"the dimensions of tensor {name!r}") for _ in range(n_dims)]
            raw_type, offset = cur.u32(f"the type of tensor {name!r}"), cur.u64(f"the offset of tensor {name!r}")
            try:
                ttype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise cur.fail(f"tensor {name!r}", f"unknown tensor type {raw_type}") from None
            block, type_bytes = GGML_QUANT_SIZES[ttype]
            if dims and dims[0] % block:
                raise cur.fail(f"tensor {name!r}", f"{ttype.name} rows of {dims[0]} values, not whole {block}-blocks")
            extents.append((name, ttype, dims, offset, math.prod(dims) // block * type_bytes))
        data_start = cur.pos + (-cur.pos % alignment)
        for name, ttype, dims, offset, nbytes in extents:
            if data_start + offset + nbytes > size:
                raise GGUFError(
                    f"{path}: tensor {name!r} ({ttype.name} {dims}, {nbytes:,} bytes at data offset {offset:,}) "
                    f"ends past the end of the file ({size:,} bytes); the file is truncated or corrupt"
                )


def _template(name: str) -> tuple[str, int | None]:
    """'blk.12.attn_q.weight' -> ('blk.{}.attn_q.weight', 12); other names unchanged."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
        return ".".join(["blk", "{}", *parts[2:]]), int(parts[1])
    return name, None


def gguf_to_hf_name(name: str) -> str | None:
    """HF name of a GGUF tensor, None for NON_WEIGHT_TENSORS; KeyError naming an unknown one."""
    template, layer = _template(name)
    if template in NON_WEIGHT_TENSORS or template.rsplit(".", 1)[0] in NON_WEIGHT_TENSORS:
        return None
    if template not in GGUF_TO_HF:
        raise KeyError(f"unknown GGUF tensor {name!r}: no Hugging Face name for it in GGUF_TO_HF")
    hf = GGUF_TO_HF[template]
    return hf.format(layer) if layer is not None else hf


def unpermute_rotary_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head q/k row interleave: GGUF row h*hd + 2i + half -> HF row h*hd + half*hd/2 + i."""
    rows = w.shape[0]
    if rows % (2 * n_heads) != 0:
        raise ValueError(f"cannot unpermute {rows} rows into {n_heads} heads of even width")
    half = rows // n_heads // 2
    # [heads*hd, ...] -> [heads, hd/2, 2, ...] -> [heads, 2, hd/2, ...] -> [heads*hd, ...]
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class GGUFCheckpoint:
    """A GGUF file opened for reading (memory-mapped). Build it with `read_gguf`."""

    path: Path
    metadata: dict[str, Any]
    hf_config: dict[str, Any]
    reader: GGUFReader = field(repr=False)

    def tensor_names(self) -> list[str]:
        """HF names of the weights `iter_tensors` yields, in file order (no data is read)."""
        return [hf for t in self.reader.tensors if (hf := self._hf_name(t.name)) is not None]

    def _hf_name(self, name: str) -> str | None:
        try:
            return gguf_to_hf_name(name)
        except KeyError as e:
            raise GGUFError(f"{self.path}: {e.args[0]}") from None

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, float32 CPU tensor in HF shape and row order), one at a time."""
        # llama.cpp's "llama" architecture (which also carries Mistral) stores q/k rows interleaved
        permute = self.metadata.get("general.architecture") == "llama"
        heads = {
            "q_proj": self.hf_config["num_attention_heads"],
            "k_proj": self.hf_config["num_key_value_heads"],
        }
        for t in self.reader.tensors:
            hf = self._hf_name(t.name)
            if hf is None:
                continue
            try:
                values = dequantize(t.data, t.tensor_type)
                shape = tuple(int(d) for d in reversed(t.shape))  # ggml: innermost first; HF: [out, in]
                if not values.flags.writeable:  # F32/F16 come back as views of the read-only mapping
                    values = values.copy()
                tensor = torch.from_numpy(values.astype(np.float32, copy=False).reshape(shape))
                proj = hf.split(".")[-2]
                if permute and proj in heads:
                    tensor = unpermute_rotary_rows(tensor, heads[proj])
            except (NotImplementedError, ValueError) as e:
                raise GGUFError(f"{self.path}: tensor {t.name!r} of type {t.tensor_type.name}: {e}") from e
            yield hf, tensor

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """{HF name: HF shape} of the weights `iter_tensors` yields, from the header (no data is read)."""
        return {hf: tuple(int(d) for d in reversed(t.shape)) for t in self.reader.tensors
                if (hf := self._hf_name(t.name)) is not None}  # fmt: skip


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Open a GGUF file: metadata, transformers-style config, and a tensor iterator."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        check_gguf_layout(path)
        reader = GGUFReader(path, "r")
    except GGUFError:
        raise
    except Exception as e:  # OSError; the gguf package raises ValueError/KeyError/... on what the walk lets by
        raise GGUFError(f"{path}: not a readable GGUF file: {e}") from e
    try:
        metadata = {k: _plain(f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        if int(metadata.get("split.count", 1)) > 1:
            raise GGUFError(
                f"{path} is part {metadata.get('split.no', 0) + 1} of a {metadata['split.count']}-file split GGUF; "
                "merge the parts first (llama.cpp: `llama-gguf-split --merge first.gguf merged.gguf`)"
            )
        hf_config = _hf_config(metadata, reader)
    except (GGUFError, UnsupportedModelError) as e:
        raise type(e)(e.args[0] if str(path) in e.args[0] else f"{path}: {e}") from e
    except (KeyError, ValueError, TypeError, IndexError, ArithmeticError) as e:  # metadata of the wrong type
        raise GGUFError(f"{path}: {e.args[0] if e.args else e}") from e
    checkpoint = GGUFCheckpoint(path=path, metadata=metadata, hf_config=hf_config, reader=reader)
    checkpoint.tensor_names()  # fail now, naming it, on a tensor we cannot map
    return checkpoint


def _float32_decimal(value: float) -> float:
    """GGUF stores float32: recover the decimal the converter wrote (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _hf_config(md: dict[str, Any], reader: GGUFReader) -> dict[str, Any]:
    arch = md.get("general.architecture")
    if arch is None:
        raise ValueError("no general.architecture in the metadata")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = KeyError) -> Any:
        full = f"{arch}.{key}"
        if full in md:
            return md[full]
        if default is KeyError:
            raise KeyError(f"metadata key {full!r} is missing")
        return default

    tensors = {t.name: t for t in reader.tensors}
    heads = int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise UnsupportedModelError("per-layer attention.head_count_kv (a list) is not supported")
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise UnsupportedModelError("attention.value_length != attention.key_length is not supported")
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UnsupportedModelError(
            f"rope.dimension_count {rope_dim} != head dim {head_dim}: partial rotary embeddings are not supported"
        )
    vocab = get("vocab_size", None)
    if vocab is None:
        vocab = len(md["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in md else None
    if vocab is None:
        vocab = int(tensors["token_embd.weight"].shape[1])
    config: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURE[arch]],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": _float32_decimal(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_decimal(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
    }
    if arch in ("llama", "qwen3"):
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if arch == "llama":
        config["mlp_bias"] = "blk.0.ffn_gate.bias" in tensors
    window = get("attention.sliding_window", None)
    if window is not None:
        if arch != "llama" or config["attention_bias"] or config["mlp_bias"]:
            raise UnsupportedModelError(f"attention.sliding_window with architecture {arch!r} is not supported")
        config["model_type"] = "mistral"  # a llama-arch file with a window is a Mistral (v0.1)
        config["architectures"] = ["MistralForCausalLM"]
        config["sliding_window"] = int(window)
    config["rope_scaling"] = _rope_scaling(config, md, arch, tensors)
    return config


def _rope_scaling(config: dict[str, Any], md: dict[str, Any], arch: str, tensors: dict) -> dict | None:
    kind = md.get(f"{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in tensors:
        if kind not in ("none", "llama3"):
            raise UnsupportedModelError(f"rope_freqs.weight together with rope.scaling.type {kind!r}")
        t = tensors["rope_freqs.weight"]
        divisors = torch.from_numpy(dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1))
        return _llama3_scaling(config, md, arch, divisors)
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float32_decimal(md[f"{arch}.rope.scaling.factor"])}
    raise UnsupportedModelError(f"RoPE scaling type {kind!r} is not supported (supported: none, linear, llama3)")


def _llama3_scaling(config: dict[str, Any], md: dict[str, Any], arch: str, divisors: torch.Tensor) -> dict:
    """Llama 3.1-style parameters that reproduce the stored per-frequency divisors, or an error."""
    scaling = {
        "rope_type": "llama3",
        "factor": _float32_decimal(float(divisors.max())),
        "low_freq_factor": _LLAMA3_LOW_FREQ_FACTOR,
        "high_freq_factor": _LLAMA3_HIGH_FREQ_FACTOR,
        "original_max_position_embeddings": int(
            md.get(f"{arch}.rope.scaling.original_context_length", _LLAMA3_ORIGINAL_CONTEXT)
        ),
    }
    base = ModelConfig.from_hf({**config, "rope_scaling": None})
    scaled = ModelConfig.from_hf({**config, "rope_scaling": scaling})
    expected = rope_inverse_frequencies(base) / rope_inverse_frequencies(scaled)
    if expected.shape != divisors.shape or not torch.allclose(expected, divisors, rtol=1e-5, atol=0):
        raise UnsupportedModelError(
            "rope_freqs.weight does not match Llama 3.1-style scaling with Meta's published parameters "
            f"({scaling}); this RoPE variant is not supported"
        )
    return scaling
