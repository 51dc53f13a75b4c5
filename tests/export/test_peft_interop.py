"""Adapters both ways with the real PEFT, beyond tests/test_adapter.py (which covers `save_adapter`
output and an explicit-target PEFT adapter): here the adapter comes out of an actual `qlora train`
run, and PEFT's adapter is "all-linear" with rsLoRA, used for generation and merging.

Both sides run float32 on the same unquantized base (`quant_type=None` here, transformers' own
weights there), so the only difference is the order of float32 operations: asserted at 1e-5
(measured max |diff| ~2e-6 on logits up to ~17). Each test also checks the adapter moved the
logits by far more than that (a zero adapter would pass any comparison).
"""

import json

import pytest
import torch

import qlora
from qlora.adapter import load_adapter_weights, read_adapter_config
from qlora.cli import main
from qlora.export.merge import merge
from qlora.lora import DEFAULT_TARGETS

IDS = torch.tensor([[1, 403, 407, 261, 378, 30, 5, 60, 2]])
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.slow  # a real (3-step) training run: ~5-12 s on the shared 2-core CPU
def test_peft_loads_the_adapter_qlora_train_wrote(stories260k_dir, shared_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    out, data = tmp_path / "run", shared_dir / "data/instruct/alpaca_en_demo.json"
    rc = main(["train", "--model", str(stories260k_dir), "--data", str(data),
               "--output", str(out), "--max-steps", "3", "--lora-r", "4", "--lr", "1e-2", "--seed", "1",
               "--device", "cpu", "--quant-type", "none", "--model.compute_dtype", "float32",
               "--data.max_source_len", "32", "--data.max_target_len", "16", "--train.grad_accum", "2"])  # fmt: skip
    assert rc == 0
    spec = read_adapter_config(out)
    ours = qlora.load_model(stories260k_dir, None, compute_dtype=torch.float32, device="cpu", lora=spec)
    load_adapter_weights(ours, out)
    base = transformers.LlamaForCausalLM.from_pretrained(stories260k_dir).eval()
    with torch.no_grad():
        base_logits = base(IDS).logits.clone()
        theirs = peft.PeftModel.from_pretrained(base, out).eval()
        theirs_logits, ours_logits = theirs(IDS).logits, ours(IDS)
    torch.testing.assert_close(ours_logits, theirs_logits, **TOL)
    assert (theirs_logits - base_logits).abs().max() > 1e-2  # three steps at lr 1e-2 moved the adapter


def test_peft_all_linear_rslora_adapter_loads_generates_and_merges(stories260k_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.LlamaForCausalLM.from_pretrained(stories260k_dir).eval()
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", use_rslora=True,
                             init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    theirs = peft.get_peft_model(base, config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {t.rsplit(".", 1)[-1] for t in saved["target_modules"]} == set(DEFAULT_TARGETS)
    spec = read_adapter_config(tmp_path / "peft")
    assert spec.use_rslora and spec.scale == 16 / 2 and len(spec.targets) == 7
    ours = qlora.load_model(stories260k_dir, None, compute_dtype=torch.float32, device="cpu", lora=spec)
    load_adapter_weights(ours, tmp_path / "peft")
    with torch.no_grad():
        theirs_logits = theirs(IDS).logits
        torch.testing.assert_close(ours(IDS), theirs_logits, **TOL)
        with theirs.disable_adapter():
            assert (theirs(IDS).logits - theirs_logits).abs().max() > 1e-2

    rc = main(["generate", "--model", str(stories260k_dir), "--adapter", str(tmp_path / "peft"), "--prompt",
               "Once upon a time", "--max-new-tokens", "4", "--dtype", "float32", "--device", "cpu"])  # fmt: skip
    assert rc == 0 and "### Once upon a time" in capsys.readouterr().out

    # Our merge onto the original weights equals PEFT's own merge_and_unload.
    rc = main(["merge", "--model", str(stories260k_dir), "--adapter", str(tmp_path / "peft"), "--output",
               str(tmp_path / "merged"), "--onto", "original", "--dtype", "fp32", "--no-report"])  # fmt: skip
    assert rc == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft_merged = theirs.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, peft_merged(IDS).logits, **TOL)
    for name, weight in peft_merged.state_dict().items():
        if name.endswith("_proj.weight"):  # the merged weights themselves, not only their logits
            torch.testing.assert_close(merged.state_dict()[name], weight, rtol=1e-6, atol=1e-6)


def test_merge_of_a_pattern_adapter_equals_peft_merge_and_unload(stories260k_dir, tmp_path):
    """Per-layer r and alpha (PEFT's rank_pattern / alpha_pattern) in the merged delta: each layer's
    own scale, as PEFT's merge_and_unload computes it on the same 16-bit base."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"layers.0.self_attn.q_proj": 8, "down_proj": 2},
                             alpha_pattern={r"layers\.[12]\.self_attn\.v_proj": 32}, init_lora_weights=False,
                             task_type="CAUSAL_LM")  # fmt: skip
    peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(stories260k_dir), config).save_pretrained(
        tmp_path / "peft"
    )
    base = transformers.LlamaForCausalLM.from_pretrained(stories260k_dir)
    peft_merged = peft.PeftModel.from_pretrained(base, tmp_path / "peft").merge_and_unload().eval()
    merge(stories260k_dir, tmp_path / "peft", tmp_path / "merged", dtype=torch.float32, onto="original")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    plain = transformers.LlamaForCausalLM.from_pretrained(stories260k_dir).state_dict()
    ours = merged.state_dict()
    for name, weight in peft_merged.state_dict().items():
        torch.testing.assert_close(ours[name], weight, rtol=1e-6, atol=1e-6, msg=name)  # float32, one add each
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight",
                 "model.layers.3.mlp.down_proj.weight"):  # fmt: skip
        assert (ours[name] - plain[name]).abs().max() > 1e-2, name  # the adapter is in each of these
    # negative control: one scale for all layers (the old reader's mistake) is not PEFT's merge
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**cfg, "alpha_pattern": {}}))
    merge(stories260k_dir, tmp_path / "peft", tmp_path / "one-scale", dtype=torch.float32, onto="original")
    one_scale = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one-scale").state_dict()
    name = "model.layers.1.self_attn.v_proj.weight"
    assert (one_scale[name] - peft_merged.state_dict()[name]).abs().max() > 1e-2
