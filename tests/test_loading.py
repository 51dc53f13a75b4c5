"""load_model: quantize-on-load parity, streaming memory bound, and errors that name what is wrong."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import qlora
from qlora.checkpoint_io.safetensors_dir import CheckpointKeyError
from qlora.lora import LoRALinear, LoraSpec
from qlora.model.config import UnsupportedModelError


def test_dense_load_matches_transformers(stories260k_dir):
    transformers = pytest.importorskip("transformers")
    ids = torch.tensor([[1, 403, 407, 261, 378, 30, 5, 60, 2]])
    ours = qlora.load_model(stories260k_dir, quant_type=None, compute_dtype=torch.float32, device="cpu")
    theirs = transformers.LlamaForCausalLM.from_pretrained(stories260k_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_quantized_load_matches_transformers_on_the_same_quantized_weights(stories260k_dir, quant_type):
    """Same 4-bit weights on both sides: our quantized model == transformers with our dequantized weights."""
    transformers = pytest.importorskip("transformers")
    ours = qlora.load_model(
        stories260k_dir,
        quant_type=quant_type,
        compute_dtype=torch.float32,
        device="cpu",
        lora=LoraSpec(r=4, dropout=0.0),
    )
    theirs = transformers.LlamaForCausalLM.from_pretrained(stories260k_dir).eval()
    dense = dict(theirs.named_modules())
    quantized = {n: m for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    assert len(quantized) == 5 * 7
    with torch.no_grad():
        for name, layer in quantized.items():
            assert layer.base.quant_type == quant_type and layer.base.double_quant
            dense[name].weight.copy_(layer.dense_base_weight(torch.float32))
    ids = torch.tensor([[1, 403, 407, 261, 378, 30, 5, 60, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits)
        plain = transformers.LlamaForCausalLM.from_pretrained(stories260k_dir).eval()(ids).logits
    assert not torch.allclose(ours(ids), plain)  # negative control: 4-bit weights do change the logits


def _write_sharded_llama(root, hidden=512, layers=6, vocab=1000, shards=3):
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": torch.randn(vocab, hidden, generator=g),
    }
    kv = hidden // 8 * 4
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj": (hidden, hidden),
            "self_attn.k_proj": (kv, hidden),
            "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (2 * hidden, hidden),
            "mlp.up_proj": (2 * hidden, hidden),
            "mlp.down_proj": (hidden, 2 * hidden),
        }
        for name, shape in shapes.items():
            tensors[p + name + ".weight"] = torch.randn(shape, generator=g) * 0.02
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    names = list(tensors)
    weight_map, per = {}, (len(names) + shards - 1) // shards
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * per : (s + 1) * per]}
        save_file(part, str(root / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


def test_sharded_checkpoint_loads_and_keys_are_checked(tmp_path):
    tensors = _write_sharded_llama(tmp_path / "m", hidden=64, layers=2, vocab=50, shards=3)
    model = qlora.load_model(tmp_path / "m", compute_dtype=torch.float32, device="cpu")
    q = model.model.layers[1].mlp.down_proj
    assert torch.equal(q.base.dequantize(), qlora.quantize(tensors["model.layers.1.mlp.down_proj.weight"]).dequantize())
    # a missing key and an unexpected key are both named
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    from safetensors.torch import load_file

    first = index["weight_map"]["model.norm.weight"]
    part = load_file(str(tmp_path / "m" / first))
    part.pop("model.norm.weight")
    part["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(part, str(tmp_path / "m" / first))
    index["weight_map"].pop("model.norm.weight")
    index["weight_map"]["model.layers.0.mlp.extra_proj.weight"] = first
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointKeyError, match=r"model\.norm\.weight.*model\.layers\.0\.mlp\.extra_proj\.weight"):
        qlora.load_model(tmp_path / "m", device="cpu")


@pytest.mark.slow
def test_peak_host_memory_is_one_shard_plus_the_quantized_model(tmp_path):
    """In a fresh process: RSS growth while loading <= largest shard + quantized model + 64 MiB of runtime slack.

    The dense fp32 model is ~3x the bound, so a loader that materialised it would fail.
    """
    tensors = _write_sharded_llama(tmp_path / "big", hidden=1024, layers=8, vocab=4000, shards=4)
    dense_bytes = sum(t.numel() * 4 for t in tensors.values())
    del tensors
    largest_shard = max(f.stat().st_size for f in (tmp_path / "big").glob("*.safetensors"))
    script = textwrap.dedent(f"""
        import resource, torch, qlora
        from qlora.lora import LoRALinear
        import qlora.loading, qlora.model.llama  # imports first: their memory is not the loader's
        torch.set_num_threads(2)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model = qlora.load_model({str(tmp_path / "big")!r}, compute_dtype=torch.bfloat16, device="cpu")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        held += sum(m.base.memory_bytes() for m in model.modules() if isinstance(m, LoRALinear))
        print((after - before) * 1024, held)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grown, held = map(int, out.stdout.split()[-2:])
    bound = largest_shard + held + 64 * 2**20
    assert grown <= bound, (
        f"grew {grown / 2**20:.0f} MiB; bound {bound / 2**20:.0f} MiB (dense {dense_bytes / 2**20:.0f})"
    )
    assert dense_bytes > bound  # the bound is meaningful: materialising the dense model would break it


def test_unsupported_architecture_and_bad_paths(tmp_path):
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        qlora.load_model(tmp_path / "gpt", device="cpu")
    with pytest.raises(ValueError, match="does not exist"):
        qlora.load_model(tmp_path / "nowhere", device="cpu")


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from qlora.loading import ModelSourceError

    with pytest.raises(ModelSourceError, match="could not download 'HuggingFaceTB/SmolLM2-135M'.*local directory"):
        qlora.load_model("HuggingFaceTB/SmolLM2-135M", device="cpu")
