"""Adapters that do not fit, are damaged, or are pickles: one AdapterError naming the file, and nothing unpickled.

Each case starts from an adapter `qlora.adapter.write_adapter` wrote for the tiny model of
tests/hostile_inputs.py (which loads: the negative control) and breaks one thing: a module missing or extra,
a rank other than the config's, a shape the base model does not have, an integer dtype, a cut file, a damaged
adapter_config.json, an absurd rank, or weights only as a pickle whose unpickling would leave a marker file.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from hostile_inputs import ADAPTER_SPEC, adapter_tensors, write_adapter_dir, write_model_dir

import qlora
from qlora.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MAX_RANK,
    AdapterError,
    load_adapter_weights,
    read_adapter,
    read_adapter_config,
)
from qlora.lora import LoraSpec, lora_layers

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("base"))


def model_for(base, spec: LoraSpec):
    return qlora.load_model(base, None, compute_dtype=torch.float32, device="cpu", lora=spec)


def test_the_written_adapter_loads(base, tmp_path):
    tensors = adapter_tensors()
    directory = write_adapter_dir(tmp_path / "a", tensors)
    model = model_for(base, read_adapter_config(directory))
    load_adapter_weights(model, directory)
    torch.testing.assert_close(lora_layers(model)["model.layers.0.self_attn.q_proj"].lora_A.weight,
                               tensors[f"{Q0}.lora_A.weight"])  # fmt: skip


def test_a_module_missing_from_the_file(base, tmp_path):
    tensors = {k: v for k, v in adapter_tensors().items() if ".layers.1.self_attn.q_proj." not in k}
    directory = write_adapter_dir(tmp_path / "a", tensors)
    with pytest.raises(AdapterError, match=r"in the model only \['model\.layers\.1\.self_attn\.q_proj'\]") as caught:
        load_adapter_weights(model_for(base, read_adapter_config(directory)), directory)
    assert str(directory / ADAPTER_WEIGHTS) in str(caught.value)


def test_a_module_the_model_does_not_have(base, tmp_path):
    tensors = adapter_tensors()
    tensors |= {k.replace(".layers.0.", ".layers.7."): v.clone() for k, v in tensors.items() if ".layers.0." in k}
    directory = write_adapter_dir(tmp_path / "a", tensors)
    with pytest.raises(AdapterError, match=r"in the file only \['model\.layers\.7\.self_attn\.q_proj'"):
        load_adapter_weights(model_for(base, read_adapter_config(directory)), directory)


def test_a_rank_other_than_the_config_is_refused_before_a_model_is_built(tmp_path):
    directory = write_adapter_dir(tmp_path / "a", adapter_tensors(LoraSpec(r=3, targets=ADAPTER_SPEC.targets)))
    with pytest.raises(AdapterError, match=r"has lora_A \[3, 16\] and lora_B \[16, 3\], but adapter_config\.json "
                                           r"gives it rank 2") as caught:  # fmt: skip
        read_adapter_config(directory)  # (written with ADAPTER_SPEC's r = 2)
    assert str(directory / ADAPTER_WEIGHTS) in str(caught.value)


def test_shapes_the_base_model_does_not_have(base, tmp_path):
    tensors = adapter_tensors()
    tensors[f"{Q0}.lora_A.weight"] = torch.zeros(2, 20)  # the model's q_proj takes 16 inputs
    directory = write_adapter_dir(tmp_path / "a", tensors)
    read_adapter(directory)  # consistent in itself: only the model can tell
    with pytest.raises(AdapterError, match=r"lora_A\.weight has shape \(2, 20\), the model needs \(2, 16\)"):
        load_adapter_weights(model_for(base, read_adapter_config(directory)), directory)


def test_an_integer_dtype_is_refused(tmp_path):
    tensors = adapter_tensors()
    tensors[f"{Q0}.lora_B.weight"] = torch.zeros(16, 2, dtype=torch.int64)
    directory = write_adapter_dir(tmp_path / "a", tensors)
    with pytest.raises(AdapterError, match=r"lora_B\.weight has dtype I64; LoRA weights are floating point"):
        read_adapter_config(directory)


@pytest.mark.parametrize("keep", [0, 7, 100, -1])
def test_a_cut_weights_file_names_it(tmp_path, keep):
    directory = write_adapter_dir(tmp_path / "a")
    file = directory / ADAPTER_WEIGHTS
    file.write_bytes(file.read_bytes()[:keep])
    for read in (read_adapter_config, read_adapter):
        with pytest.raises(AdapterError, match="not a readable safetensors file") as caught:
            read(directory)
        assert str(file) in str(caught.value)


@pytest.mark.parametrize(("content", "words"), [
    (b'{"r": 2, \xff}', "invalid UTF-8 at byte offset 9"),
    (b"[" * 100_000, "nested too deeply"),
    (b'{"r": ' + b"7" * 5000 + b"}", "invalid JSON"),
    (b'{"peft_type": "LORA", "target_modules": ["q_proj"], "r": 1000000000}', "r is 1000000000; expected at most"),
    (b'{"peft_type": "LORA", "target_modules": ["q_proj"], "rank_pattern": {"q": 1e300}}', "at most 65,536"),
    (b'{"peft_type": "LORA", "target_modules": ["q_proj"], "rank_pattern": {"q": 2.5}}', "expected an integer"),
    (b'{"peft_type": "LORA", "target_modules": ["q_proj"], "lora_alpha": ' + b"9" * 400 + b"}", "expected at most"),
])  # fmt: skip
def test_a_damaged_config_names_it(tmp_path, content, words):
    directory = write_adapter_dir(tmp_path / "a")
    (directory / ADAPTER_CONFIG).write_bytes(content)
    with pytest.raises(AdapterError, match=words) as caught:
        read_adapter_config(directory)
    assert str(directory / ADAPTER_CONFIG) in str(caught.value) and len(str(caught.value)) < 400


def test_ranks_up_to_max_rank_are_read(tmp_path):
    directory = write_adapter_dir(tmp_path / "a")
    (directory / ADAPTER_WEIGHTS).unlink()  # the config alone (its header check needs matching tensors)
    text = (directory / ADAPTER_CONFIG).read_text()
    (directory / ADAPTER_CONFIG).write_text(text.replace('"r": 2', f'"r": {MAX_RANK}'))
    assert read_adapter_config(directory).r == MAX_RANK
    (directory / ADAPTER_CONFIG).write_text(text.replace('"r": 2', f'"r": {MAX_RANK + 1}'))
    with pytest.raises(AdapterError, match=f"r is {MAX_RANK + 1}; expected at most"):
        read_adapter_config(directory)


class Trap:
    """Unpickling this creates the marker file: proof that something unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_pickled_adapter_is_refused_never_unpickled(base, tmp_path):
    directory = write_adapter_dir(tmp_path / "a")
    (directory / ADAPTER_WEIGHTS).unlink()
    marker = tmp_path / "unpickled"
    (directory / "adapter_model.bin").write_bytes(pickle.dumps({f"{Q0}.lora_A.weight": Trap(marker)}))
    spec = read_adapter_config(directory)
    for read in (lambda: read_adapter(directory), lambda: load_adapter_weights(model_for(base, spec), directory)):
        with pytest.raises(AdapterError, match=r"adapter_model\.bin: a pickled adapter.*save_pretrained") as caught:
            read()
        assert str(directory / "adapter_model.bin") in str(caught.value)
    assert not marker.exists()
    pickle.loads((directory / "adapter_model.bin").read_bytes())  # negative control: the trap works
    assert marker.exists()
