"""`qlora.load`: the one loader of the commands, on the stories260K checkpoint, with and without an adapter.

The adapter's B is random (a zero B would make "with adapter" equal "without" and the test vacuous),
and the logits through `load` are compared with those of `load_model` + the adapter reader built by
hand, so `load` is checked against the pieces it promises to call.
"""

from __future__ import annotations

import logging

import pytest
import torch

import qlora
from qlora.adapter import load_adapter_weights, read_adapter_config, save_adapter
from qlora.lora import LoRALinear, LoraSpec, lora_layers

IDS = torch.tensor([[1, 40, 70, 300, 12, 99, 5]])


@pytest.fixture(scope="module")
def adapter(stories260k_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapter")
    lora = LoraSpec(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
    torch.manual_seed(0)
    model = qlora.load_model(stories260k_dir, None, compute_dtype=torch.float32, device="cpu", lora=lora)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    save_adapter(model, directory, lora, str(stories260k_dir))
    return directory


def _logits(model):
    with torch.no_grad():
        return model(IDS).float()


def test_load_without_adapter(stories260k_dir, caplog):
    with caplog.at_level(logging.INFO, logger="qlora.loading"):
        loaded = qlora.load(stories260k_dir, compute_dtype="fp32", device="cpu")
    assert loaded.compute_dtype is torch.float32 and loaded.device == torch.device("cpu")
    assert "compute dtype float32: as asked" in caplog.text and loaded.dtype_reason in caplog.text
    assert loaded.tokenizer.encode("Once upon a time", add_bos=True)[0] == loaded.tokenizer.bos_id
    layers = [m for m in loaded.model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.base.quant_type == "nf4" and m.base.double_quant for m in layers)  # auto: nf4 + DQ
    assert not lora_layers(loaded.model)  # no adapters without an adapter
    reference = qlora.load_model(stories260k_dir, "nf4", True, torch.float32, "cpu")
    assert torch.equal(_logits(loaded.model), _logits(reference))


def test_load_with_adapter_equals_the_pieces_and_differs_from_the_base(stories260k_dir, adapter):
    with_adapter = _logits(qlora.load(stories260k_dir, adapter, compute_dtype="float32", device="cpu").model)
    base = _logits(qlora.load(stories260k_dir, compute_dtype="float32", device="cpu").model)
    assert (with_adapter - base).abs().max() > 1e-3  # negative control: the adapter changes the output
    by_hand = qlora.load_model(stories260k_dir, "nf4", True, torch.float32, "cpu", lora=read_adapter_config(adapter))
    load_adapter_weights(by_hand, adapter)
    assert torch.equal(with_adapter, _logits(by_hand))


def test_auto_quantization_follows_the_adapters_training_run(stories260k_dir, adapter):
    (adapter / "config.yaml").write_text("quant:\n  quant_type: fp4\n  double_quant: false\n  blocksize: 128\n")
    try:
        loaded = qlora.load(stories260k_dir, adapter, compute_dtype="float32", device="cpu")
        layer = next(m for m in loaded.model.modules() if isinstance(m, LoRALinear))
        assert (layer.base.quant_type, layer.base.double_quant, layer.base.blocksize) == ("fp4", False, 128)
        explicit = qlora.load(stories260k_dir, adapter, quant_type="none", compute_dtype="float32", device="cpu")
        layer = next(m for m in explicit.model.modules() if isinstance(m, LoRALinear))
        assert layer.quant.quant_type is None  # an explicit type wins over the run's
    finally:
        (adapter / "config.yaml").unlink()
