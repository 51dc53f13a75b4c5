"""`Trainer`: one finetune as an object, whose parts are short methods: setup, resume, step, evaluate, save, fit.

    trainer = qlora.Trainer({"model": {"path": "models/llama"}, "data": {"path": "alpaca.json"},
                             "output": "runs/mine", "train": {"max_steps": 100}})
    result = trainer.fit()          # = setup(), resume() if train.resume, then step/evaluate/checkpoint

`qlora train` is this class (`qlora.train.loop.train`). `config` is a `TrainConfig`, a dict of the
same keys, or the path of a config file; `data=` may give the training records as a list (they are
written to the output directory, so the run's config names a real file and `--resume` works).

What each method does:

  setup     tokenizer, data (training items and held-out examples), model (quantized on load, kernel
            policy, `prepare_for_training`), optimizer, schedule, batches and the `TrainStep`
  resume    everything the newest checkpoint holds: adapters, optimizer, schedule, scaler, data
            position, RNG states; returns the step it resumes after
  step      one optimizer step (`qlora.train.step.TrainStep`): its loss, grad norm, tokens/s
  evaluate  token-weighted held-out loss
  save      the PEFT adapter (`save`), or a whole resumable checkpoint (`save_checkpoint`)
  fit       the loop around them: logging, progress, evaluation and checkpoints on schedule, and the
            outputs (adapter, metrics.jsonl, TensorBoard events, loss.png, config.yaml)

Exact resume: N steps + resume + N steps equals 2N steps (tested, CPU).

Many processes (torchrun): `setup` joins the job (`qlora.distributed.Runtime`), wraps the model for DDP or
FSDP2 (`parallel.mode`; auto decides from an estimate and logs why), and each step takes this rank's share of
the one global order of micro-batches (global batch = micro-batch x accumulation x processes). Losses,
tokens/s and evaluation are reduced over ranks; rank 0 alone writes config.yaml, metrics, the progress bar,
checkpoints and the adapter, in the single-process layout, so a run resumes on any number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora.adapter import (
    ADAPTER_WEIGHTS,
    adapter_state_dict,
    load_adapter_weights,
    read_adapter_config,
    write_adapter,
)
from qlora.config import ConfigError, TrainConfig, resolve_size_defaults
from qlora.config.files import read_config
from qlora.data.collate import BatchIterator, collate, split_holdout
from qlora.data.encode import EncodedExample
from qlora.data.formats import load_dataset
from qlora.data.packing import pack_examples
from qlora.distributed import Runtime, parallelize
from qlora.distributed.parallel import LayerSharder
from qlora.distributed.plan import choose_mode, training_bytes
from qlora.loading import load_model, read_model_config
from qlora.lora import LoraSpec
from qlora.model.config import ModelConfig
from qlora.ops import KernelPolicy
from qlora.optim import build_optimizer
from qlora.optim.in_backward import StepInBackward, backward_order_groups
from qlora.precision import dtype_name, resolve_compute_dtype, torch_dtype
from qlora.tokenizer import Tokenizer
from qlora.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_intact_checkpoint,
    find_latest_checkpoint,
    format_bytes,
    free_bytes,
    load_checkpoint_state,
    restore_rng_state,
    save_checkpoint,
    set_aside,
    tensor_bytes,
    tidy_checkpoints,
)
from qlora.train.errors import NonFiniteError
from qlora.train.loss import StepLoss, loss_sum
from qlora.train.memory_advice import is_out_of_memory, out_of_memory
from qlora.train.metrics import MetricsLogger, ProgressBar, memory_summary, plot_losses, summarize
from qlora.train.preemption import StopSignals
from qlora.train.prepare import prepare_for_training
from qlora.train.schedule import build_scheduler
from qlora.train.step import StepStats, TrainStep, batch_to, micro_batch_seeds

log = logging.getLogger("qlora.train")

DATA_FILE = "train_data.jsonl"  # where records given as a list are written, in the output directory


@dataclass
class TrainResult:
    output: Path
    steps: int
    final_loss: float
    eval_loss: float | None
    rank: int = 0  # of the process that returns it (many processes: only rank 0 reports)
    stopped: str | None = None  # the signal that stopped the run early (a checkpoint was saved), e.g. "SIGTERM"
    checkpoint: Path | None = None  # the newest checkpoint when the run ended
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient norm, over the whole run


def count_parameters(c: ModelConfig) -> int:
    """Parameters of the dense model `c` describes (to pick the paper's size-dependent defaults)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return c.num_hidden_layers * per_layer + embeddings + c.hidden_size


def default_optimizer(device: torch.device) -> str:
    """The optimizer when `optim.name` is unset: the paper's paged AdamW on CUDA, torch's AdamW elsewhere."""
    return "paged_adamw_32bit" if device.type == "cuda" else "adamw"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model, examples: list[EncodedExample], batch_size: int, pad_id: int, device: torch.device,
             runtime: Runtime | None = None, loss_module=None) -> float:  # fmt: skip
    """Token-weighted mean next-token loss over `examples` (model put in eval mode, then restored).

    With a distributed `runtime`, rank r evaluates examples r, r + N, ... and the sums are reduced; every rank
    runs the same number of forward passes (a rank out of examples repeats one at weight 0), as FSDP's
    per-layer gathers need. `loss_module`: what to call for a batch's (loss sum, count), e.g. the FSDP root."""
    runtime = runtime or Runtime(device=device)
    share = examples[runtime.rank :: runtime.world_size]
    passes = math.ceil(math.ceil(len(examples) / runtime.world_size) / batch_size)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in range(passes):
        chunk, weight = share[b * batch_size : (b + 1) * batch_size], 1
        if not chunk:
            chunk, weight = examples[:1], 0
        batch = batch_to(collate(chunk, pad_id), device)
        s, n = loss_module(**batch) if loss_module is not None else loss_sum(model, batch)
        total, count = total + weight * float(s), count + weight * n
    model.train(was_training)
    total, count = runtime.all_reduce([total, count])
    return total / max(count, 1)


def as_train_config(config: TrainConfig | Mapping[str, Any] | str | Path,
                    data: Sequence[Mapping[str, Any]] | None = None) -> TrainConfig:  # fmt: skip
    """A `TrainConfig` from one, a dict of its keys, or a config file; `data` records are written to the
    output directory and named as `data.path`."""
    if isinstance(config, TrainConfig):
        cfg = config
    elif isinstance(config, Mapping):
        tree = {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
        if data is not None:
            tree.setdefault("data", {})["path"] = str(Path(tree.get("output", "")) / DATA_FILE)
        cfg = TrainConfig.from_dict(tree, source="Trainer(config=...)")
    elif isinstance(config, (str, Path)):
        cfg = read_config(config)
    else:
        raise TypeError(f"config must be a TrainConfig, a dict or a config file path, got {type(config).__name__}")
    if data is not None:
        if isinstance(data, (str, bytes)) or not all(isinstance(r, Mapping) for r in data):
            raise TypeError("data must be a list of records (dicts), e.g. [{'instruction': ..., 'output': ...}]")
        path = Path(cfg.output) / DATA_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        # written whole then renamed: under torchrun every rank writes the same bytes while others may read it
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
        os.replace(tmp, path)
        cfg.data.path = str(path)
        cfg.validate()
    return cfg


class Trainer:
    """A finetune (see the module docstring). Attributes set by `setup()`: `device`, `dtype`, `tokenizer`,
    `model`, `params`, `optimizer`, `scheduler`, `scaler`, `batches`, `train_step`, `held_out`, `lora`."""

    def __init__(self, config: TrainConfig | Mapping[str, Any] | str | Path, *,
                 data: Sequence[Mapping[str, Any]] | None = None, progress: bool | None = None):  # fmt: skip
        self.config = as_train_config(config, data)
        self.output = Path(self.config.output)
        self.progress = progress
        self.step_count = 0
        self.nonfinite_in_a_row = 0  # consecutive skipped steps (non-finite loss or gradient norm)
        self.nonfinite_total = 0
        self.model = None

    # --- setup ------------------------------------------------------------------------------------
    def setup(self) -> Trainer:
        """Build everything a step needs (see the module docstring). Returns self."""
        cfg = self.config
        self.runtime = Runtime.from_env(cfg.device, cfg.parallel.timeout_s)
        if not self.runtime.is_main:  # rank 0 speaks for the job (the others do the same work: errors only)
            logging.getLogger("qlora").setLevel(logging.ERROR)
        self.output.mkdir(parents=True, exist_ok=True)
        self.device = self.runtime.device
        self.accumulation = cfg.train.accumulation(self.runtime.world_size)
        if cfg.optim.step_in_backward and self.runtime.world_size == 1 and self.accumulation != 1:
            raise ConfigError(f"optim.step_in_backward needs one micro-batch per step; train.global_batch_size "
                              f"{cfg.train.global_batch_size} makes {self.accumulation}")  # fmt: skip
        optimizer_name = cfg.optim.name or default_optimizer(self.device)
        if cfg.optim.step_in_backward and optimizer_name != "paged_adamw_32bit":
            raise ConfigError(f"optim.step_in_backward needs optim.name paged_adamw_32bit; this run's optimizer is "
                              f"{optimizer_name!r} (optim.name, or the default on {self.device.type})")  # fmt: skip
        self.dtype, why = resolve_compute_dtype(cfg.model.compute_dtype, self.device)
        log.info("%s", why)
        seed_everything(cfg.seed)

        self.tokenizer = Tokenizer.from_pretrained(cfg.model.path)
        self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id
        items, self.held_out = self._data()
        model_config = read_model_config(cfg.model.path)
        lr, dropout = resolve_size_defaults(cfg.optim.lr, cfg.lora.dropout, count_parameters(model_config))
        self.lora = self._lora_spec(dropout)
        self.policy = KernelPolicy.from_env()
        self.mode = self._parallel_mode(model_config, items, optimizer_name)
        sharder = LayerSharder(self.runtime) if self.mode == "fsdp" else None  # shards each layer as it loads
        quant_type = None if cfg.quant.quant_type == "none" else cfg.quant.quant_type
        try:
            self.model = load_model(cfg.model.path, quant_type, cfg.quant.double_quant, self.dtype, self.device,
                                    blocksize=cfg.quant.blocksize, lora=self.lora, policy=self.policy,
                                    on_layer_loaded=sharder)  # fmt: skip
        except torch.OutOfMemoryError as e:
            raise out_of_memory(e, cfg, self.device, where="while loading the model") from e
        log.info("model loaded: %s", memory_summary(self.device))
        if cfg.lora.init_from:
            load_adapter_weights(self.model, cfg.lora.init_from)  # a resume overwrites them with the checkpoint's
        prepare_for_training(  # its trainable parameters are the parallel wrapping's to give (below)
            self.model, gradient_checkpointing=cfg.model.gradient_checkpointing,
            reuse_dense_weights=cfg.model.reuse_dense_weights,
            residual_dtype=torch.float32 if cfg.model.residual_dtype == "float32" else None,
            offload_checkpoints=cfg.model.offload_checkpoints, policy=self.policy)  # fmt: skip
        seed_everything(cfg.seed)  # the adapters' init drew from the RNG; the loop starts from a known state
        self.parallel = parallelize(StepLoss(self.model), list(self.model.model.layers), self.runtime, self.mode,
                                    sharder)  # fmt: skip
        self.params = self.parallel.params
        o = cfg.optim
        self.optimizer = build_optimizer(optimizer_name, self.params, lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                         weight_decay=o.weight_decay, page_policy=o.page_policy)  # fmt: skip
        # float16 compute needs loss scaling (gradients of small losses underflow); bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.batches = BatchIterator(items, cfg.train.micro_batch_size, pad_id=self.pad_id, seed=cfg.seed,
                                     group_by_length=cfg.data.group_by_length)  # fmt: skip
        resolved = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compute_dtype=dtype_name(self.dtype)))
        # the dtype the run computed in, not "auto": merge and export rebuild the trained-against base from it
        if self.runtime.is_main:
            (self.output / "config.yaml").write_text(resolved.to_yaml(), encoding="utf-8")
        self.train_step = None  # built after a resume (the update in backward holds the optimizer's states)
        return self

    def _parallel_mode(self, model_config: ModelConfig, items: list, optimizer_name: str) -> str:
        """How this job's processes share the work (`parallel.mode`, auto resolved and logged); refuses what a
        mode cannot do."""
        cfg, runtime = self.config, self.runtime
        longest = max(len(item) for item in items)
        need = training_bytes(model_config, self.lora.r, self.lora.targets, cfg.train.micro_batch_size * longest)
        gpu_bytes = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        mode, why = choose_mode(cfg.parallel.mode, runtime, need, gpu_bytes)
        log.info("parallel: %s (%s); %d processes x %d micro-batches of %d = global batch %d", mode, why,
                 runtime.world_size, self.accumulation, cfg.train.micro_batch_size,
                 runtime.world_size * self.accumulation * cfg.train.micro_batch_size)  # fmt: skip
        if mode == "fsdp" and optimizer_name in ("paged_adamw_8bit", "adamw_8bit"):
            raise ConfigError(f"optim.name {optimizer_name}: 8-bit optimizer states are quantized in blocks of the "
                              "whole tensor, which FSDP's shards cut through; use paged_adamw_32bit or adamw with "
                              "--parallel fsdp, or --parallel ddp")  # fmt: skip
        if mode == "fsdp" and self.dtype == torch.float16:
            raise ConfigError("--parallel fsdp with float16 compute: each rank would see overflow in its own shard of "
                              "the gradients only, and skip different steps; use bfloat16 or float32 "
                              "(model.compute_dtype), or --parallel ddp")  # fmt: skip
        if mode == "fsdp" and cfg.quant.quant_type == "none":
            raise ConfigError("--parallel fsdp shards the 4-bit base; quant.quant_type none keeps it 16-bit: use "
                              "--parallel ddp, or a 4-bit quant.quant_type")  # fmt: skip
        if mode != "none" and cfg.optim.step_in_backward:
            log.warning("optim.step_in_backward: off under %s (the update would run before the gradients are "
                        "reduced over processes); the optimizer steps after backward", mode)  # fmt: skip
        return mode

    def _data(self) -> tuple[list, list[EncodedExample]]:
        """(training items: examples or packs, held-out examples); the format is detected or named and logged."""
        d, seed = self.config.data, self.config.seed
        examples, _info = load_dataset(d.path, self.tokenizer, d.format, max_source_len=d.max_source_len,
                                       max_target_len=d.max_target_len, train_on_source=d.train_on_source,
                                       languages=set(d.languages) if d.languages else None,
                                       block_size=d.block_size)  # fmt: skip
        held_count = d.eval_count(len(examples))
        train, held_out = split_holdout(examples, held_count, seed=seed) if held_count else (examples, [])
        items = pack_examples(train, d.pack_len, seed=seed) if d.pack_len else train
        return items, held_out[: d.eval_max_examples or None]  # 0 = all

    def _lora_spec(self, dropout: float) -> LoraSpec:
        """The adapters to create: the config's, or the shape of `lora.init_from`'s adapter (with this run's
        dropout and parameter dtype)."""
        lora = self.config.lora
        param_dtype = torch_dtype(lora.param_dtype)
        if lora.init_from:
            saved = read_adapter_config(lora.init_from)
            log.info("continuing the adapter in %s: r=%d, alpha=%g, rslora=%s, targets %s", lora.init_from,
                     saved.r, saved.alpha, saved.use_rslora, ",".join(saved.targets))  # fmt: skip
            return dataclasses.replace(saved, dropout=dropout, param_dtype=param_dtype)
        return LoraSpec(r=lora.r, alpha=lora.alpha, dropout=dropout, use_rslora=lora.use_rslora,
                        targets=tuple(lora.target_modules), param_dtype=param_dtype)  # fmt: skip

    def _build_step(self) -> TrainStep:
        cfg = self.config
        stepper = None
        if cfg.optim.step_in_backward and self.parallel.mode == "none":  # holds the optimizer's states from here on
            stepper = StepInBackward(self.optimizer, backward_order_groups(self.model), policy=self.policy)
        return TrainStep(self.model, self.params, self.optimizer, self.scheduler, scaler=self.scaler,
                         max_grad_norm=cfg.optim.max_grad_norm, cuda_graphs=cfg.train.cuda_graphs,
                         graph_length_multiple=cfg.train.graph_length_multiple, pad_id=self.pad_id,
                         stepper=stepper, parallel=self.parallel)  # fmt: skip

    # --- resume and save --------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the newest complete checkpoint under the output directory; returns its step."""
        if self.model is None:
            self.setup()
        if self.train_step is not None:
            raise RuntimeError("Trainer.resume() must come before the first step")
        # rank 0 picks the checkpoint (hashes checked), so every rank resumes from the same one
        latest, skipped = self.runtime.broadcast_object(self._intact_checkpoint() if self.runtime.is_main else None)
        if latest is None:
            why = "".join(f"\n  skipped {path}: {reason}" for path, reason in skipped)
            raise ConfigError(f"--resume: no intact checkpoint under {self.output / 'checkpoints'}{why}")
        state = load_checkpoint_state(latest, map_location="cpu")
        load_adapter_weights(self.model, latest / "adapter")
        self.optimizer.load_state_dict(self.parallel.local_optimizer_state(state["optimizer.pt"], self.optimizer))
        self.scheduler.load_state_dict(state["scheduler.pt"])
        if self.scaler.is_enabled() and state.get("scaler.pt"):
            self.scaler.load_state_dict({k: v.item() for k, v in state["scaler.pt"].items()})
        self.batches.load_state_dict(state["data.json"])
        restore_rng_state(state["rng.pt"])
        progress = state["trainer.json"]
        self.step_count = int(progress["step"])
        self.nonfinite_in_a_row = int(progress.get("nonfinite_in_a_row", 0))
        self.nonfinite_total = int(progress.get("nonfinite_total", 0))
        log.info("resumed from %s at step %d", latest, self.step_count)
        return self.step_count

    def _intact_checkpoint(self) -> tuple[Path | None, list[tuple[Path, str]]]:
        """(the newest checkpoint whose files match their SHA-256, [(damaged newer one, why)]); each damaged
        one is set aside (renamed `.damaged-*`) so it neither shadows nor displaces the intact ones."""
        latest, skipped = find_intact_checkpoint(self.output)
        for path, reason in skipped:
            moved = set_aside(path)
            log.warning("skipping checkpoint %s: %s (moved to %s)", path.name, reason, moved.name)
        tidy_checkpoints(self.output, self.config.train.keep_last)  # what a save killed after its commit left
        return latest, skipped

    def _has_checkpoint_to_resume(self) -> bool:
        """Whether `fit` resumes. Under torchrun, `--resume` with no checkpoint yet starts from step 0 (logged):
        the same command serves the first attempt and `torchrun --max-restarts`' restarts. A single process
        with nothing to resume is an error (`resume` says so): a mistyped output directory, say."""
        if self.runtime.restart is None:
            return True
        found = self.runtime.broadcast_object(find_latest_checkpoint(self.output) is not None)
        if not found:
            log.info("--resume: no checkpoint under %s yet; starting from step 0 (torchrun attempt %d)",
                     self.output / "checkpoints", self.runtime.restart)  # fmt: skip
        return found

    def save(self, directory: str | Path | None = None) -> Path:
        """Write the adapter in PEFT's format (default: the output directory); returns the directory.
        Many processes: every rank must call it (the adapter is gathered); rank 0 writes."""
        directory = Path(directory or self.output)
        tensors = adapter_state_dict(self.model)
        if self.runtime.is_main:
            write_adapter(tensors, directory, self.lora, str(self.config.model.path))
        self.runtime.barrier()
        return directory

    def save_checkpoint(self) -> Path:
        """An atomic, resumable checkpoint of the current step under output/checkpoints/. Many processes:
        every rank must call it; the state is gathered whole and rank 0 writes it (the single-process layout)."""
        tensors = adapter_state_dict(self.model)
        optimizer = self.parallel.full_optimizer_state(self.optimizer.state_dict(), self.optimizer)
        path = None
        if self.runtime.is_main:
            path = self._write_checkpoint(tensors, optimizer)
        self.runtime.barrier()
        return self.runtime.broadcast_object(path)

    def _write_checkpoint(self, adapter: dict[str, torch.Tensor], optimizer: dict) -> Path:
        model_path = str(self.config.model.path)
        return save_checkpoint(self.output, self.step_count, {
            "adapter": lambda d: write_adapter(adapter, d, self.lora, model_path),
            "optimizer.pt": optimizer,
            "scheduler.pt": self.scheduler.state_dict(),
            "scaler.pt": {k: torch.tensor(v) for k, v in self.scaler.state_dict().items()
                          if isinstance(v, (int, float))},
            "rng.pt": capture_rng_state(),
            "data.json": self.batches.state_dict(),
            "trainer.json": {"step": self.step_count, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                             "nonfinite_total": self.nonfinite_total},
        }, keep_last=self.config.train.keep_last,
           size_hint=tensor_bytes(adapter) + tensor_bytes(optimizer))  # fmt: skip

    # --- one step, evaluation -------------------------------------------------------------------
    def step(self) -> StepStats:
        """One optimizer step over `train.grad_accum` micro-batches. An out-of-memory error becomes an
        `OutOfMemory` that says what would fit."""
        if self.model is None:
            self.setup()
        if self.train_step is None:
            self.train_step = self._build_step()
        self.model.train()
        world, rank = self.runtime.world_size, self.runtime.rank
        count = self.accumulation * world  # the global step's micro-batches, of which this rank runs every world-th
        seeds = micro_batch_seeds(self.config.seed, self.step_count, count)[rank::world]
        micro_batches = self.batches.next_step(count, rank, world)
        try:
            stats = self.train_step(micro_batches, seeds)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            longest = max(int(b["input_ids"].shape[1]) for b in micro_batches)
            raise out_of_memory(e, self.config, self.device, where=f"in step {self.step_count + 1}",
                                longest=longest) from e  # fmt: skip
        self.step_count += 1
        return stats

    def _step_lines(self) -> str:
        """Where the last step's examples came from: the data file and its lines (for a message)."""
        lines = []
        for index in self.batches.last_step:
            item = self.batches.examples[index]
            for example in getattr(item, "examples", (item,)):  # a pack holds several
                lines.append(example.line)
        known = sorted({line for line in lines if line is not None})
        where = ", ".join(str(line) for line in known[:50]) + (" ..." if len(known) > 50 else "")
        return f"{self.config.data.path} lines {where}" if known else f"items {self.batches.last_step}"

    def _count_nonfinite(self, stats: StepStats) -> None:
        """Count a non-finite step (skipped by `TrainStep`); stop the run when too many come in a row, or at
        once when the update could not be skipped (`optim.step_in_backward` updates inside backward)."""
        if not stats.nonfinite:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        limit, step = self.config.train.max_nonfinite_steps, self.step_count
        what = f"loss {stats.loss:g}" + (f", gradient norm {stats.grad_norm:g}" if stats.grad_norm is not None else "")
        if stats.skipped:
            log.warning("step %d: %s: skipped, no update (%d in a row, %d of %d allowed); examples: %s", step, what,
                        self.nonfinite_in_a_row, self.nonfinite_in_a_row, limit, self._step_lines())  # fmt: skip
        if stats.skipped and self.nonfinite_in_a_row < limit:
            return
        first = step - self.nonfinite_in_a_row + 1
        good = self.runtime.broadcast_object(find_latest_checkpoint(self.output) if self.runtime.is_main else None)
        steps = f"steps {first}-{step}" if first != step else f"step {step}"
        why = (f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient norm ({steps}; the last: "
               f"{what}); each was skipped without an update" if stats.skipped else
               f"step {step} had a non-finite {what}, and optim.step_in_backward applied its update inside backward, "
               "so the adapter in memory is no longer good")  # fmt: skip
        raise NonFiniteError(f"{why}. Step {step}'s examples: {self._step_lines()}. Last good checkpoint: "
                             f"{good or 'none yet'}" + (" (resume from it with --resume after fixing or removing "
                             "those examples, or lower the learning rate)" if good else "") + ".")  # fmt: skip

    def _check_free_space(self) -> None:
        """Refuse to start when the output's disk cannot hold one checkpoint and the adapter; warn when it cannot
        hold as many checkpoints as the run keeps. Rank 0 looks; every rank gets the verdict."""
        problem = None
        if self.runtime.is_main:
            t = self.config.train
            trainable = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
            numel = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            checkpoint = trainable + 8 * numel + 2**20  # adapter + AdamW's two 32-bit moments at most + small files
            need, free = checkpoint + trainable, free_bytes(self.output)
            saves = max(t.max_steps - self.step_count, 1) // t.save_every + 1 if t.save_every else 1
            kept = min(t.keep_last, saves) if t.keep_last else saves
            if free is not None and free < need:
                problem = (f"{self.output} has {format_bytes(free)} free, but one checkpoint and the adapter need "
                           f"about {format_bytes(need)}; free space or choose another --output")  # fmt: skip
            elif free is not None and free < kept * checkpoint + trainable:
                log.warning("%s has %s free; the %d checkpoints this run keeps need about %s (train.keep_last "
                            "bounds them)", self.output, format_bytes(free), kept,
                            format_bytes(kept * checkpoint + trainable))  # fmt: skip
        problem = self.runtime.broadcast_object(problem)
        if problem is not None:
            raise CheckpointError(problem)

    def evaluate(self, examples: list[EncodedExample] | None = None) -> float:
        """Token-weighted mean next-token loss over `examples` (default: the held-out split)."""
        examples = self.held_out if examples is None else examples
        module = self.parallel.module if self.parallel.shards_parameters else None
        return evaluate(self.model, examples, self.config.train.eval_batch_size, self.pad_id, self.device,
                        self.runtime, module)  # fmt: skip

    # --- the whole run ----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to `train.max_steps` (resuming first with `train.resume`), evaluating and checkpointing on
        schedule; write the outputs. Returns what the run ended with.

        SIGTERM or SIGINT (`StopSignals`): the current step finishes, a checkpoint is saved and the run returns
        early (`TrainResult.stopped`); a second signal exits at once. Non-finite steps are skipped and counted
        (`train.max_nonfinite_steps` in a row stop the run: `NonFiniteError`)."""
        with StopSignals() as signals:  # from the start: a signal during setup stops before the first step
            return self._fit(signals)

    def _fit(self, signals: StopSignals) -> TrainResult:
        t = self.config.train
        if self.model is None:
            self.setup()
        if t.resume and self._has_checkpoint_to_resume():
            self.resume()
        self._check_free_space()
        main = self.runtime.is_main  # the one process that writes
        stop, _ = self._stop_or_save_due(signals, time.monotonic())
        if stop is not None:  # nothing trained yet in this process: nothing new to save
            log.warning("stopped by %s before the first step", stop)
            return TrainResult(self.output, self.step_count, math.nan, None, self.runtime.rank, stopped=stop,
                               checkpoint=find_latest_checkpoint(self.output) if main else None)  # fmt: skip
        resumed = t.resume and self.step_count > 0
        logger = MetricsLogger(self.output, resume_step=self.step_count if resumed else None) if main else None
        bar = ProgressBar(t.max_steps, initial=self.step_count, enabled=self.progress if main else False,
                          device=self.device)  # fmt: skip
        loss, eval_loss, saved_at = math.nan, None, time.monotonic()
        try:
            while self.step_count < t.max_steps:
                stats = self.step()
                step, last, loss = self.step_count, self.step_count == t.max_steps, stats.loss
                self._log_step(stats, logger, bar)
                self._count_nonfinite(stats)
                stop, overdue = self._stop_or_save_due(signals, saved_at)
                if stop is not None and not last:
                    path = self.save_checkpoint()
                    log.warning("stopped by %s after step %d of %d; checkpoint %s; run the same command with "
                                "--resume to continue", stop, step, t.max_steps, path)  # fmt: skip
                    return TrainResult(self.output, step, loss, eval_loss, self.runtime.rank, stopped=stop,
                                       checkpoint=path, nonfinite_steps=self.nonfinite_total)  # fmt: skip
                if self.held_out and ((t.eval_every and step % t.eval_every == 0) or last):
                    eval_loss = self.evaluate()
                    if main:
                        logger.log_eval(step, eval_loss=eval_loss)
                        bar.write(f"step {step}: eval_loss {eval_loss:.4f}")
                if (t.save_every and step % t.save_every == 0) or last or overdue:
                    self.save_checkpoint()
                    saved_at = time.monotonic()
        finally:
            bar.close()
            if main:
                logger.close()
        self.save()
        if main:
            plot_losses(self.output)
            log.info("adapter written to %s (%s)", self.output, ADAPTER_WEIGHTS)
        checkpoint = find_latest_checkpoint(self.output) if main else None
        return TrainResult(self.output, self.step_count, loss, eval_loss, self.runtime.rank, checkpoint=checkpoint,
                           nonfinite_steps=self.nonfinite_total)  # fmt: skip

    def _log_step(self, stats: StepStats, logger: MetricsLogger | None, bar: ProgressBar) -> None:
        """The step's metrics record (every `train.log_every` steps, and the last) and the progress bar."""
        t, step = self.config.train, self.step_count
        if step % t.log_every == 0 or step == t.max_steps or stats.nonfinite:
            extra = {} if stats.grad_norm is None else {"grad_norm": stats.grad_norm}
            if stats.nonfinite:
                extra["skipped"] = stats.skipped
            if self.device.type == "cuda":  # per rank: the largest and (many processes) the smallest
                peak = torch.cuda.max_memory_allocated(self.device) / 2**30
                extra["peak_allocated_gib"] = self.runtime.all_reduce([peak], op="max")[0]
                if self.runtime.distributed:
                    extra["peak_allocated_gib_min"] = self.runtime.all_reduce([peak], op="min")[0]
            if logger is not None:
                record = logger.log_train(step, loss=stats.loss, lr=stats.lr, tokens_per_s=stats.tokens_per_s,
                                          target_tokens=stats.target_tokens, step_seconds=stats.seconds,
                                          **extra)  # fmt: skip
                if not bar.enabled:
                    log.info(summarize(record))
        bar.update(step, loss=stats.loss, lr=stats.lr, tokens_per_s=stats.tokens_per_s)

    def _stop_or_save_due(self, signals: StopSignals, saved_at: float) -> tuple[str | None, bool]:
        """(the stop signal received, or None; whether `train.save_every_minutes` has passed since the last save).
        Many processes: any rank's signal stops them all, and rank 0's clock decides the save."""
        minutes = self.config.train.save_every_minutes
        overdue = bool(minutes) and time.monotonic() - saved_at >= 60 * minutes
        if not self.runtime.distributed:
            return signals.received, overdue
        stopped, due = self.runtime.all_reduce([float(signals.received is not None),
                                                float(overdue and self.runtime.is_main)], op="max")  # fmt: skip
        return (signals.received or "a stop signal on another rank") if stopped else None, bool(due)

    def close(self) -> None:
        """Leave the job's process group (many processes; nothing otherwise). The `Trainer` is done after it."""
        runtime = getattr(self, "runtime", None)  # set by setup(), even one that failed after joining the job
        if runtime is not None:
            runtime.shutdown()
