"""The training configuration: `TrainConfig`, one tree of typed dataclasses, the single source of every
knob of `qlora train`.

`TrainConfig` holds six sections (`model`, `quant`, `lora`, `data`, `optim`, `train`) and three
top-level fields (`output`, `seed`, `device`). Everything else is derived from these classes: the
command-line flags and `--help` (`qlora.cli_args`), the strict config-file loader
(`qlora.config.files`), the resolved `config.yaml` written next to a run, and the error messages.
Defaults are the QLoRA paper's (r=64, alpha=16, lr 2e-4, batch 1 x 16 accumulation, max grad norm
0.3, beta2 0.999, constant schedule; `format-spec.md` 5), except the compute dtype: `auto`
(`qlora.precision.resolve_compute_dtype`), bf16 only where the device computes it natively.

Validation happens in `__post_init__` (so an invalid config object cannot be built) and again
through `validate()` after a caller mutates one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from qlora.config.checks import (
    blocksize,
    eval_fraction,
    module_names,
    non_empty_str,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    unit_interval_closed,
    unit_interval_open,
)
from qlora.config.errors import ConfigError
from qlora.config.fields import Section, _opt
from qlora.config.names import DEFAULT_TARGETS, ComputeDtype, OptimName, QuantType
from qlora.config.root import Config
from qlora.config.source import ModelSource, compute_dtype_field, device_field, model_path_field

LrSchedule = Literal["constant", "cosine", "linear"]
AdapterDtype = Literal["float32", "bfloat16"]
ResidualDtype = Literal["compute", "float32"]
PagePolicy = Literal["auto", "always"]

# The QLoRA paper's hyperparameters change with model size (format-spec 5.2: the Guanaco scripts use
# lr 2e-4 / dropout 0.1 for 7B and 13B... except 13B's 0.05 dropout; 1e-4 / 0.05 for 33B and 65B).
# `resolve_size_defaults` applies them where the user left the field unset.
LARGE_MODEL_PARAMS = 30e9  # LLaMA "33B" has 32.5e9 parameters; 13B models stay below
PAPER_DEFAULTS_BY_SIZE = {"small": {"lr": 2e-4, "dropout": 0.1}, "large": {"lr": 1e-4, "dropout": 0.05}}


def resolve_size_defaults(lr: float | None, dropout: float | None, n_params: float) -> tuple[float, float]:
    """(lr, dropout): the given values, or the paper's for a model of `n_params` parameters."""
    paper = PAPER_DEFAULTS_BY_SIZE["large" if n_params >= LARGE_MODEL_PARAMS else "small"]
    return (paper["lr"] if lr is None else lr, paper["dropout"] if dropout is None else dropout)


@dataclass(kw_only=True)
class ModelSection(Section):
    """The base model: where to load it from and how to run it."""

    SECTION: ClassVar[str] = "model"

    path: str = model_path_field()
    compute_dtype: ComputeDtype = compute_dtype_field()
    residual_dtype: ResidualDtype = _opt(
        "compute",
        doc="Dtype of the residual stream between decoder layers: compute (compute_dtype, as transformers runs a "
        "bf16 model) or float32 (held and summed in fp32 while every layer still computes in compute_dtype, "
        "what transformers + peft's prepare_model_for_kbit_training and the QLoRA paper's script get from "
        "their fp32 norms; twice the memory of the checkpointed layer inputs).",
    )
    gradient_checkpointing: bool = _opt(
        True,
        doc="Recompute each decoder block's activations during the backward pass: activation memory of "
        "one block instead of all, for one extra forward pass of compute.",
    )
    reuse_dense_weights: bool = _opt(
        True,
        doc="With gradient checkpointing: keep each layer's dequantized weights from its recompute for its "
        "backward, so every 4-bit weight is dequantized twice per step instead of three times (measured: 7B "
        "+1-3%, 65B +9% tokens/s); costs up to one decoder layer's 16-bit weights of memory (measured peak: "
        "7B +0.3-0.4 GiB, 65B +1.2 GiB). Turn off when a run is short of memory by about that much.",
    )
    offload_checkpoints: bool = _opt(
        False,
        doc="With gradient checkpointing on CUDA: keep each decoder layer's checkpointed input in pinned host "
        "memory between forward and backward, copied out and back on side streams one layer ahead (layers x "
        "tokens x hidden values off the GPU: 65B at 512 tokens 0.6 GiB, 8B at 8,192 2 GiB; measured at no cost "
        "in speed on an H100).",
    )
    max_seq_len: int | None = _opt(
        None,
        doc="Hard cap on tokens per example after source/target truncation; none = "
        "data.max_source_len + data.max_target_len.",
        check=positive_int,
    )


@dataclass(kw_only=True)
class QuantSection(Section):
    """How the frozen base weights are stored."""

    SECTION: ClassVar[str] = "quant"

    quant_type: QuantType = _opt(
        "nf4",
        doc="4-bit data type of the frozen base weights: nf4 (the paper's NormalFloat), fp4, int4, or "
        "none (keep them in compute_dtype: plain LoRA).",
        alias="--quant-type",
    )
    double_quant: bool = _opt(
        True,
        doc="Quantize the per-block absmax constants to 8 bits (block 256), ~0.127 instead of 0.5 bits/parameter.",
    )
    blocksize: int = _opt(64, doc="Elements per absmax block of the 4-bit weights.", check=blocksize)


@dataclass(kw_only=True)
class LoraSection(Section):
    """The LoRA adapters trained on top of the frozen base."""

    SECTION: ClassVar[str] = "lora"

    r: int = _opt(64, doc="LoRA rank (inner dimension of A and B).", alias="--lora-r", check=positive_int)
    alpha: float = _opt(
        16.0,
        doc="LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).",
        check=positive_float,
    )
    dropout: float | None = _opt(
        None,
        doc="Dropout on the adapter input; none = the paper's by model size: 0.1 below 33B parameters, 0.05 from "
        "33B up (see PAPER_DEFAULTS_BY_SIZE).",
        check=unit_interval_open,
    )
    target_modules: list[str] = _opt(
        doc="Names of the linear layers that get adapters, matched against the last component of the "
        "module name; all seven projections of a Llama block by default (the paper's finding).",
        factory=lambda: list(DEFAULT_TARGETS),
        check=module_names,
    )
    use_rslora: bool = _opt(False, doc="Rank-stabilized LoRA: scale by alpha / sqrt(r) instead of alpha / r.")
    param_dtype: AdapterDtype = _opt(
        "float32",
        doc="Storage of the adapter weights and their gradients: float32 (PEFT's default) or bfloat16 (the QLoRA "
        "paper's script; half the adapter memory, updates rounded to bfloat16; optimizer states stay float32). "
        "Saved adapters are float32 either way.",
    )
    init_from: str | None = _opt(
        None,
        doc="Continue training an existing LoRA adapter directory (saved by qlora or by peft): its r, alpha, "
        "rsLoRA and target modules replace lora.r/alpha/use_rslora/target_modules and its weights are the "
        "starting point; dropout and everything else are this run's. none = fresh adapters.",
        alias="--adapter",
        check=non_empty_str,
    )


@dataclass(kw_only=True)
class DataSection(Section):
    """The instruction data and how it is cut into training examples."""

    SECTION: ClassVar[str] = "data"

    path: str = _opt(
        doc="Training data: a local .json/.jsonl file or directory of them.",
        alias="--data",
        check=non_empty_str,
    )
    format: str = _opt(
        "auto",
        doc="Record format (e.g. alpaca, oasst1, chat, input-output); auto detects it from the fields "
        "of the first record.",
        check=non_empty_str,
    )
    max_source_len: int = _opt(384, doc="Tokens kept of each prompt (source), truncated.", check=positive_int)
    max_target_len: int = _opt(128, doc="Tokens kept of each response (target), truncated.", check=positive_int)
    train_on_source: bool = _opt(
        False, doc="Also compute the loss on the prompt tokens (by default only the response is learned)."
    )
    eval_fraction: float = _opt(
        0.05,
        doc="Held-out evaluation split when the data has none: a fraction in [0, 1) of the examples, "
        "or a whole number >= 1 of examples (the QLoRA script holds out 1024); 0 = no evaluation.",
        check=eval_fraction,
    )
    eval_max_examples: int = _opt(
        200,
        doc="Evaluate on at most this many held-out examples per evaluation (0 = all).",
        check=non_negative_int,
    )
    pack_len: int | None = _opt(
        None,
        doc="Pack training examples into rows of this many tokens (attention never crosses a document; "
        "positions restart per document); none = no packing. Evaluation is never packed.",
        check=positive_int,
    )
    group_by_length: bool = _opt(
        False, doc="Batch examples of similar length together (QLoRA's group_by_length), seeded and resumable."
    )
    languages: list[str] | None = _opt(
        None, doc="OASST1 only: keep conversations in these language codes (e.g. en,es); none = all."
    )
    block_size: int | None = _opt(
        None,
        doc="Plain text only: tokens per training block; none = max_source_len + max_target_len.",
        check=positive_int,
    )

    def eval_count(self, n_examples: int) -> int:
        """How many of `n_examples` to hold out: never all of them, at least 1 unless disabled."""
        if self.eval_fraction == 0 or n_examples < 2:
            return 0
        if self.eval_fraction >= 1:
            wanted = int(self.eval_fraction)
        else:
            wanted = max(1, round(self.eval_fraction * n_examples))
        return min(wanted, n_examples - 1)


@dataclass(kw_only=True)
class OptimSection(Section):
    """The optimizer of the adapter weights."""

    SECTION: ClassVar[str] = "optim"

    name: OptimName | None = _opt(
        None,
        doc="Optimizer: adamw (torch's), paged_adamw_32bit, paged_adamw_8bit or adamw_8bit; none = "
        "paged_adamw_32bit on CUDA (the paper's), adamw elsewhere (paging has nothing to page to on a CPU).",
        alias="--optim",
    )
    lr: float | None = _opt(
        None,
        doc="Peak learning rate; none = the paper's by model size: 2e-4 below 33B parameters, 1e-4 from 33B up.",
        alias="--lr",
        check=positive_float,
    )
    weight_decay: float = _opt(0.0, doc="Decoupled (AdamW) weight decay.", check=non_negative_float)
    beta1: float = _opt(0.9, doc="Adam beta1 (first-moment decay).", check=unit_interval_open)
    beta2: float = _opt(0.999, doc="Adam beta2 (second-moment decay).", check=unit_interval_open)
    eps: float = _opt(1e-8, doc="Adam epsilon.", check=positive_float)
    max_grad_norm: float = _opt(
        0.3,
        doc="Clip the global gradient L2 norm to this value (0 = no clipping).",
        check=non_negative_float,
    )
    step_in_backward: bool = _opt(
        False,
        doc="paged_adamw_32bit: update each layer's adapters during backward, as soon as its gradients exist, "
        "and free them (one layer's gradients live instead of all); the states stream through three GPU slots "
        "while the layers below compute. Needs train.grad_accum 1, optim.max_grad_norm 0 and bf16/fp32 "
        "compute (measured on an H100: 65B 1x512 -1.5 GiB and as fast as GPU-resident states).",
    )
    page_policy: PagePolicy = _opt(
        "auto",
        doc="Paged optimizers: auto keeps the state on the GPU while it fits beside the run's peak memory "
        "(bitsandbytes' managed pages behave so) and pages it to pinned host memory otherwise; always pages it.",
    )


@dataclass(kw_only=True)
class LoopSection(Section):
    """The training loop: steps, batching, schedule, and how often to log, evaluate and save."""

    SECTION: ClassVar[str] = "train"

    max_steps: int = _opt(1000, doc="Optimizer steps to train for.", alias="--max-steps", check=positive_int)
    micro_batch_size: int = _opt(1, doc="Examples per forward/backward pass.", check=positive_int)
    grad_accum: int = _opt(
        16,
        doc="Micro-batches accumulated per optimizer step (effective batch = micro_batch_size x grad_accum).",
        check=positive_int,
    )
    warmup_steps: int | None = _opt(
        None,
        doc="Linear warmup steps from lr 0; none = ceil(warmup_ratio x max_steps). An explicit 0 disables "
        "warmup whatever warmup_ratio says.",
        check=non_negative_int,
    )
    warmup_ratio: float = _opt(
        0.03,
        doc="Warmup as a fraction of max_steps, used when warmup_steps is none (the QLoRA script's 0.03; "
        "note its 'constant' schedule ignored it, ours warms up).",
        check=unit_interval_closed,
    )
    lr_schedule: LrSchedule = _opt(
        "constant",
        doc="Learning-rate schedule after warmup: constant, cosine (to 0 at max_steps) or linear (to 0).",
    )
    eval_every: int = _opt(
        0,
        doc="Evaluate every this many optimizer steps (0 = only after the last step).",
        alias="--eval-every",
        check=non_negative_int,
    )
    save_every: int = _opt(
        0,
        doc="Save a checkpoint every this many optimizer steps (0 = only after the last step).",
        alias="--save-every",
        check=non_negative_int,
    )
    keep_last: int | None = _opt(
        None, doc="Keep only this many most recent checkpoints (none = keep all).", check=positive_int
    )
    save_every_minutes: float = _opt(
        0.0,
        doc="Also save a checkpoint when this many minutes have passed since the last one (0 = off): bounds the "
        "work a kill can lose in time, whatever a step costs.",
        check=non_negative_float,
    )
    max_nonfinite_steps: int = _opt(
        3,
        doc="A step whose loss or gradient norm is inf/NaN is skipped (no update) and counted; when this many come "
        "in a row the run stops, naming the step, its examples and the last good checkpoint (1 = stop at the "
        "first). float16 compute leaves overflow to its loss scaler.",
        check=positive_int,
    )
    log_every: int = _opt(1, doc="Write a metrics record every this many optimizer steps.", check=positive_int)
    resume: bool = _opt(
        False, doc="Resume from the newest complete checkpoint in the output directory.", alias="--resume"
    )
    eval_batch_size: int = _opt(4, doc="Examples per evaluation forward pass.", check=positive_int)
    cuda_graphs: bool = _opt(
        True,
        doc="On CUDA, replay each micro-batch's forward and backward as a CUDA graph (one per padded batch shape; "
        "bf16/fp32 compute, unpacked batches). Removes the host's launch overhead; false = eager.",
    )
    global_batch_size: int | None = _opt(
        None,
        doc="Examples per optimizer step over all processes; none = micro_batch_size x grad_accum x processes. "
        "When set, grad_accum is derived (global / (micro_batch_size x processes), which must divide exactly), so "
        "the same config trains the same run on any number of GPUs.",
        check=positive_int,
    )
    graph_length_multiple: int = _opt(
        64,
        doc="With cuda_graphs, pad batch lengths up to a multiple of this, so varied lengths need few graphs.",
        check=positive_int,
    )

    @property
    def effective_warmup_steps(self) -> int:
        """warmup_steps if given, else ceil(warmup_ratio x max_steps) (transformers' rounding)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * self.max_steps)

    def accumulation(self, world_size: int = 1) -> int:
        """Micro-batches per process per optimizer step on `world_size` processes: grad_accum, or derived from
        global_batch_size (ConfigError when it does not divide)."""
        if self.global_batch_size is None:
            return self.grad_accum
        per_pass = self.micro_batch_size * world_size
        if self.global_batch_size % per_pass:
            raise ConfigError(f"train.global_batch_size {self.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size {self.micro_batch_size} x {world_size} processes; "
                              f"pick a multiple of {per_pass}")  # fmt: skip
        return self.global_batch_size // per_pass

    @property
    def effective_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation()

    def _check_together(self) -> None:
        if self.effective_warmup_steps > self.max_steps:
            raise ConfigError(
                f"warmup ({self.effective_warmup_steps} steps from train.warmup_steps / train.warmup_ratio) "
                f"is longer than --max-steps / train.max_steps ({self.max_steps}); shorten the warmup"
            )


ParallelMode = Literal["auto", "ddp", "fsdp"]


@dataclass(kw_only=True)
class ParallelSection(Section):
    """Many processes (torchrun): data-parallel or sharded; ignored by a single process."""

    SECTION: ClassVar[str] = "parallel"

    mode: ParallelMode = _opt(
        "auto",
        doc="ddp: every GPU holds the whole 4-bit model, gradients are averaged; fsdp: the base, adapters, gradients "
        "and optimizer states are sharded over the GPUs (FSDP2) and gathered a layer at a time; auto: ddp when the "
        "run fits one GPU with room to spare, fsdp otherwise (logged with the estimate).",
        alias="--parallel",
    )
    timeout_s: float = _opt(
        600.0,
        doc="Seconds a collective waits for the other processes before the job fails with an error (a rank that "
        "died or hangs), instead of hanging.",
        check=positive_float,
    )


@dataclass(kw_only=True)
class TrainConfig(Config):
    """Everything `qlora train` needs; `model.path`, `data.path` and `output` have no default."""

    COMMAND: ClassVar[str] = "train"

    model: ModelSection = _opt(doc="The base model.")
    quant: QuantSection = _opt(doc="Quantization of the frozen base.", factory=QuantSection)
    lora: LoraSection = _opt(doc="The LoRA adapters.", factory=LoraSection)
    data: DataSection = _opt(doc="The training data.")
    optim: OptimSection = _opt(doc="The optimizer.", factory=OptimSection)
    train: LoopSection = _opt(doc="The training loop.", factory=LoopSection)
    parallel: ParallelSection = _opt(doc="Many processes (torchrun).", factory=ParallelSection)
    output: str = _opt(
        doc="Run directory: checkpoints, metrics.jsonl, TensorBoard events, loss.png, the adapter and "
        "the resolved config.yaml go here.",
        check=non_empty_str,
    )
    seed: int = _opt(0, doc="Seed of every random generator (data order, dropout, LoRA init).", check=non_negative_int)
    device: str = device_field()

    def _check_together(self) -> None:
        if self.optim.step_in_backward:
            problems = []
            if self.train.global_batch_size is None and self.train.grad_accum != 1:
                problems.append(f"train.grad_accum 1 (got {self.train.grad_accum}: the update cannot wait for "
                                "more micro-batches)")  # fmt: skip
            if self.optim.max_grad_norm != 0:
                problems.append(f"optim.max_grad_norm 0 (got {self.optim.max_grad_norm}: the global norm is "
                                "unknown until the last layer is done)")  # fmt: skip
            if self.optim.name not in (None, "paged_adamw_32bit"):
                problems.append(f"optim.name paged_adamw_32bit (got {self.optim.name!r})")
            if self.model.compute_dtype == "float16":
                problems.append("bfloat16 or float32 compute (float16 needs loss scaling, which skips steps)")
            if problems:
                raise ConfigError("optim.step_in_backward needs " + "; ".join(problems))
        if self.model.offload_checkpoints and not self.model.gradient_checkpointing:
            raise ConfigError("model.offload_checkpoints moves the checkpointed layer inputs: it needs "
                              "model.gradient_checkpointing")  # fmt: skip

    def model_source(self) -> ModelSource:
        """The model this run loads, as the `ModelSource` every other command uses (`qlora.loading.load`)."""
        return ModelSource(path=self.model.path, adapter=self.lora.init_from, quant_type=self.quant.quant_type,
                           double_quant=self.quant.double_quant, blocksize=self.quant.blocksize,
                           compute_dtype=self.model.compute_dtype, device=self.device)  # fmt: skip
