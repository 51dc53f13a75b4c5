"""Floor 3, the one dispatch point: each op runs its Triton kernel or its plain-PyTorch twin as the
model's `KernelPolicy` says (`policy`: the object; `dispatch`: the ops). Nothing above this floor
branches on the device to pick an implementation."""

from qlora.ops.dispatch import (
    DropoutMask,
    adamw_step_,
    add_masked_lowrank_,
    apply_rotary,
    copy_into_columns_,
    cross_entropy_sum,
    dequantize,
    dropout_backward,
    dropout_project,
    matmul_4bit,
    reads_4bit_codes,
    rms_norm,
    swiglu,
)
from qlora.ops.policy import CHOICES, ENV_VAR, KernelPolicy, apply_policy, has_float32_product_mm, policy_of

__all__ = [
    "CHOICES",
    "ENV_VAR",
    "DropoutMask",
    "KernelPolicy",
    "adamw_step_",
    "apply_policy",
    "add_masked_lowrank_",
    "apply_rotary",
    "copy_into_columns_",
    "cross_entropy_sum",
    "dequantize",
    "dropout_backward",
    "dropout_project",
    "has_float32_product_mm",
    "matmul_4bit",
    "reads_4bit_codes",
    "policy_of",
    "rms_norm",
    "swiglu",
]
