"""The QuantizedTensor container: state-dict interop with bitsandbytes, size accounting, chunking,
moving, errors and memory. (Speed is measured by benchmarks, never asserted in a test: a loaded
machine would fail it.)"""

import json
import os
import resource
import subprocess
import sys
import textwrap

import pytest
import torch
from quant_inputs import randn

import qlora
from qlora.quant.codes import table_4bit
from qlora.quant.tensor import QuantizedTensor


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_our_state_dict_loads_in_bitsandbytes(quant_type, double_quant):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    x = randn((300, 200), torch.bfloat16, seed=11)
    q = qlora.quantize(x, quant_type, 64, double_quant)
    sd = q.to_bnb_state_dict("weight")
    expected_keys = {"weight", "weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{quant_type}"}
    if double_quant:
        expected_keys |= {"weight.nested_absmax", "weight.nested_quant_map"}
    assert set(sd) == expected_keys
    state = bnb_functional.QuantState.from_dict({k[len("weight.") :]: v for k, v in sd.items() if k != "weight"},
                                                device=torch.device("cpu"))  # fmt: skip
    assert state.shape == x.shape and state.dtype == x.dtype and state.quant_type == quant_type
    assert torch.equal(bnb_functional.dequantize_4bit(sd["weight"], state), q.dequantize())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_bitsandbytes_state_dict_loads_in_ours(quant_type, double_quant):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    x = randn((64, 96), torch.float16, seed=12)
    packed, state = bnb_functional.quantize_4bit(x, blocksize=64, compress_statistics=double_quant,
                                                 quant_type=quant_type)  # fmt: skip
    sd = {"model.layers.0.mlp.up_proj.weight": packed}
    sd.update({f"model.layers.0.mlp.up_proj.weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    q = QuantizedTensor.from_bnb_state_dict(sd, prefix="model.layers.0.mlp.up_proj.weight")
    assert q.double_quant == double_quant and q.shape == x.shape and q.dtype == x.dtype
    assert torch.equal(q.dequantize(torch.float32), bnb_functional.dequantize_4bit(packed, state).float()) or (
        # bitsandbytes' float16 CPU kernel (see test_bnb_parity.bnb_dequantize); compare in float32 then.
        q.dequantize(torch.float32).half().equal(q.dequantize())
    )
    # Our own round trip is bit-exact for every tensor and the JSON blob.
    again = q.to_bnb_state_dict("model.layers.0.mlp.up_proj.weight")
    assert set(again) == set(sd)
    for key, value in sd.items():
        assert torch.equal(again[key], value), key


def test_json_blob_matches_bitsandbytes_layout():
    """Key order and separators as bitsandbytes writes them (format-spec 1.6)."""
    q = qlora.quantize(randn((256, 1024), torch.bfloat16, seed=0), "nf4", 64, True)
    blob = bytes(q.to_bnb_state_dict()["weight.quant_state.bitsandbytes__nf4"].tolist()).decode()
    parsed = json.loads(blob)
    assert list(parsed) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                            "nested_offset"]  # fmt: skip
    assert blob.startswith('{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [256, 1024], ')
    assert parsed["nested_offset"] == q.nested.offset.item()
    no_dq = bytes(qlora.quantize(torch.ones(4096, 4096), "nf4", 64, False).to_bnb_state_dict()[
        "weight.quant_state.bitsandbytes__nf4"].tolist()).decode()  # fmt: skip
    assert no_dq == '{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [4096, 4096]}'


def test_quant_storage_other_than_uint8_is_read_as_bytes():
    q = qlora.quantize(randn((32, 64), torch.bfloat16, seed=1))
    sd = q.to_bnb_state_dict()
    sd["weight"] = sd["weight"].reshape(-1).view(torch.bfloat16).reshape(-1, 1)  # FSDP-style storage
    assert torch.equal(QuantizedTensor.from_bnb_state_dict(sd).dequantize(), q.dequantize())


def test_bad_state_dicts_name_the_key():
    sd = qlora.quantize(randn((32, 64), torch.float32, seed=1)).to_bnb_state_dict("lm.weight")
    with pytest.raises(KeyError, match="'lm.weight': packed"):
        QuantizedTensor.from_bnb_state_dict({k: v for k, v in sd.items() if k != "lm.weight"}, "lm.weight")
    with pytest.raises(KeyError, match="lm.weight.absmax"):
        QuantizedTensor.from_bnb_state_dict({k: v for k, v in sd.items() if k != "lm.weight.absmax"}, "lm.weight")
    with pytest.raises(KeyError, match="unexpected quant-state keys.*'bogus'"):
        QuantizedTensor.from_bnb_state_dict({**sd, "lm.weight.bogus": torch.zeros(1)}, "lm.weight")
    broken = dict(sd)
    broken["lm.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="not a valid JSON"):
        QuantizedTensor.from_bnb_state_dict(broken, "lm.weight")
    wrong_table = {**sd, "lm.weight.quant_map": table_4bit("fp4")}  # an nf4 weight saved with the fp4 table
    with pytest.raises(ValueError, match=r"lm.weight.quant_map: not bitsandbytes' nf4 table"):
        QuantizedTensor.from_bnb_state_dict(wrong_table, "lm.weight")
    with pytest.raises(ValueError, match="no bitsandbytes encoding"):
        qlora.quantize(torch.randn(64), "int4").to_bnb_state_dict()
    blob_key = "lm.weight.quant_state.bitsandbytes__nf4"
    blob = json.loads(bytes(sd[blob_key].tolist()))
    for name in ("bf16", "float64"):  # a file holds torch's exact names: no aliases, nothing outside the table
        bad = {**sd, blob_key: torch.tensor(list(json.dumps({**blob, "dtype": name}).encode()), dtype=torch.uint8)}
        with pytest.raises(ValueError, match=f"unsupported dtype '{name}' \\(one of bfloat16, float16, float32\\)"):
            QuantizedTensor.from_bnb_state_dict(bad, "lm.weight")
    assert QuantizedTensor.from_bnb_state_dict(sd, "lm.weight").dtype == torch.float32  # blob "dtype": "float32"


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="blocksize must be one of"):
        qlora.quantize(torch.randn(100), blocksize=48)
    with pytest.raises(ValueError, match="quant_type must be one of"):
        qlora.quantize(torch.randn(100), quant_type="nf3")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        qlora.quantize(torch.arange(100))
    x = torch.randn(1000)
    x[700] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        qlora.quantize(x)


@pytest.mark.parametrize("double_quant,expected", [(True, 4.127), (False, 4.5)])
def test_bits_per_param(double_quant, expected):
    q = qlora.quantize(torch.randn(4096, 4096, dtype=torch.bfloat16), "nf4", 64, double_quant)
    assert round(q.bits_per_param(), 3) == expected
    assert q.memory_bytes() == sum(t.numel() * t.element_size() for t in q.tensors())
    assert q.memory_bytes() * 8 / q.numel > q.bits_per_param()  # the tables are counted in memory_bytes


@pytest.mark.parametrize("chunk_elements", [64, 192, 4096 + 64, 1 << 30])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_chunking_never_changes_a_byte(chunk_elements, quant_type):
    x = randn((97, 333), torch.bfloat16, seed=5)  # odd numel, partial last block
    whole = QuantizedTensor.quantize(x, quant_type, 64, True, chunk_elements=1 << 30)
    chunked = QuantizedTensor.quantize(x, quant_type, 64, True, chunk_elements=chunk_elements)
    for a, b in zip(whole.tensors(), chunked.tensors(), strict=True):
        assert torch.equal(a, b)
    from qlora.quant.blockwise import dequantize_4bit_blockwise

    chunked_out = dequantize_4bit_blockwise(whole.packed, whole.float_absmax(), quant_type, 64, x.shape,
                                            torch.bfloat16, chunk_elements=chunk_elements)  # fmt: skip
    assert torch.equal(chunked_out, whole.dequantize())


def test_to_device_and_dtype():
    q = qlora.quantize(randn((64, 64), torch.bfloat16, seed=2))
    moved = q.to("cpu")
    assert moved.device.type == "cpu" and torch.equal(moved.dequantize(), q.dequantize())
    assert q.dequantize().dtype == torch.bfloat16 and q.dequantize(torch.float32).dtype == torch.float32
    assert torch.equal(q.dequantize(torch.float32).to(torch.bfloat16), q.dequantize())
    if torch.cuda.is_available():
        assert torch.equal(q.to("cuda").dequantize().cpu(), q.dequantize())


@pytest.mark.slow
def test_quantizing_a_large_matrix_needs_little_extra_memory():
    """8192 x 28672 bf16 (448 MiB): peak RSS beyond the input and the outputs stays under 5% of the input.

    Runs in a fresh process, so ru_maxrss (a high-water mark) measures only this work. glibc is told to map
    every allocation above 64 KiB on its own (MALLOC_MMAP_THRESHOLD_), so freed chunks go back to the system
    at once and the mark measures the live peak, not heap fragmentation: without it the same code measured
    11-41 MiB from run to run, with it 12.4-12.6 MiB.
    """
    script = textwrap.dedent(
        """
        import resource, torch, qlora
        torch.set_num_threads(2)
        x = torch.empty(8192, 28672, dtype=torch.bfloat16)
        for i in range(0, 8192, 512):
            x[i:i + 512].normal_()
        qlora.quantize(x[:64])  # first-call costs (lazy imports, table caches: ~20 MiB) are not per-weight
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        q = qlora.quantize(x)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024, q.memory_bytes(), x.numel() * x.element_size())
        """
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    grown, outputs, input_bytes = map(int, out.stdout.split()[-3:])
    extra = grown - outputs
    assert extra < 0.05 * input_bytes, f"extra {extra / 2**20:.1f} MiB for a {input_bytes / 2**20:.0f} MiB input"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0  # the counter is available here
