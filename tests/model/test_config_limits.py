"""config.json with absurd or mistyped sizes: a ModelConfigError (a ConfigError) naming the key, raised before
anything is built; through the loader, naming the file too. A huge max_position_embeddings is fine."""

from __future__ import annotations

import json

import pytest
import torch
from hostile_inputs import TINY_CONFIG, write_model_dir

import qlora
from qlora.config import ConfigError
from qlora.loading import read_model_config
from qlora.model import LlamaForCausalLM, ModelConfig
from qlora.model.config import SIZE_LIMITS, ModelConfigError

BAD = [
    ({"hidden_size": 10**12}, "hidden_size is 1,000,000,000,000; expected an integer between 1 and 131,072"),
    ({"num_hidden_layers": -3}, "num_hidden_layers is -3; expected an integer between 1"),
    ({"vocab_size": "32"}, r"vocab_size is '32' \(str\); expected an integer"),
    ({"intermediate_size": 24.0}, r"intermediate_size is 24\.0 \(float\); expected an integer"),
    ({"num_attention_heads": True}, r"num_attention_heads is True \(bool\)"),
    ({"num_attention_heads": 3, "num_key_value_heads": 3}, "hidden_size 16 is not a multiple of num_attention_heads 3"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0"),
    ({"head_dim": 1 << 20}, "head_dim is 1,048,576"),
    ({"num_key_value_heads": [1]}, r"num_key_value_heads is \[1\] \(list\)"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps is 'small'; expected a finite positive number"),
    ({"rope_theta": float("nan")}, "rope_theta is nan"),
    ({"rope_theta": 10**400}, "rope_theta is 1000000"),
    ({"rope_scaling": "linear"}, "rope_scaling is 'linear'; expected an object or null"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope_scaling.factor is '2'"),
    ({"max_position_embeddings": "long"}, "max_position_embeddings is 'long'"),
    ({"sliding_window": -1, "model_type": "mistral"}, "sliding_window is -1"),
    ({"layer_types": "full_attention", "model_type": "qwen2"}, "layer_types is 'full_attention'; expected a list"),
    ({"vocab_size": "x" * 1000}, r"vocab_size is 'xxxxx.*\.\.\. \(str\)"),  # a hostile value is not echoed whole
]


@pytest.mark.parametrize(("change", "words"), BAD, ids=[next(iter(c)) for c, _ in BAD])
def test_absurd_or_mistyped_sizes_name_the_key(change, words):
    with pytest.raises(ModelConfigError, match=words) as caught:
        ModelConfig.from_hf({**TINY_CONFIG, **change})
    assert isinstance(caught.value, ConfigError)  # the CLI prints ConfigErrors as one message
    assert len(str(caught.value)) < 300


def test_limits_are_above_every_released_model():
    llama_405b = {**TINY_CONFIG, "vocab_size": 128256, "hidden_size": 16384, "intermediate_size": 53248,
                  "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8}  # fmt: skip
    assert ModelConfig.from_hf(llama_405b).num_hidden_layers == 126
    at_limit = {**TINY_CONFIG, **SIZE_LIMITS, "num_key_value_heads": SIZE_LIMITS["num_attention_heads"]}
    assert ModelConfig.from_hf(at_limit).hidden_size == SIZE_LIMITS["hidden_size"]
    with pytest.raises(ModelConfigError, match="vocab_size"):
        ModelConfig.from_hf({**at_limit, "vocab_size": SIZE_LIMITS["vocab_size"] + 1})


def test_huge_max_position_embeddings_is_fine():
    assert ModelConfig.from_hf({**TINY_CONFIG, "max_position_embeddings": 10**15}).max_position_embeddings == 10**15


def test_direct_construction_is_checked_too():
    fields = {k: v for k, v in TINY_CONFIG.items() if k not in ("rms_norm_eps", "tie_word_embeddings")}
    with pytest.raises(ModelConfigError, match="hidden_size"):
        ModelConfig(**{**fields, "hidden_size": 10**12, "head_dim": 8, "max_position_embeddings": 64})


def test_the_loader_refuses_before_building_anything(tmp_path, monkeypatch):
    root = write_model_dir(tmp_path / "m")
    (root / "config.json").write_text(json.dumps({**TINY_CONFIG, "hidden_size": 10**12}))
    built = []
    real = LlamaForCausalLM.from_config.__func__
    monkeypatch.setattr(LlamaForCausalLM, "from_config", classmethod(lambda cls, *a, **k: (built.append(1),
                                                                                           real(cls, *a, **k))[1]))
    with pytest.raises(ModelConfigError, match=r"config\.json: hidden_size is 1,000,000,000,000") as caught:
        qlora.load_model(root, None, compute_dtype=torch.float32, device="cpu")
    assert str(root / "config.json") in str(caught.value)
    with pytest.raises(ModelConfigError, match=str(root / "config.json")):
        read_model_config(root)
    assert built == []
    (root / "config.json").write_text(json.dumps(TINY_CONFIG))  # negative control: the spy sees a real build
    qlora.load_model(root, None, compute_dtype=torch.float32, device="cpu")
    assert built == [1]
