"""The names the configuration accepts, each list kept once: optimizers, dtypes (with their aliases),
4-bit types, and the default LoRA target modules.

Every other module derives from these tables instead of spelling the names again: the `Literal`
types below are what the config fields are annotated with (so `--help` choices and value checks
follow), `qlora.optim` builds its optimizers by `OPTIMIZER_NAMES`, `qlora.precision` maps
`DTYPE_NAMES` to torch dtypes, and `qlora.lora` takes `DEFAULT_TARGETS`.

Dtypes have one canonical spelling (torch's attribute name, "bfloat16") and short aliases ("bf16",
the spelling of `--dtype` in `qlora merge` since its first version, and of transformers'
`--bf16`); `canonical_dtype_name` is the one place an alias is resolved. A GGUF tensor type
("f16", "q8_0") is a file format, not a compute dtype, and is not in this table.

No torch here: reading flags or a config file must not need it.
"""

from __future__ import annotations

from typing import Literal, get_args

# The optimizers `qlora.optim.build_optimizer` understands (transformers' names). This Literal is the
# registry: add a name here and its implementation in qlora/optim; choices, checks and the factory follow.
OptimName = Literal["adamw", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"]
OPTIMIZER_NAMES: tuple[str, ...] = get_args(OptimName)

# Floating-point dtypes by canonical name; AUTO resolves per device (`qlora.precision.resolve_compute_dtype`).
DtypeName = Literal["bfloat16", "float16", "float32"]
ComputeDtype = Literal["auto", "bfloat16", "float16", "float32"]
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)
AUTO = "auto"
DTYPE_ALIASES: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                                 "float": "float32"}  # fmt: skip

# How the frozen base is stored: a 4-bit type, or none (kept in the compute dtype: plain LoRA).
QuantType = Literal["nf4", "fp4", "int4", "none"]
# The same, where "auto" means: as the adapter's training run stored it (its config.yaml), else nf4.
SourceQuantType = Literal["auto", "nf4", "fp4", "int4", "none"]

# All seven projections of a Llama block: the QLoRA paper's finding is that adapters on every linear
# layer are what match full 16-bit finetuning.
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def canonical_dtype_name(name: str) -> str:
    """ "bf16" -> "bfloat16"; a canonical name (or "auto") as it is; anything else unchanged (checked by the caller)."""
    return DTYPE_ALIASES.get(name.strip().lower(), name) if isinstance(name, str) else name


def aliases_of(canonical: str) -> tuple[str, ...]:
    """The aliases that mean `canonical` ("bfloat16" -> ("bf16",))."""
    return tuple(alias for alias, name in DTYPE_ALIASES.items() if name == canonical)
