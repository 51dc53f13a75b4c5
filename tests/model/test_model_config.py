"""ModelConfig: per-family switches read from transformers' own configs, and errors that name things."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from qlora.model.config import SUPPORTED_MODEL_TYPES, ModelConfig, UnsupportedModelError
from qlora.model.llama import rope_inverse_frequencies

SHAPE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip

LLAMA31_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}  # fmt: skip


def test_llama_from_transformers_config():
    hf = LlamaConfig(**SHAPE, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    cfg = ModelConfig.from_hf(hf.to_dict())
    assert (cfg.model_type, cfg.head_dim, cfg.num_key_value_heads) == ("llama", 16, 2)
    assert cfg.attention_bias and cfg.o_proj_bias and cfg.mlp_bias and cfg.tie_word_embeddings
    assert not cfg.qk_norm and cfg.rope_scaling is None and cfg.sliding_window is None
    assert cfg.layer_types == ["full_attention", "full_attention"]


def test_qwen2_has_qkv_bias_but_no_o_bias():
    cfg = ModelConfig.from_hf(Qwen2Config(**SHAPE).to_dict())
    assert cfg.attention_bias and not cfg.o_proj_bias and not cfg.mlp_bias and not cfg.qk_norm


def test_qwen3_qk_norm_and_its_own_head_dim():
    cfg = ModelConfig.from_hf(Qwen3Config(**SHAPE, head_dim=32).to_dict())
    assert cfg.qk_norm and cfg.head_dim == 32 and not cfg.attention_bias and not cfg.o_proj_bias
    # Qwen3Config's head_dim default is 128, not hidden_size // heads
    d = Qwen3Config(**SHAPE).to_dict()
    del d["head_dim"]
    assert ModelConfig.from_hf(d).head_dim == 128


def test_mistral_sliding_window_applies_to_every_layer():
    cfg = ModelConfig.from_hf(MistralConfig(**SHAPE, sliding_window=8).to_dict())
    assert cfg.sliding_window == 8 and cfg.layer_types == ["sliding_attention"] * 2
    assert not cfg.attention_bias and not cfg.o_proj_bias
    cfg = ModelConfig.from_hf(MistralConfig(**SHAPE, sliding_window=None).to_dict())
    assert cfg.sliding_window is None and cfg.layer_types == ["full_attention"] * 2


def test_qwen2_sliding_window_only_when_enabled_and_from_max_window_layers():
    cfg = ModelConfig.from_hf(Qwen2Config(**SHAPE, sliding_window=8).to_dict())
    assert cfg.sliding_window is None and cfg.layer_types == ["full_attention"] * 2
    hf = Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    cfg = ModelConfig.from_hf(hf.to_dict())
    assert cfg.sliding_window == 8 and cfg.layer_types == list(hf.layer_types)
    assert cfg.layer_types == ["full_attention", "sliding_attention"]


def test_legacy_rope_keys_equal_transformers5_rope_parameters():
    legacy = {"model_type": "llama", **SHAPE, "rope_theta": 500000.0, "rope_scaling": {**LLAMA31_ROPE}}
    modern = LlamaConfig(**SHAPE, rope_parameters={**LLAMA31_ROPE, "rope_theta": 500000.0}).to_dict()
    a, b = ModelConfig.from_hf(legacy), ModelConfig.from_hf(modern)
    assert a.rope_theta == b.rope_theta == 500000.0
    assert a.rope_scaling == b.rope_scaling == LLAMA31_ROPE
    # the old "type" spelling of the key
    old = {"model_type": "llama", **SHAPE, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert ModelConfig.from_hf(old).rope_scaling == {"rope_type": "linear", "factor": 2.0}
    default = {"model_type": "llama", **SHAPE, "rope_scaling": {"rope_type": "default"}}
    assert ModelConfig.from_hf(default).rope_scaling is None


@pytest.mark.parametrize(
    "rope",
    [None, {"rope_type": "linear", "factor": 4.0}, LLAMA31_ROPE, {**LLAMA31_ROPE, "factor": 32.0}],
    ids=["default", "linear", "llama3.1", "llama3.2"],
)
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rope_inverse_frequencies_equal_transformers(rope, head_dim):
    params = {**(rope or {"rope_type": "default"}), "rope_theta": 500000.0}
    hf = LlamaConfig(**{**SHAPE, "hidden_size": 4 * head_dim}, rope_parameters=params)
    cfg = ModelConfig.from_hf(hf.to_dict())
    ours = rope_inverse_frequencies(cfg)
    plain = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if params["rope_type"] == "default":
        ref = plain
    else:
        ref, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf)
        assert scale == 1.0
        assert not torch.allclose(ours, plain)  # negative control: the scaling changes frequencies
    assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    torch.testing.assert_close(ours, ref)


def test_unsupported_model_type_names_it_and_lists_supported():
    with pytest.raises(UnsupportedModelError) as e:
        ModelConfig.from_hf({"model_type": "gpt2", **SHAPE})
    assert "'gpt2'" in str(e.value)
    for name in SUPPORTED_MODEL_TYPES:
        assert name in str(e.value)
    assert isinstance(e.value, ValueError)


def test_unsupported_rope_type_names_it():
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        ModelConfig.from_hf({"model_type": "llama", **SHAPE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_other_refusals_name_what_is_wrong():
    with pytest.raises(UnsupportedModelError, match="gelu"):
        ModelConfig.from_hf({"model_type": "llama", **SHAPE, "hidden_act": "gelu"})
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor"):
        ModelConfig.from_hf({"model_type": "llama", **SHAPE, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                             "num_attention_heads": 2})  # fmt: skip
    with pytest.raises(ValueError, match="low_freq_factor"):
        ModelConfig.from_hf({"model_type": "llama", **SHAPE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelConfig.from_hf({"model_type": "llama", **SHAPE, "num_key_value_heads": 3})


def test_from_json_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope" / "config.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ModelConfig.from_json_file(missing)
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama",\n  "vocab_size": }')
    with pytest.raises(ValueError, match=rf"{bad}:2:"):
        ModelConfig.from_json_file(bad)
    bad.write_text(json.dumps({"model_type": "bert", **SHAPE}))
    with pytest.raises(UnsupportedModelError, match=rf"{bad}.*'bert'"):
        ModelConfig.from_json_file(bad)
    bad.write_text(json.dumps({"model_type": "llama", **SHAPE, "eos_token_id": [2, 7]}))
    assert ModelConfig.from_json_file(bad).eos_token_id == [2, 7]


def test_stories260k_config(stories260k_dir):
    cfg = ModelConfig.from_json_file(stories260k_dir / "config.json")
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim) == ("llama", 64, 5, 8)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (8, 4, True)
    assert cfg.torch_dtype == "float32" and cfg.bos_token_id == 1 and cfg.eos_token_id == 2
