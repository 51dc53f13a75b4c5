"""Writing base (+ adapter, merged) as a GGUF file that llama.cpp runs, tokenizer and chat template included.

The inverse of `qlora.checkpoint_io.gguf_file`, using its literal name map (`GGUF_TO_HF`) backwards
and undoing its one layout translation: for llama.cpp's "llama" architecture (which also carries
Mistral, SmolLM2, TinyLlama) the rows of q_proj and k_proj (and their biases) are permuted within
each head from Hugging Face's rotate-half layout to llama.cpp's adjacent pairs: HF row
`h*hd + half*hd/2 + i` goes to GGUF row `h*hd + 2i + half` (heads = num_key_value_heads for k).
qwen2/qwen3 keep HF's layout. The round-trip test reads the file back through our own GGUF loader,
which undoes the permutation, and compares logits.

Tensor types follow llama.cpp's converter: 1-D tensors (norms, biases) are F32; matrices are
F16, BF16 or Q8_0 (`--type`), and a matrix whose rows are not a multiple of Q8_0's 32-element
block falls back to F16 (as llama.cpp does). F32 everywhere is available for exact checks.

Metadata: the `{arch}.*` hyper-parameters llama.cpp reads (context length, widths, heads, RMSNorm
epsilon, RoPE base, scaling, sliding window), `general.file_type`, and the tokenizer:
- a GGUF base: every `tokenizer.*` key is copied as it is (tokens, scores, types, merges, special
  ids, pre-tokenizer, chat template);
- a Hugging Face directory with a sentencepiece `tokenizer.model`: written by the `gguf` package's
  own `SentencePieceVocab` / `SpecialVocab` (what llama.cpp's converter uses);
- other tokenizers (byte-level BPE tokenizer.json) need llama.cpp's pre-tokenizer identification,
  which lives in its converter script, not in the `gguf` package: refused with an error that says
  to run llama.cpp's `convert_hf_to_gguf.py` on the `qlora merge` output instead.

Llama 3.1-style RoPE scaling is written as llama.cpp does: a `rope_freqs.weight` tensor of the
per-frequency divisors.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import torch

from qlora.checkpoint_io.gguf_file import GGUF_TO_HF
from qlora.export.merge import MergeError, TrainedBase, merged_weights, source_config
from qlora.loading import resolve_model_path
from qlora.model.config import ModelConfig
from qlora.model.llama import rope_inverse_frequencies

GGUF_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# Hugging Face model_type -> llama.cpp architecture.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_TO_GGUF = {hf: name for name, hf in GGUF_TO_HF.items()}


def hf_to_gguf_name(name: str) -> str:
    """GGUF name of a Hugging Face tensor name ('model.layers.3.mlp.up_proj.weight' -> 'blk.3.ffn_up.weight')."""
    match = _LAYER.match(name)
    template, layer = (f"model.layers.{{}}.{match.group(2)}", match.group(1)) if match else (name, None)
    if template not in _HF_TO_GGUF:
        raise MergeError(f"tensor {name!r} has no GGUF name (qlora.checkpoint_io.gguf_file.GGUF_TO_HF)")
    return _HF_TO_GGUF[template].format(layer) if layer is not None else _HF_TO_GGUF[template]


def permute_rotary_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp adjacent pairs per head (inverse of `unpermute_rotary_rows`)."""
    half = w.shape[0] // n_heads // 2
    # [heads*hd, ...] -> [heads, 2, hd/2, ...] -> [heads, hd/2, 2, ...] -> [heads*hd, ...]
    return w.reshape(n_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _add_hyperparameters(w: gguf.GGUFWriter, cfg: ModelConfig, raw: dict) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    if raw.get("sliding_window") and cfg.model_type == "mistral":
        w.add_sliding_window(int(raw["sliding_window"]))
    scaling = cfg.rope_scaling
    if scaling is not None and scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling is not None and scaling["rope_type"] == "llama3":
        w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))


def _add_tokenizer(w: gguf.GGUFWriter, source: Path, vocab_size: int) -> None:
    if source.suffix == ".gguf":
        reader = gguf.GGUFReader(source)
        for name, field in reader.fields.items():
            if name.startswith("tokenizer."):
                vtype = field.types[0]
                sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(name, field.contents(), vtype, sub_type)
        return
    if not (source / "tokenizer.model").is_file():
        raise MergeError(
            f"{source}: export-gguf builds the tokenizer from a GGUF base or a sentencepiece tokenizer.model; this "
            "directory has neither (a byte-level BPE tokenizer.json needs llama.cpp's pre-tokenizer detection). "
            "Run `qlora merge`, then llama.cpp's convert_hf_to_gguf.py on the merged directory."
        )
    vocab = gguf.SentencePieceVocab(source)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    w.add_tokenizer_model(vocab.tokenizer_model)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(source, load_merges=False, n_vocab=vocab_size).add_to_gguf(w, quiet=True)


def _encode(t: torch.Tensor, kind: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A float32 tensor as the array and GGML type the writer stores (1-D tensors always F32)."""
    data = t.float().contiguous().numpy()
    qtype = GGUF_TYPES[kind][0] if t.dim() > 1 else gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
        qtype = gguf.GGMLQuantizationType.F16  # llama.cpp's converter falls back the same way
    return gguf.quants.quantize(data, qtype), qtype


def export_gguf(
    model_path: str | Path,
    adapter_dir: str | Path | None,
    output: str | Path,
    *,
    kind: str = "f16",
    onto: str | None = None,
    base: TrainedBase | None = None,
) -> Path:
    """Write base (+ adapter, merged `onto` as in `qlora.export.merge`) to the GGUF file `output`."""
    if kind not in GGUF_TYPES:
        raise MergeError(f"GGUF type {kind!r} is not supported; choose one of {sorted(GGUF_TYPES)}")
    path = resolve_model_path(model_path)
    raw = source_config(path)
    cfg = ModelConfig.from_hf(raw)
    if cfg.model_type not in GGUF_ARCHITECTURES:
        raise MergeError(f"model_type {cfg.model_type!r} has no llama.cpp architecture here ({GGUF_ARCHITECTURES})")
    arch = GGUF_ARCHITECTURES[cfg.model_type]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(output, arch, use_temp_file=True)  # tensors spool to disk, not RAM
    w.add_name(path.stem if path.suffix == ".gguf" else path.name)
    w.add_file_type(GGUF_TYPES[kind][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)  # as llama.cpp's converter writes it
    _add_hyperparameters(w, cfg, raw)
    _add_tokenizer(w, path, cfg.vocab_size)
    if cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "llama3":
        plain = ModelConfig.from_hf({**raw, "rope_scaling": None, "rope_parameters": None})
        divisors = rope_inverse_frequencies(plain) / rope_inverse_frequencies(cfg)
        w.add_tensor("rope_freqs.weight", divisors.numpy().astype(np.float32))
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    for name, tensor in merged_weights(path, adapter_dir, onto, base):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        module = name.rsplit(".", 2)[-2]
        if arch == "llama" and module in heads:
            tensor = permute_rotary_rows(tensor, heads[module])
        data, qtype = _encode(tensor, kind)
        w.add_tensor(hf_to_gguf_name(name), data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return output
