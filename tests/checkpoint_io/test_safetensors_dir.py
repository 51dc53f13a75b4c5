"""Hugging Face directory reading: single file and sharded, streaming, strict bookkeeping with named errors."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

import qlora.checkpoint_io.safetensors_dir as sdir
from qlora.checkpoint_io import (
    CheckpointError,
    CheckpointKeyError,
    check_keys,
    expected_keys,
    iter_tensors,
    list_checkpoint_files,
    read_config,
)
from qlora.model import LlamaForCausalLM, ModelConfig

HF_CONFIG = LlamaConfig(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip


@pytest.fixture()
def hf_model():
    torch.manual_seed(0)
    return HFLlama(HF_CONFIG).eval()


def write_dir(root, state: dict[str, torch.Tensor], shards: int):
    """Write config.json and `shards` safetensors files (+ index when shards > 1), like save_pretrained."""
    root.mkdir(exist_ok=True)
    (root / "config.json").write_text(json.dumps(HF_CONFIG.to_dict()))
    names = list(state)
    if shards == 1:
        save_file({k: v.contiguous() for k, v in state.items()}, root / "model.safetensors")
        return
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: state[k].contiguous() for k in part}, root / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("shards", [1, 3])
@torch.no_grad()
def test_directory_reads_back_every_tensor_and_gives_the_same_model(tmp_path, hf_model, shards):
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    write_dir(tmp_path / "ckpt", state, shards)
    files = list_checkpoint_files(tmp_path / "ckpt")
    assert len(files) == shards and all(f.parent == tmp_path / "ckpt" for f in files)
    if shards == 3:
        assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    read = dict(iter_tensors(tmp_path / "ckpt"))
    assert read.keys() == state.keys()
    for k in state:
        assert torch.equal(read[k], state[k]), k

    ours = LlamaForCausalLM(ModelConfig.from_hf(read_config(tmp_path / "ckpt"))).eval()
    check_keys(read, expected_keys(ours), source=str(tmp_path / "ckpt"))
    ours.load_state_dict(read, strict=True)
    x = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(ours(x), hf_model(x).logits)


def test_tensors_are_streamed_one_at_a_time(tmp_path, hf_model, monkeypatch):
    write_dir(tmp_path / "ckpt", dict(hf_model.state_dict()), 3)
    reads = []
    real_safe_open = sdir.safe_open

    class CountingSafeOpen:
        def __init__(self, *args, **kwargs):
            self.inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, name):
            reads.append(name)
            return self.handle.get_tensor(name)

    monkeypatch.setattr(sdir, "safe_open", CountingSafeOpen)
    stream = iter_tensors(tmp_path / "ckpt")
    previous = None
    count = 0
    for name, tensor in stream:
        count += 1
        assert reads == [*reads[:-1], name] and len(reads) == count  # read lazily, exactly when yielded
        if previous is not None:  # freed by reference counting as soon as we drop it (no gc pass)
            assert previous() is None, "the reader keeps a reference to an earlier tensor"
        previous = weakref.ref(tensor)
        del tensor
    assert count == len(hf_model.state_dict())


def test_index_listing_a_missing_shard_names_it(tmp_path, hf_model):
    write_dir(tmp_path / "ckpt", dict(hf_model.state_dict()), 3)
    (tmp_path / "ckpt" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        list_checkpoint_files(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        next(iter_tensors(tmp_path / "ckpt"))


def test_index_disagreeing_with_a_shard_names_the_tensor(tmp_path, hf_model):
    write_dir(tmp_path / "ckpt", dict(hf_model.state_dict()), 3)
    index_file = tmp_path / "ckpt" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00003.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"listed but absent: model\.layers\.9\.mlp\.up_proj\.weight"):
        list(iter_tensors(tmp_path / "ckpt"))


def test_pickle_checkpoints_are_refused_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*unpickling runs code"):
        list_checkpoint_files(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        list_checkpoint_files(tmp_path)


def test_read_config_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{\n "a": 1,\n}')
    with pytest.raises(CheckpointError, match=r"config\.json:3:1"):
        read_config(tmp_path)


def test_check_keys_names_missing_and_unexpected_keys():
    model = LlamaForCausalLM.from_config(ModelConfig.from_hf(HF_CONFIG.to_dict()), device="meta")
    keys = expected_keys(model)
    assert "lm_head.weight" in keys.required and not keys.optional
    good = set(keys.required)
    check_keys(good, keys)
    check_keys(good | {"model.layers.0.self_attn.rotary_emb.inv_freq"}, keys)  # stale buffer: ignored
    with pytest.raises(CheckpointKeyError, match=r"missing 1 key.*model\.layers\.2\.mlp\.down_proj\.weight"):
        check_keys(good - {"model.layers.2.mlp.down_proj.weight"}, keys)
    with pytest.raises(CheckpointKeyError, match=r"1 unexpected key.*model\.layers\.3\.input_layernorm\.weight"):
        check_keys(good | {"model.layers.3.input_layernorm.weight"}, keys)
    with pytest.raises(CheckpointKeyError, match=r"untied\.safetensors.*missing.*lm_head\.weight"):
        check_keys(good - {"lm_head.weight"}, keys, source="untied.safetensors")


def test_tied_lm_head_may_be_absent_or_present():
    cfg = ModelConfig.from_hf({**HF_CONFIG.to_dict(), "tie_word_embeddings": True})
    keys = expected_keys(LlamaForCausalLM.from_config(cfg, device="meta"))
    assert keys.optional == {"lm_head.weight"} and "model.embed_tokens.weight" in keys.required
    check_keys(keys.required, keys)
    check_keys(keys.required | keys.optional, keys)
    with pytest.raises(CheckpointKeyError, match=r"model\.embed_tokens\.weight"):
        check_keys((keys.required - {"model.embed_tokens.weight"}) | keys.optional, keys)


def test_stories260k_directory(stories260k_dir):
    files = list_checkpoint_files(stories260k_dir)
    assert [f.name for f in files] == ["model.safetensors"]
    cfg = ModelConfig.from_hf(read_config(stories260k_dir))
    names = [name for name, _ in iter_tensors(stories260k_dir)]
    check_keys(names, expected_keys(LlamaForCausalLM.from_config(cfg, device="meta")))
    assert "lm_head.weight" not in names  # tied, and this export omits it
