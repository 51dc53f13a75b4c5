"""The training loop: `train(cfg)` finetunes LoRA adapters on a frozen (4-bit) base.

It reads like a script, in three parts:

  setup   tokenizer, data (train/held-out split), model (quantized on load), optimizer, schedule,
          and, with `train.resume`, everything a checkpoint holds;
  loop    per optimizer step: `grad_accum` micro-batches, each loss divided by the target-token
          count of the whole step (token-weighted: the same result as one big batch), backward,
          clip, step, schedule, log;
  around  held-out evaluation every `eval_every` steps and at the end; an atomic checkpoint
          every `save_every` steps and at the end; the PEFT adapter, metrics.jsonl, TensorBoard
          events, loss.png and the resolved config in the output directory.

Exact resume: a checkpoint holds the adapters (float32), the optimizer and scheduler states, every
RNG state and the data position, so N steps + resume + N steps equals 2N steps (tested, CPU).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora.adapter import ADAPTER_WEIGHTS, adapter_state_dict, load_adapter_weights, read_adapter_config, save_adapter
from qlora.config import ConfigError, TrainConfig, resolve_size_defaults
from qlora.data.collate import BatchIterator, count_tokens, split_holdout
from qlora.data.encode import EncodedExample
from qlora.data.formats import load_dataset
from qlora.data.packing import pack_examples
from qlora.loading import load_model, read_model_config
from qlora.lora import LoraSpec, mark_only_lora_trainable
from qlora.lora.matmul import reusing_dense_weights
from qlora.model.config import ModelConfig
from qlora.model.offload import CheckpointOffload
from qlora.optim import build_optimizer as make_optimizer
from qlora.optim.in_backward import StepInBackward, backward_order_groups
from qlora.tokenizer import Tokenizer
from qlora.train.checkpoint import (
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint_state,
    restore_rng_state,
    save_checkpoint,
)
from qlora.train.cuda_graph import GRAPH_KEYS, CudaGraphStep, pad_batch
from qlora.train.loss import loss_sum
from qlora.train.metrics import MetricsLogger, ProgressBar, plot_losses, summarize
from qlora.train.schedule import build_scheduler

log = logging.getLogger("qlora.train")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class TrainResult:
    output: Path
    steps: int
    final_loss: float
    eval_loss: float | None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device / device is {name!r} but no CUDA device is available")
    return device


def count_parameters(c: ModelConfig) -> int:
    """Parameters of the dense model `c` describes (to pick the paper's size-dependent defaults)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return c.num_hidden_layers * per_layer + embeddings + c.hidden_size


def lora_spec(cfg: TrainConfig, dropout: float) -> LoraSpec:
    """The adapters to create: the config's, or the shape of `lora.init_from`'s adapter (with this run's dropout)."""
    if cfg.lora.init_from:
        saved = read_adapter_config(cfg.lora.init_from)
        log.info("continuing the adapter in %s: r=%d, alpha=%g, rslora=%s, targets %s", cfg.lora.init_from,
                 saved.r, saved.alpha, saved.use_rslora, ",".join(saved.targets))  # fmt: skip
        return LoraSpec(r=saved.r, alpha=saved.alpha, dropout=dropout, use_rslora=saved.use_rslora,
                        targets=saved.targets, param_dtype=_DTYPES[cfg.lora.param_dtype])  # fmt: skip
    return LoraSpec(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=dropout, use_rslora=cfg.lora.use_rslora,
                    targets=tuple(cfg.lora.target_modules), param_dtype=_DTYPES[cfg.lora.param_dtype])  # fmt: skip


def default_optimizer(device: torch.device) -> str:
    """The optimizer when `optim.name` is unset: the paper's paged AdamW on CUDA, torch's AdamW elsewhere."""
    return "paged_adamw_32bit" if device.type == "cuda" else "adamw"


def build_optimizer(
    cfg: TrainConfig, params: list[torch.nn.Parameter], lr: float, device: torch.device
) -> torch.optim.Optimizer:
    o = cfg.optim
    name = o.name or default_optimizer(device)
    return make_optimizer(name, params, lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                          page_policy=o.page_policy)  # fmt: skip


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, examples: list[EncodedExample], batch_size: int, pad_id: int, device: torch.device) -> float:
    """Token-weighted mean next-token loss over `examples` (model put in eval mode, then restored)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    batches = BatchIterator(examples, batch_size, pad_id=pad_id, shuffle=False, epochs=1)
    for batch in batches:
        s, n = loss_sum(model, _to(batch, device))
        total, count = total + float(s), count + n
    model.train(was_training)
    return total / max(count, 1)


def prepare_data(cfg: TrainConfig, tokenizer: Tokenizer) -> tuple[list, list[EncodedExample]]:
    """(training items: examples or packs, held-out examples): the format is detected or named and logged."""
    d = cfg.data
    examples, _info = load_dataset(d.path, tokenizer, d.format, max_source_len=d.max_source_len,
                                   max_target_len=d.max_target_len, train_on_source=d.train_on_source,
                                   languages=set(d.languages) if d.languages else None,
                                   block_size=d.block_size)  # fmt: skip
    held_count = d.eval_count(len(examples))
    train_examples, held_out = split_holdout(examples, held_count, seed=cfg.seed) if held_count else (examples, [])
    items = pack_examples(train_examples, d.pack_len, seed=cfg.seed) if d.pack_len else train_examples
    return items, held_out[: d.eval_max_examples or None]  # 0 = all


def train(cfg: TrainConfig, *, progress: bool | None = None) -> TrainResult:
    """Run the finetune described by `cfg`; see the module docstring."""
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    optimizer_name = cfg.optim.name or default_optimizer(device)
    if cfg.optim.step_in_backward and optimizer_name != "paged_adamw_32bit":
        raise ConfigError(f"optim.step_in_backward needs optim.name paged_adamw_32bit; this run's optimizer is "
                          f"{optimizer_name!r} (optim.name, or the default on {device.type})")  # fmt: skip
    dtype = _DTYPES[cfg.model.compute_dtype]
    seed_everything(cfg.seed)

    # --- setup ------------------------------------------------------------------------------
    tokenizer = Tokenizer.from_pretrained(cfg.model.path)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    train_examples, held_out = prepare_data(cfg, tokenizer)
    n_params = count_parameters(read_model_config(cfg.model.path))
    lr, dropout = resolve_size_defaults(cfg.optim.lr, cfg.lora.dropout, n_params)
    lora = lora_spec(cfg, dropout)
    quant_type = None if cfg.quant.quant_type == "none" else cfg.quant.quant_type
    model = load_model(cfg.model.path, quant_type, cfg.quant.double_quant, dtype, device,
                       blocksize=cfg.quant.blocksize, lora=lora)  # fmt: skip
    if cfg.lora.init_from:
        load_adapter_weights(model, cfg.lora.init_from)  # a resume below overwrites them with the checkpoint's
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    model.residual_dtype = torch.float32 if cfg.model.residual_dtype == "float32" else None
    model.checkpoint_context = reusing_dense_weights if cfg.model.reuse_dense_weights else None
    if cfg.model.offload_checkpoints and device.type == "cuda":
        model.checkpoint_offload = CheckpointOffload(device)
    elif cfg.model.offload_checkpoints:
        log.info("model.offload_checkpoints: nothing to offload on %s; ignored", device)
    params = mark_only_lora_trainable(model)
    seed_everything(cfg.seed)  # the adapters' init drew from the RNG; the loop starts from a known state
    optimizer = build_optimizer(cfg, params, lr, device)
    # float16 compute needs loss scaling (gradients of small losses underflow); bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    scheduler = build_scheduler(optimizer, cfg)
    batches = BatchIterator(train_examples, cfg.train.micro_batch_size, pad_id=pad_id, seed=cfg.seed,
                            group_by_length=cfg.data.group_by_length)  # fmt: skip
    (output / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")

    start_step = 0
    if cfg.train.resume:
        latest = find_latest_checkpoint(output)
        if latest is None:
            raise ConfigError(f"--resume: no complete checkpoint under {output / 'checkpoints'}")
        state = load_checkpoint_state(latest, map_location="cpu")
        load_adapter_weights(model, latest / "adapter")
        optimizer.load_state_dict(state["optimizer.pt"])
        scheduler.load_state_dict(state["scheduler.pt"])
        if scaler.is_enabled() and state.get("scaler.pt"):
            scaler.load_state_dict({k: v.item() for k, v in state["scaler.pt"].items()})
        batches.load_state_dict(state["data.json"])
        restore_rng_state(state["rng.pt"])
        start_step = int(state["trainer.json"]["step"])
        log.info("resumed from %s at step %d", latest, start_step)

    # Built after a resume: it holds the optimizer's state tensors from here on (checked above: a 32-bit QAdamW)
    stepper = StepInBackward(optimizer, backward_order_groups(model)) if cfg.optim.step_in_backward else None
    graphs = None
    if cfg.train.cuda_graphs and device.type == "cuda":
        if scaler.is_enabled():
            log.info("cuda_graphs: off for float16 compute (its loss scale changes between steps); training eagerly")
        else:
            graphs = CudaGraphStep(model, params, stepper=stepper)

    logger = MetricsLogger(output, resume_step=start_step if cfg.train.resume else None)
    bar = ProgressBar(cfg.train.max_steps, initial=start_step, enabled=progress, device=device)

    def checkpoint_now(step: int) -> None:
        save_checkpoint(output, step, {
            "adapter": lambda d: save_adapter(model, d, lora, str(cfg.model.path)),
            "optimizer.pt": optimizer.state_dict(),
            "scheduler.pt": scheduler.state_dict(),
            "scaler.pt": {k: torch.tensor(v) for k, v in scaler.state_dict().items() if isinstance(v, (int, float))},
            "rng.pt": capture_rng_state(),
            "data.json": batches.state_dict(),
            "trainer.json": {"step": step},
        }, keep_last=cfg.train.keep_last)  # fmt: skip

    # --- loop -------------------------------------------------------------------------------
    model.train()
    loss_value, eval_loss = math.nan, None
    step = start_step
    for step in range(start_step + 1, cfg.train.max_steps + 1):
        started = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.train.grad_accum)]
        step_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total = torch.zeros((), dtype=torch.float32, device=device)  # read back once per step, not per micro-batch
        for batch in micro:
            s = None  # the micro-batch's loss sum, once its gradients are in
            if graphs is not None and set(batch) <= GRAPH_KEYS:
                batch = pad_batch(batch, cfg.train.graph_length_multiple, pad_id)
                try:
                    s = graphs.forward_backward(batch, 1.0 / max(step_tokens, 1))
                except torch.cuda.OutOfMemoryError:
                    raise
                except RuntimeError as e:  # capture refused (an old torch, an op that cannot be captured)
                    log.warning("cuda_graphs: capture failed (%s); training eagerly from here", e)
                    graphs = None
            if s is None:
                s, _ = loss_sum(model, _to(batch, device))
                if stepper is not None:  # the update runs inside this backward, layer by layer
                    stepper.prepare()
                    stepper.backward(s / max(step_tokens, 1))
                else:
                    scaler.scale(s / max(step_tokens, 1)).backward()
            total += s.detach()
        scaler.unscale_(optimizer)
        # With the update in backward no gradient is left here: no norm to report (not logged). max_grad_norm 0
        # means no clipping: the norm is still measured (an infinite bound scales by exactly 1).
        grad_norm = None if stepper is not None else \
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm or float("inf"))  # fmt: skip
        lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
        scaler.update()
        scheduler.step()
        if graphs is not None:
            graphs.zero_grad()  # in place: the captured graphs own the .grad buffers
        else:
            optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        loss_value = float(total) / max(step_tokens, 1)
        seen_tokens = sum(count_tokens(b) for b in micro)
        tokens_per_s = seen_tokens / elapsed
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            norm = {} if grad_norm is None else {"grad_norm": float(grad_norm)}  # none left to measure in backward
            record = logger.log_train(step, loss=loss_value, lr=lr, tokens_per_s=tokens_per_s, **norm,
                                      target_tokens=step_tokens)  # fmt: skip
            if not bar.enabled:
                log.info(summarize(record))
        bar.update(step, loss=loss_value, lr=lr, tokens_per_s=tokens_per_s)
        last = step == cfg.train.max_steps
        if held_out and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or last):
            eval_loss = evaluate(model, held_out, cfg.train.eval_batch_size, pad_id, device)
            logger.log_eval(step, eval_loss=eval_loss)
            bar.write(f"step {step}: eval_loss {eval_loss:.4f}")
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or last:
            checkpoint_now(step)

    # --- outputs ----------------------------------------------------------------------------
    bar.close()
    logger.close()
    save_adapter(model, output, lora, str(cfg.model.path))
    plot_losses(output)
    log.info("adapter written to %s (%s)", output, ADAPTER_WEIGHTS)
    return TrainResult(output, step, loss_value, eval_loss)


__all__ = ["TrainResult", "adapter_state_dict", "evaluate", "train"]
