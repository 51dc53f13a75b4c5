"""Damaged and lying weight files: each is one CheckpointError / GGUFError naming the file, in bounded time, with
nothing allocated for the model first.

The safetensors cases cut the file (in the length prefix, the header, the data) or rewrite its JSON header
to lie (offsets past the end, an 2^60-byte header length, invalid JSON, an unknown dtype, a shape that does not
match its byte span); the GGUF cases cut the file, break the magic, and set counts, an array length, a
dimension count, a tensor type or a tensor offset to values the file cannot hold. The loader cases are valid
files that do not fit the model their config describes (a shape, an integer dtype, a missing shard), refused
before `_init_adapters` allocates anything.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hostile_inputs import TINY_CONFIG, time_limit, tiny_state, write_gguf, write_model_dir
from safetensors.torch import save_file

import qlora.loading
from qlora.checkpoint_io import CheckpointError, GGUFError, iter_tensors, read_config, read_gguf
from qlora.lora import LoraSpec
from qlora.model import ModelConfig
from qlora.model.config import ModelConfigError


def load(path, lora=None):
    return qlora.load_model(path, None, compute_dtype=torch.float32, device="cpu", lora=lora)


def test_the_undamaged_files_load(tmp_path):
    """Negative control: every case below damages one of these, which load."""
    pytest.importorskip("gguf", reason="the gguf package writes the test files")
    state = tiny_state()
    for path in (write_model_dir(tmp_path / "m"), write_gguf(tmp_path / "m.gguf")):
        model = load(path, LoraSpec(r=4))
        torch.testing.assert_close(model.model.norm.weight, state["model.norm.weight"])


def header_of(file):
    data = file.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def with_header(file, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


# ------------------------------------------------------------------------------------------- safetensors

CUTS = {
    "empty": lambda data, n: b"",
    "in the length prefix": lambda data, n: data[:5],
    "in the header": lambda data, n: data[: 8 + n // 2],
    "in the data": lambda data, n: data[:-5],
}


@pytest.mark.parametrize("cut", list(CUTS))
def test_truncated_safetensors_names_the_file(tmp_path, cut):
    root = write_model_dir(tmp_path / "m")
    file = root / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(CUTS[cut](data, struct.unpack_from("<Q", data)[0]))
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as caught:
        list(iter_tensors(root))
    assert str(file) in str(caught.value) and "truncated or corrupt" in str(caught.value)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load(root)


def lie_offsets_past_the_end(h):
    h["model.norm.weight"]["data_offsets"][1] += 1 << 20


def lie_dtype(h):
    h["model.norm.weight"]["dtype"] = "F99"


def lie_shape(h):  # shape x dtype no longer equals the byte span
    h["model.norm.weight"]["shape"] = [17]


def lie_overflowing_shape(h):
    h["model.norm.weight"]["shape"] = [1 << 40, 1 << 40]


def lie_overlap(h):
    h["model.norm.weight"]["data_offsets"] = h["model.embed_tokens.weight"]["data_offsets"]


@pytest.mark.parametrize("lie", [lie_offsets_past_the_end, lie_dtype, lie_shape, lie_overflowing_shape, lie_overlap])
def test_a_lying_header_is_refused_before_any_tensor_is_read(tmp_path, lie):
    root = write_model_dir(tmp_path / "m")
    file = root / "model.safetensors"
    header, body = header_of(file)
    lie(header)
    with_header(file, header, body)
    with pytest.raises(CheckpointError) as caught:
        next(iter_tensors(root))
    assert str(file) in str(caught.value)


@pytest.mark.parametrize("prefix", [struct.pack("<Q", 1 << 60), struct.pack("<Q", 16) + b"{not json,      "])
def test_absurd_header_length_and_invalid_header_json(tmp_path, prefix):
    root = write_model_dir(tmp_path / "m")
    file = root / "model.safetensors"
    file.write_bytes(prefix + file.read_bytes()[len(prefix) :])
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as caught:
        load(root)
    assert str(file) in str(caught.value)


def spy_on_allocation(monkeypatch) -> list:
    calls = []
    real = qlora.loading._init_adapters
    monkeypatch.setattr(qlora.loading, "_init_adapters", lambda *a: (calls.append(a), real(*a)))
    return calls


def test_a_tensor_of_the_wrong_shape_is_refused_before_allocation(tmp_path, monkeypatch):
    state = tiny_state()
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(25, 16)  # config.json: intermediate_size 24
    root = write_model_dir(tmp_path / "m", state)
    calls = spy_on_allocation(monkeypatch)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \[25, 16\]") as e:
        load(root, LoraSpec(r=4))
    assert str(root) in str(e.value) and "needs [24, 16]" in str(e.value)
    assert calls == []  # nothing was allocated for the model
    load(write_model_dir(tmp_path / "good"), LoraSpec(r=4))  # negative control: the spy sees a real load
    assert len(calls) == 1


def test_a_config_that_does_not_describe_the_weights_is_refused_before_allocation(tmp_path, monkeypatch):
    root = write_model_dir(tmp_path / "m", config={**TINY_CONFIG, "num_hidden_layers": 3})
    calls = spy_on_allocation(monkeypatch)
    with pytest.raises(CheckpointError, match=r"missing .*model\.layers\.2\."):
        load(root, LoraSpec(r=4))
    assert calls == []


def test_an_integer_tensor_is_not_a_weight(tmp_path):
    state = tiny_state()
    state["model.norm.weight"] = torch.ones(16, dtype=torch.int64)
    root = write_model_dir(tmp_path / "m", state)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has dtype torch\.int64"):
        load(root)


def test_an_index_naming_a_missing_shard_is_refused_by_the_loader(tmp_path):
    root = write_model_dir(tmp_path / "m")
    state = tiny_state()
    (root / "model.safetensors").unlink()
    names = sorted(state)
    save_file({k: state[k] for k in names[::2]}, str(root / "model-00001-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(names)}
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"lists shard\(s\) missing .*model-00002-of-00002\.safetensors"):
        load(root)


@pytest.mark.parametrize(("name", "content", "words"), [
    ("config.json", b'{"model_type": "llama\xff"}', "invalid UTF-8 at byte offset 21"),
    ("config.json", b"[" * 100_000, "nested too deeply"),
    ("config.json", b'{"vocab_size": ' + b"9" * 5000 + b"}", "invalid JSON"),
    ("model.safetensors.index.json", b"[" * 100_000, "nested too deeply"),
])  # fmt: skip
def test_damaged_json_files_name_the_file(tmp_path, name, content, words):
    root = write_model_dir(tmp_path / "m")
    if name.endswith("index.json"):
        (root / "model.safetensors").rename(root / "model-00001-of-00001.safetensors")
    (root / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=words) as caught:
        read_config(root) if name == "config.json" else list(iter_tensors(root))
    assert str(root / name) in str(caught.value)


# ------------------------------------------------------------------------------------------------- GGUF


@pytest.fixture()
def gguf_file(tmp_path):
    pytest.importorskip("gguf", reason="the gguf package writes the test files")
    return write_gguf(tmp_path / "m.gguf")


def patch(path, offset: int, fmt: str, value) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))


def tensor_info_offset(path, name: bytes) -> int:
    """Byte offset just past the name of tensor `name` in the tensor-info section (its n_dims field)."""
    data = path.read_bytes()
    return data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)


def test_gguf_cut_in_the_header_or_the_data_names_the_file(gguf_file):
    data = gguf_file.read_bytes()
    for cut in (0, 10, 30, len(data) // 3, len(data) - 10):
        gguf_file.write_bytes(data[:cut])
        with time_limit(30), pytest.raises(GGUFError) as caught:
            read_gguf(gguf_file)
        assert str(gguf_file) in str(caught.value), cut


def test_gguf_bad_magic(gguf_file):
    patch(gguf_file, 0, "<4s", b"GGUG")
    with pytest.raises(GGUFError, match=r"not a GGUF file \(it starts with b'GGUG'"):
        read_gguf(gguf_file)


@pytest.mark.parametrize(("field", "offset"), [("tensor count", 8), ("metadata count", 16)])
def test_gguf_absurd_counts(gguf_file, field, offset):
    patch(gguf_file, offset, "<Q", 1 << 60)
    with time_limit(30), pytest.raises(GGUFError, match="cannot fit") as caught:
        read_gguf(gguf_file)
    assert str(gguf_file) in str(caught.value)


def test_gguf_array_length_past_the_file_is_refused_not_looped_over(gguf_file):
    # the gguf package's reader alone loops 2^62 times here, appending an empty array each time
    data = gguf_file.read_bytes()
    at = data.index(b"tokenizer.ggml.token_type") + len(b"tokenizer.ggml.token_type") + 4 + 4  # value type, item type
    patch(gguf_file, at, "<Q", 1 << 62)
    with time_limit(30), pytest.raises(GGUFError, match=r"'tokenizer\.ggml\.token_type'.*truncated or corrupt"):
        read_gguf(gguf_file)


def test_gguf_tensor_offset_out_of_range(gguf_file):
    at = tensor_info_offset(gguf_file, b"output_norm.weight")
    patch(gguf_file, at + 4 + 8 + 4, "<Q", 1 << 40)  # n_dims (1), one dim, type, then the offset
    with pytest.raises(GGUFError, match=r"tensor 'output_norm\.weight' .* ends past the end of the file"):
        read_gguf(gguf_file)


@pytest.mark.parametrize(("what", "delta", "value", "words"), [
    ("dimension count", 0, 9, "9 dimensions"),
    ("tensor type", 4 + 8, 999, "unknown tensor type 999"),
])  # fmt: skip
def test_gguf_tensor_info_that_cannot_be(gguf_file, what, delta, value, words):
    at = tensor_info_offset(gguf_file, b"output_norm.weight")
    patch(gguf_file, at + delta, "<I", value)
    with pytest.raises(GGUFError, match=words):
        read_gguf(gguf_file)


def test_gguf_metadata_of_the_wrong_type(tmp_path):
    gguf = pytest.importorskip("gguf", reason="the gguf package writes the test files")
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_string("llama.embedding_length", "sixteen")
    w.add_uint32("llama.attention.head_count", 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"m\.gguf: .*sixteen"):
        read_gguf(tmp_path / "m.gguf")


def test_gguf_metadata_that_does_not_describe_the_tensors(tmp_path, monkeypatch):
    pytest.importorskip("gguf", reason="the gguf package writes the test files")
    state = tiny_state()
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(20, 16)
    path = write_gguf(tmp_path / "m.gguf", state)
    calls = spy_on_allocation(monkeypatch)
    with pytest.raises(CheckpointError, match=r"m\.gguf: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' has shape"):
        load(path, LoraSpec(r=4))
    assert calls == []


def test_gguf_absurd_sizes_are_refused_naming_the_file(gguf_file):
    data = gguf_file.read_bytes()
    at = data.index(b"llama.block_count") + len(b"llama.block_count") + 4  # past the value type
    patch(gguf_file, at, "<I", 10**9)
    assert read_gguf(gguf_file).hf_config["num_hidden_layers"] == 10**9
    with pytest.raises(ModelConfigError, match=r"m\.gguf: num_hidden_layers is 1,000,000,000"):
        load(gguf_file)
    with pytest.raises(ModelConfigError):  # the same refusal without a file
        ModelConfig.from_hf({**TINY_CONFIG, "num_hidden_layers": 10**9})
