"""Shared training fixtures: a small fixed configuration on stories260K and the Alpaca sample (CPU,
float32), and a tiny in-process QLoRA model."""

from pathlib import Path

import torch
from torch import nn

from qlora.config import TrainConfig
from qlora.fused import use_fused_elementwise
from qlora.lora import DEFAULT_TARGETS, LoraSpec, QuantSpec, lora_layers, mark_only_lora_trainable, replace_linears
from qlora.model.config import ModelConfig
from qlora.model.llama import LlamaForCausalLM
from qlora.ops import KernelPolicy, apply_policy

VOCAB = 61

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
ALPACA = SHARED / "data" / "instruct" / "alpaca_en_demo.json"


def tiny_config(output, **train_overrides) -> TrainConfig:
    train = {"max_steps": 8, "micro_batch_size": 2, "grad_accum": 2, "log_every": 1, "warmup_steps": 2}
    train.update(train_overrides)
    return TrainConfig.from_dict({
        "model": {"path": str(STORIES), "compute_dtype": "float32"},
        "quant": {"quant_type": "nf4"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "data": {"path": str(ALPACA), "max_source_len": 48, "max_target_len": 32, "eval_fraction": 0.01},
        "optim": {"lr": 1e-3},
        "train": train,
        "output": str(output),
        "seed": 0,
        "device": "cpu",
    })  # fmt: skip


def tiny_qlora_model(device: str, dtype=torch.float32, quant: str | None = "nf4", dropout=0.0, seed=0):
    """Two decoder layers, NF4 base, LoRA r=8 on every linear (B random so A gets gradients), checkpointing."""
    cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "rms_norm_eps": 1e-5, "max_position_embeddings": 128})  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in DEFAULT_TARGETS}  # fmt: skip
    replace_linears(model, QuantSpec(quant, 64, True), LoraSpec(r=8, alpha=16.0, dropout=dropout), device="cpu",
                    dtype=dtype)  # fmt: skip
    for name, layer in lora_layers(model).items():
        layer.set_base_weight(dense[name])
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.1)
    policy = KernelPolicy.from_env()
    use_fused_elementwise(model, policy)
    apply_policy(model, policy)
    model.gradient_checkpointing = True
    model.to(device).train()
    return model, mark_only_lora_trainable(model)
