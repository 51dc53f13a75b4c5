"""Adapters in PEFT's format: PEFT loads ours onto transformers' model with the same logits, and back."""

import json

import pytest
import torch

import qlora
from qlora.adapter import AdapterError, load_adapter_weights, read_adapter_config, save_adapter
from qlora.lora import LoRALinear, LoraSpec, lora_layers

IDS = torch.tensor([[1, 403, 407, 261, 378, 30, 5, 60, 2]])


def adapted_model(path, quant_type, seed=0):
    lora = LoraSpec(r=4, alpha=8, dropout=0.0)
    model = qlora.load_model(path, quant_type, compute_dtype=torch.float32, device="cpu", lora=lora)
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():  # non-zero B: a zero adapter would prove nothing
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    return model, lora


@pytest.mark.parametrize("quant_type", [None, "nf4"])
def test_peft_loads_our_adapter_with_the_same_logits(stories260k_dir, tmp_path, quant_type):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    ours, lora = adapted_model(stories260k_dir, quant_type)
    save_adapter(ours, tmp_path, lora, str(stories260k_dir))
    base = transformers.LlamaForCausalLM.from_pretrained(stories260k_dir).eval()
    if quant_type is not None:  # the same 4-bit base on both sides: copy our dequantized weights in
        modules = dict(base.named_modules())
        with torch.no_grad():
            for name, layer in ours.named_modules():
                if isinstance(layer, LoRALinear):
                    modules[name].weight.copy_(layer.dense_base_weight(torch.float32))
    with torch.no_grad():
        base_logits = base(IDS).logits.clone()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        ours_logits, theirs_logits = ours(IDS), theirs(IDS).logits
    # Same float32 maths in another order (PEFT adds the two branches after separate matmuls).
    torch.testing.assert_close(ours_logits, theirs_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(theirs_logits, base_logits, atol=1e-3)  # the adapter did change the output


def test_peft_saved_adapter_loads_into_ours(stories260k_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.LlamaForCausalLM.from_pretrained(stories260k_dir).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    theirs = peft.get_peft_model(base, config).eval()
    theirs.save_pretrained(tmp_path)
    spec = read_adapter_config(tmp_path)
    assert spec.r == 4 and spec.alpha == 8 and set(spec.targets) == {"q_proj", "v_proj", "down_proj"}
    ours = qlora.load_model(stories260k_dir, None, compute_dtype=torch.float32, device="cpu", lora=spec)
    load_adapter_weights(ours, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs(IDS).logits, rtol=1e-5, atol=1e-5)


def test_adapter_files_and_errors(stories260k_dir, tmp_path):
    ours, lora = adapted_model(stories260k_dir, "nf4")
    save_adapter(ours, tmp_path / "a", lora, "base-path")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["base_model_name_or_path"] == "base-path"
    other = qlora.load_model(stories260k_dir, "nf4", compute_dtype=torch.float32, device="cpu",
                             lora=LoraSpec(r=8, dropout=0.0))  # fmt: skip
    with pytest.raises(AdapterError, match="lora_A.weight has shape"):
        load_adapter_weights(other, tmp_path / "a")
    with pytest.raises(AdapterError, match="adapter_config.json: not found"):
        read_adapter_config(tmp_path)
