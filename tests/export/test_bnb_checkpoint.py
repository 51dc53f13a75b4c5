"""bitsandbytes 4-bit checkpoints both ways: `qlora quantize` writes what transformers + bitsandbytes
load, and `qlora.load_model` / `qlora train` use a pre-quantized directory's stored codes as they are.

bitsandbytes 0.50.2 runs on the CPU here. Its eval-mode CPU fast path (AVX512-BF16 repacking,
`Linear4bit.support_avx512bf16_for_cpu`) asserts that out_features is a multiple of its block and
fails on stories260K's 172-wide MLP; `_bnb_generic_path` turns it off, which leaves bitsandbytes'
dequantize + F.linear path (the numerics every other device uses).

Tolerances: in float32 both sides dequantize the same codes to the same values and run the same
matmuls: measured max |diff| 0.0 on logits up to ~19; asserted at 1e-5.
"""

import json

import pytest
import torch
from safetensors import safe_open

import qlora
from qlora.adapter import load_adapter_weights
from qlora.checkpoint_io import CheckpointError
from qlora.cli import main
from qlora.export.bnb_checkpoint import quantize_checkpoint
from qlora.export.merge import MergeError, merge
from qlora.lora import LoRALinear

IDS = torch.tensor([[1, 403, 407, 261, 378, 30, 5, 60, 2]])
TOL = {"rtol": 1e-5, "atol": 1e-5}
LINEAR = "model.layers.{}.{}.weight"
LINEARS = [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")
]


def _bnb_generic_path(model):
    bnb = pytest.importorskip("bitsandbytes")
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # see the module docstring
    return model


def file_tensors(directory):
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)


def base_layers(model):
    return {f"{name}.weight": m.base for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@pytest.fixture(scope="module")
def transformers_saved(stories260k_dir, tmp_path_factory):
    """stories260K quantized by transformers + bitsandbytes and saved with save_pretrained (as on the Hub)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(stories260k_dir, quantization_config=config,
                                                              device_map="cpu", dtype=torch.float32)  # fmt: skip
    out = tmp_path_factory.mktemp("bnb") / "stories260K-bnb-nf4"
    model.save_pretrained(out)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_bytes((stories260k_dir / name).read_bytes())
    return out, _bnb_generic_path(model.eval())


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
def test_quantize_writes_bitsandbytes_own_bytes(stories260k_dir, tmp_path, quant_type, double_quant):
    F = pytest.importorskip("bitsandbytes.functional")
    out = quantize_checkpoint(stories260k_dir, tmp_path / "q", quant_type=quant_type, double_quant=double_quant)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == quant_type
    assert cfg["bnb_4bit_use_double_quant"] is double_quant and cfg["bnb_4bit_compute_dtype"] == "bfloat16"
    ours = file_tensors(out)
    original = file_tensors(stories260k_dir)
    assert ours["model.embed_tokens.weight"].dtype == torch.bfloat16  # embeddings and norms stay 16-bit
    nested_differ = nested_total = 0
    for layer in range(5):
        for linear in LINEARS:
            name = LINEAR.format(layer, linear)
            packed, state = F.quantize_4bit(original[name].to(torch.bfloat16), blocksize=64, quant_type=quant_type,
                                            compress_statistics=double_quant)  # fmt: skip
            assert torch.equal(ours[name], packed), name
            assert torch.equal(ours[f"{name}.quant_map"], state.code), name
            if not double_quant:
                assert torch.equal(ours[f"{name}.absmax"], state.absmax), name
                continue
            assert torch.equal(ours[f"{name}.nested_absmax"], state.state2.absmax), name
            blob = json.loads(bytes(ours[f"{name}.quant_state.bitsandbytes__nf4"].tolist()))
            assert blob["nested_offset"] == pytest.approx(state.offset.item(), rel=1e-6)
            # bitsandbytes-CPU picks nested 8-bit codes through an approximate lookup table (docs/LOG.md):
            # a few may differ from ours, which are the exact nearest (tested in tests/quant).
            nested_differ += (ours[f"{name}.absmax"] != state.absmax).sum().item()
            nested_total += state.absmax.numel()
    assert nested_differ <= 0.05 * nested_total


def test_transformers_loads_our_checkpoint_with_our_logits(stories260k_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    rc = main(["quantize", "--model", str(stories260k_dir), "--output", str(tmp_path / "q"), "--dtype", "fp32"])
    assert rc == 0
    theirs = _bnb_generic_path(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu"))
    assert isinstance(theirs.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    prequantized = qlora.load_model(tmp_path / "q", "nf4", compute_dtype=torch.float32, device="cpu")
    on_load = qlora.load_model(stories260k_dir, "nf4", compute_dtype=torch.float32, device="cpu")
    with torch.no_grad():
        ours = prequantized(IDS)
        torch.testing.assert_close(theirs.eval()(IDS).logits, ours, **TOL)
        torch.testing.assert_close(on_load(IDS), ours, rtol=0, atol=0)  # the file holds what we quantize on load
        assert (ours - qlora.load_model(stories260k_dir, None, compute_dtype=torch.float32, device="cpu")(IDS)).abs(
        ).max() > 1e-2  # and it is 4-bit, not the dense model  # fmt: skip


def test_load_model_uses_the_stored_codes_as_they_are(transformers_saved, stories260k_dir):
    directory, theirs = transformers_saved
    stored = file_tensors(directory)
    model = qlora.load_model(directory, "nf4", compute_dtype=torch.float32, device="cpu")
    differs_from_requantizing = 0
    for name, q in base_layers(model).items():
        assert torch.equal(q.packed, stored[name]), name
        assert torch.equal(q.nested.codes, stored[f"{name}.absmax"]), name
        assert torch.equal(q.nested.absmax, stored[f"{name}.nested_absmax"]), name
        requantized = qlora.quantize(q.dequantize(torch.float32))
        differs_from_requantizing += not torch.equal(requantized.nested.codes, q.nested.codes)
    # Negative control: bitsandbytes-CPU's approximate nested codes are not what our quantizer
    # would produce, so equality above means the stored codes were taken as they are.
    assert differs_from_requantizing > 0
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), theirs(IDS).logits, **TOL)


def test_the_stored_format_wins_over_the_requested_one(stories260k_dir, tmp_path, caplog):
    out = quantize_checkpoint(stories260k_dir, tmp_path / "q", quant_type="fp4", double_quant=False)
    with caplog.at_level("WARNING", logger="qlora.loading"):
        model = qlora.load_model(out, "nf4", compute_dtype=torch.float32, device="cpu")
    assert "stored pre-quantized" in caplog.text
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.quant.quant_type == layer.base.quant_type == "fp4" and not layer.base.double_quant
    dense = qlora.load_model(out, None, compute_dtype=torch.float32, device="cpu")  # None: dequantized, dense
    assert isinstance(dense.model.layers[0].self_attn.q_proj.base, torch.Tensor)
    with torch.no_grad():
        torch.testing.assert_close(dense(IDS), model(IDS), rtol=1e-5, atol=1e-5)


def test_merge_onto_a_prequantized_base_uses_its_codes(transformers_saved, tmp_path, make_adapter):
    transformers = pytest.importorskip("transformers")
    directory, _ = transformers_saved
    lora = make_adapter(directory, tmp_path / "adapter")  # adapters made on the dequantized stored weights
    out = merge(directory, tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ours = qlora.load_model(directory, "nf4", compute_dtype=torch.float32, device="cpu", lora=lora)
    load_adapter_weights(ours, tmp_path / "adapter")
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(IDS).logits
        torch.testing.assert_close(merged, ours(IDS), rtol=1e-4, atol=1e-4)  # reordering only, as in test_merge.py


@pytest.mark.slow  # a real (2-step) training run on the pre-quantized checkpoint
def test_train_accepts_a_prequantized_checkpoint(transformers_saved, shared_dir, tmp_path):
    directory, _ = transformers_saved
    rc = main(["train", "--model", str(directory), "--data", str(shared_dir / "data/instruct/alpaca_en_demo.json"),
               "--output", str(tmp_path / "run"), "--max-steps", "2", "--lora-r", "4", "--device", "cpu",
               "--model.compute_dtype", "float32", "--data.max_source_len", "32", "--data.max_target_len", "16",
               "--train.grad_accum", "1"])  # fmt: skip
    assert rc == 0 and (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_prequantized_errors(transformers_saved, stories260k_dir, tmp_path):
    directory, _ = transformers_saved
    with pytest.raises(MergeError, match="no original 16-bit weights"):
        merge(directory, None, tmp_path / "m", onto="original")
    with pytest.raises(MergeError, match="already stored 4-bit"):
        quantize_checkpoint(directory, tmp_path / "q")
    with pytest.raises(MergeError, match="no bitsandbytes encoding"):
        quantize_checkpoint(stories260k_dir, tmp_path / "q", quant_type="int4")
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    cfg = json.loads((stories260k_dir / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    (gptq / "model.safetensors").write_bytes((stories260k_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="'gptq' is not supported"):
        qlora.load_model(gptq, "nf4", device="cpu")
