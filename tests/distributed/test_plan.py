"""`--parallel auto`: DDP when the estimate fits 80% of one GPU, FSDP otherwise; the estimate itself."""

import torch

from qlora.config import DEFAULT_TARGETS
from qlora.distributed import Runtime
from qlora.distributed.plan import choose_mode, training_bytes
from qlora.model.config import ModelConfig

LLAMA2_70B = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 32000, "hidden_size": 8192,
                                   "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
                                   "num_key_value_heads": 8, "rms_norm_eps": 1e-5})  # fmt: skip
LLAMA2_7B = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
                                  "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                                  "num_key_value_heads": 32, "rms_norm_eps": 1e-5})  # fmt: skip
JOB = Runtime(rank=0, world_size=8, device=torch.device("cuda", 0), backend="nccl")
GIB = 2**30


def test_the_estimate_is_the_4bit_model_plus_adapters_and_activations():
    need = training_bytes(LLAMA2_70B, 64, DEFAULT_TARGETS, 512)
    # base 32.9 GiB + 16-bit 1.0 + adapters (0.83 G parameters x 16 bytes: fp32 weight, gradient, AdamW's two) 12.3
    assert 46 * GIB < need < 48.5 * GIB
    assert training_bytes(LLAMA2_7B, 64, DEFAULT_TARGETS, 4 * 512) < 10 * GIB


def test_auto_takes_ddp_when_one_gpu_holds_the_run_and_fsdp_when_not():
    need_7b = training_bytes(LLAMA2_7B, 64, DEFAULT_TARGETS, 4 * 512)
    need_70b = training_bytes(LLAMA2_70B, 64, DEFAULT_TARGETS, 512)
    assert choose_mode("auto", JOB, need_7b, 80 * GIB)[0] == "ddp"
    mode, why = choose_mode("auto", JOB, need_70b, 24 * GIB)
    assert mode == "fsdp" and "8 GPUs" in why and "GiB" in why
    assert choose_mode("auto", JOB, need_70b, 80 * GIB)[0] == "ddp"  # 47 GiB of 80: within 64


def test_explicit_modes_one_process_and_cpus():
    assert choose_mode("fsdp", JOB, 1, 80 * GIB) == ("fsdp", "--parallel fsdp")
    assert choose_mode("auto", Runtime(), 1, None)[0] == "none"
    cpus = Runtime(rank=0, world_size=2, device=torch.device("cpu"), backend="gloo")
    assert choose_mode("auto", cpus, 10 * GIB, None)[0] == "ddp"
