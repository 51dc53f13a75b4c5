"""Shared by the export tests: a saved adapter whose B is non-zero (a zero B would make every
comparison of "with adapter" against "without" vacuous)."""

import pytest
import torch

import qlora
from qlora.adapter import save_adapter
from qlora.lora import LoraSpec, lora_layers


def save_random_adapter(model_path, directory, targets=("q_proj", "v_proj", "down_proj"), seed=0) -> LoraSpec:
    lora = LoraSpec(r=4, alpha=8, dropout=0.0, targets=targets)
    torch.manual_seed(seed)  # A is drawn when the adapters are created, B below: both seeded
    model = qlora.load_model(model_path, None, compute_dtype=torch.float32, device="cpu", lora=lora)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    save_adapter(model, directory, lora, str(model_path))
    return lora


@pytest.fixture(scope="session")
def make_adapter():
    return save_random_adapter
