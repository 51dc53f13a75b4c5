"""`prepare_for_training(model, ...)`: every speed and memory setting of a training step, applied in one place.

A model from `qlora.load_model` computes correctly as it is; training it the way `qlora train` does
also needs gradient checkpointing, the checkpoints' dense-weight reuse, the residual stream's dtype,
the checkpoints in host memory, the frozen base and the model's kernel policy handed to every
layer. The `Trainer` calls this function, and a Python user who writes their own loop calls it too,
so both get the same step (the CUDA graph and the optimizer's place are the step's own:
`qlora.train.step.TrainStep`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qlora.lora import mark_only_lora_trainable
from qlora.model.offload import CheckpointOffload
from qlora.ops import KernelPolicy, apply_policy, policy_of

log = logging.getLogger("qlora.train")


def prepare_for_training(
    model: nn.Module,
    *,
    gradient_checkpointing: bool = True,
    reuse_dense_weights: bool = True,
    residual_dtype: torch.dtype | None = None,
    offload_checkpoints: bool = False,
    policy: KernelPolicy | None = None,
) -> list[nn.Parameter]:
    """Set `model` (a `LlamaForCausalLM` with LoRA layers) up for training; return its trainable parameters
    (the adapters; everything else frozen). The defaults are `qlora train`'s.

    gradient_checkpointing: recompute each decoder layer in backward (activation memory of one layer).
    reuse_dense_weights: with checkpointing, each layer's recompute keeps its dequantized weights for its
        backward (two dequantizations per step instead of three, for one layer's 16-bit weights of memory).
    residual_dtype: hold the residual stream between layers in this dtype (None: the compute dtype).
    offload_checkpoints: with checkpointing on CUDA, each layer's checkpointed input waits in pinned host
        memory (ignored elsewhere, with a log line).
    policy: the kernel policy to run with (default: the model's own, `model.policy`).
    """
    policy = apply_policy(model, policy if policy is not None else policy_of(model))
    model.gradient_checkpointing = gradient_checkpointing
    model.residual_dtype = residual_dtype
    model.checkpoint_context = policy.reusing_dense_weights if gradient_checkpointing and reuse_dense_weights \
        else None  # fmt: skip
    device = next(model.parameters()).device
    model.checkpoint_offload = None
    if offload_checkpoints and device.type == "cuda" and gradient_checkpointing:
        model.checkpoint_offload = CheckpointOffload(device)
    elif offload_checkpoints:
        log.info("offload_checkpoints: nothing to offload on %s%s; ignored", device,
                 "" if gradient_checkpointing else " without gradient checkpointing")  # fmt: skip
    params = mark_only_lora_trainable(model)
    if not params:
        raise ValueError("prepare_for_training: the model has no LoRA adapters to train (load it with lora=LoraSpec())")
    model.train()
    return params
