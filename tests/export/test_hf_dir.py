"""The sharded safetensors writer: shard boundaries, final names, the index, and its errors."""

import json

import pytest
import torch

from qlora.checkpoint_io.safetensors_dir import iter_tensors
from qlora.export.hf_dir import ShardedSafetensorsWriter


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
