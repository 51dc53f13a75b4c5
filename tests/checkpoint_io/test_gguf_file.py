"""GGUF reading: names, shapes, the llama q/k row unpermute, config from metadata, parity with transformers.

Synthetic files are written in-test with the `gguf` package's own writer and its own HF->GGUF name
map (`gguf.get_tensor_name_map`, what llama.cpp's converter uses), so our literal map is checked
against an independent source. The real SmolLM2-135M-Instruct Q4_1 file checks the whole path
against transformers' own GGUF loader.
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from qlora.checkpoint_io import GGUFError, check_keys, expected_keys, read_gguf
from qlora.checkpoint_io.gguf_file import GGUF_TO_HF, unpermute_rotary_rows
from qlora.model import LlamaForCausalLM, ModelConfig, UnsupportedModelError

SHAPE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
)  # fmt: skip
GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}


def llamacpp_interleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's HF->GGUF converter does to llama q/k rows: per head, HF row half*hd/2 + i
    (rotate_half pairs) goes to row 2i + half (adjacent pairs)."""
    hd = w.shape[0] // n_heads
    # [heads*hd, ...] -> [heads, 2 (half), hd/2 (i), ...] -> [heads, hd/2, 2, ...]
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def test_unpermute_inverts_the_converter_and_is_not_the_identity():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of width 8
    stored = llamacpp_interleave(w, 2)
    assert not torch.equal(stored, w)
    assert torch.equal(unpermute_rotary_rows(stored, 2), w)
    # row 1 of head 0 in HF layout (half 0, i 1) is stored at row 2*1 + 0 = 2; row 4 (half 1, i 0) at 1
    assert torch.equal(stored[2], w[1]) and torch.equal(stored[1], w[4])
    bias = torch.arange(16.0)
    assert torch.equal(unpermute_rotary_rows(llamacpp_interleave(bias, 2), 2), bias)


@pytest.mark.parametrize("arch", list(GGUF_ARCH))
def test_literal_name_map_agrees_with_gguf_py(arch):
    tmap = gguf.get_tensor_name_map(GGUF_ARCH[arch], 3)
    checked = 0
    for gguf_name, hf_name in GGUF_TO_HF.items():
        hf = hf_name.format(2)
        theirs = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if theirs is None:  # e.g. q_norm for llama: not a tensor of that architecture
            continue
        assert theirs == gguf_name.format(2), (hf, theirs)
        checked += 1
    assert checked >= 15


def hf_model(arch: str, seed: int = 0, **extra):
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    config = cls(**SHAPE, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # O(1) logits and non-unit norms, as in tests/model/test_llama_parity.py
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else noise / math.sqrt(p.shape[-1]))
    return model


def write_gguf(path, model, arch: str, *, extra_tensors=(), rope_freqs=None, q8_0=()):
    """Write `model` the way llama.cpp's converter lays it out (names, shapes, llama q/k interleave)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_token_list([f"tok{i}" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if getattr(cfg, "sliding_window", None) is not None:  # llama.cpp writes Mistral v0.1 as "llama" + window
        w.add_sliding_window(cfg.sliding_window)
    tmap = gguf.get_tensor_name_map(GGUF_ARCH[arch], cfg.num_hidden_layers)
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = tensor.detach().clone()
        proj = name.split(".")[-2]
        if arch == "llama" and proj in heads:
            t = llamacpp_interleave(t, heads[proj])
        gguf_name = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if name in q8_0:
            q = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name, t.numpy())
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.numpy())
    for name, array in extra_tensors:
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load_ours(checkpoint) -> LlamaForCausalLM:
    cfg = ModelConfig.from_hf(checkpoint.hf_config)
    model = LlamaForCausalLM.from_config(cfg, device="meta")
    state = dict(checkpoint.iter_tensors())
    check_keys(state, expected_keys(model), source=str(checkpoint.path))
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True, "attention_bias": True}),  # biases are interleaved too
        ("mistral", {"sliding_window": 5}),  # written as arch "llama": interleaved q/k, plus a window
        ("qwen2", {}),
        ("qwen3", {"head_dim": 32}),
    ],
    ids=["llama", "llama-tied-bias", "mistral-window", "qwen2", "qwen3"],
)
@torch.no_grad()
def test_synthetic_gguf_gives_the_transformers_model(tmp_path, arch, extra):
    reference = hf_model(arch, **extra)
    write_gguf(tmp_path / "m.gguf", reference, "llama" if arch == "mistral" else arch)
    checkpoint = read_gguf(tmp_path / "m.gguf")
    c = checkpoint.hf_config
    assert c["model_type"] == arch and c.get("sliding_window") == extra.get("sliding_window")
    assert c["tie_word_embeddings"] == reference.config.tie_word_embeddings
    head_dim = extra.get("head_dim", SHAPE["hidden_size"] // SHAPE["num_attention_heads"])
    assert (c["num_key_value_heads"], c["head_dim"], c["rms_norm_eps"]) == (2, head_dim, 1e-5)
    ours = load_ours(checkpoint)
    assert ours.config.attention_bias == (arch == "qwen2" or bool(extra.get("attention_bias")))
    x = torch.randint(0, SHAPE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours(x), reference(x).logits)
    names = {name for name, _ in checkpoint.iter_tensors()}
    assert names == set(checkpoint.tensor_names())


def test_quantized_tensors_come_back_in_hf_orientation(tmp_path):
    reference = hf_model("llama")
    name = "model.layers.0.mlp.gate_proj.weight"
    weight = reference.state_dict()[name]  # [80, 64]: not square, so a transposed read would show
    write_gguf(tmp_path / "m.gguf", reference, "llama", q8_0=(name,))
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.ffn_gate.weight"] == gguf.GGMLQuantizationType.Q8_0
    got = dict(read_gguf(tmp_path / "m.gguf").iter_tensors())[name]
    assert got.shape == weight.shape and got.dtype == torch.float32
    # Q8_0: blocks of 32 along a row, d = absmax / 127, q = round(x / d), stored d rounded to fp16
    # (relative error <= 2^-11). |x - q * fp16(d)| <= d/2 + 127 * d * 2^-11 = 0.562 d.
    step = weight.reshape(-1, 32).abs().amax(-1, keepdim=True) / 127
    err = (got.reshape(-1, 32) - weight.reshape(-1, 32)).abs()
    assert (err <= 0.563 * step).all()
    assert not torch.equal(got, weight)  # it really went through quantization


def test_llama31_rope_freqs_tensor_becomes_rope_scaling(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}  # fmt: skip
    reference = hf_model("llama", rope_parameters=rope)
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](reference.config)
    divisors = plain / scaled  # what the converter stores: 1 (high freq) .. factor (low freq)
    assert divisors.max() == pytest.approx(8.0) and divisors.min() == pytest.approx(1.0)
    write_gguf(tmp_path / "m.gguf", reference, "llama", rope_freqs=divisors)
    checkpoint = read_gguf(tmp_path / "m.gguf")
    expected = {k: v for k, v in rope.items() if k != "rope_theta"}
    assert checkpoint.hf_config["rope_scaling"] == expected
    assert "rope_freqs.weight" not in [n for n in checkpoint.tensor_names()]
    x = torch.randint(0, SHAPE["vocab_size"], (1, 12))
    positions = torch.arange(5000, 5012)[None]  # far positions, where the scaled frequencies matter
    with torch.no_grad():
        torch.testing.assert_close(load_ours(checkpoint)(x, position_ids=positions),
                                   reference(x, position_ids=positions).logits)  # fmt: skip

    write_gguf(tmp_path / "odd.gguf", reference, "llama", rope_freqs=divisors.flip(0))
    with pytest.raises(UnsupportedModelError, match=r"odd\.gguf.*rope_freqs"):
        read_gguf(tmp_path / "odd.gguf")


def test_unknown_tensor_name_is_an_error_naming_it(tmp_path):
    extra = [("blk.0.ffn_gate_inp.weight", np.zeros((4, 64), dtype=np.float32))]
    write_gguf(tmp_path / "m.gguf", hf_model("llama"), "llama", extra_tensors=extra)
    with pytest.raises(GGUFError, match=r"m\.gguf.*'blk\.0\.ffn_gate_inp\.weight'"):
        read_gguf(tmp_path / "m.gguf")


def test_unsupported_architecture_names_it(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*llama, qwen2, qwen3"):
        read_gguf(tmp_path / "g.gguf")


def test_smollm2_metadata_and_config(smollm2_gguf):
    checkpoint = read_gguf(smollm2_gguf)
    md = checkpoint.metadata
    tokens, merges, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.merges"], md["tokenizer.ggml.token_type"]
    assert len(tokens) == 49152 and all(isinstance(t, str) for t in tokens[:100]) and tokens[0] == "<|endoftext|>"
    assert isinstance(merges[0], str) and " " in merges[0]
    assert all(type(t) is int for t in types[:100])
    assert isinstance(md["tokenizer.chat_template"], str) and "<|im_start|>" in md["tokenizer.chat_template"]
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.bos_token_id"] == 1
    assert not any(k.startswith("GGUF.") for k in md)
    c = checkpoint.hf_config
    assert (c["model_type"], c["hidden_size"], c["num_hidden_layers"], c["head_dim"]) == ("llama", 576, 30, 64)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["tie_word_embeddings"]) == (9, 3, True)
    assert (c["rope_theta"], c["rms_norm_eps"], c["rope_scaling"]) == (100000.0, 1e-5, None)
    cfg = ModelConfig.from_hf(c)
    check_keys(checkpoint.tensor_names(), expected_keys(LlamaForCausalLM.from_config(cfg, device="meta")))


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_logits_equal_transformers_gguf_loader(smollm2_gguf):
    """transformers dequantizes the same Q4_1/Q8_0 blocks with the same gguf package, so fp32 logits
    agree at default tolerances; the negative control shows the q/k unpermute is what makes them agree."""
    ours = load_ours(read_gguf(smollm2_gguf))
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name).eval()
    # "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in SmolLM2's vocabulary
    x = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2]])
    expected = hf(x).logits
    torch.testing.assert_close(ours(x), expected)

    attn = ours.model.layers[0].self_attn
    for proj, heads in ((attn.q_proj, 9), (attn.k_proj, 3)):
        proj.weight.copy_(llamacpp_interleave(proj.weight, heads))  # as if we had skipped the unpermute
    assert not torch.allclose(ours(x), expected, atol=1e-2)
