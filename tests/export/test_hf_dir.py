"""The sharded safetensors writer: shard boundaries, final names, the index, and its errors."""

import json

import pytest
import torch

from qlora.checkpoint_io.safetensors_dir import iter_tensors
from qlora.export.hf_dir import ShardedSafetensorsWriter, write_config


def test_shards_fill_up_to_the_limit_and_the_index_lists_every_tensor(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=1000)
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.finish()
    assert [f.name for f in files] == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000
    assert index["weight_map"] == {"t0": files[0].name, "t1": files[0].name, "t2": files[1].name,
                                   "t3": files[1].name, "t4": files[2].name}  # fmt: skip
    read = dict(iter_tensors(tmp_path))  # our own reader validates index against shard headers
    assert all(torch.equal(read[n], t) for n, t in tensors.items())
    assert not list(tmp_path.glob("*.tmp"))


def test_one_shard_is_model_safetensors_and_duplicates_are_refused(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path)
    writer.add("a", torch.zeros(3))
    with pytest.raises(ValueError, match="'a' written twice"):
        writer.add("a", torch.ones(3))
    assert [f.name for f in writer.finish()] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_config_json_names_the_dtype_from_the_one_table(tmp_path):
    source = {"model_type": "llama", "torch_dtype": "float32", "quantization_config": {"load_in_4bit": True}}
    for dtype, name in [(torch.bfloat16, "bfloat16"), (torch.float16, "float16"), (torch.float32, "float32")]:
        written = write_config(tmp_path, source, dtype)
        on_disk = json.loads((tmp_path / "config.json").read_text())
        assert on_disk == written and (on_disk["dtype"], on_disk["torch_dtype"]) == (name, name)
        assert "quantization_config" not in on_disk and on_disk["model_type"] == "llama"
    with pytest.raises(ValueError, match="cannot write a model in torch.float64"):
        write_config(tmp_path, source, torch.float64)
