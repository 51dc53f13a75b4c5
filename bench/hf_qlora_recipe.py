"""The QLoRA recipe on transformers + peft + bitsandbytes, run as its users run it, timed: the reference side of
`bench/train_cli.py`.

It follows the QLoRA repository's script (artidoro/qlora `qlora.py`, format-spec section 5) on a local
model directory and an Alpaca file:

- `from_pretrained` with `BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute bf16)`, bf16;
- `prepare_model_for_kbit_training` (gradient checkpointing), `LoraConfig(r 64, alpha 16,
  dropout 0.1, bias none, CAUSAL_LM)` on all seven block linears, `get_peft_model`; with `--recipe
  qlorapy` (default) the script's casts after it: LoRA modules bf16, norms fp32, embeddings and lm_head
  bf16; `--recipe hf` leaves peft's (fp32 LoRA, fp32 norms/embeddings);
- `transformers.Trainer`: `optim="paged_adamw_32bit"`, lr 2e-4 constant, batch 1 x 16 accumulation,
  max_grad_norm 0.3, weight decay 0, Adam beta2 0.999, gradient checkpointing, bf16, group_by_length,
  logging every step, no evaluation, no saving;
- the script's `DataCollatorForCausalLM`: source `bos + prompt` and target `output + eos`, each
  tokenized without special tokens and truncated separately (`--source-max-len`, `--target-max-len`;
  the script's dataclass defaults are 1024 / 256, its Alpaca script's 384 / 128), labels -100 over
  the source, right padding, attention mask over the real tokens. Examples are tokenized up front
  (the collator only pads), so the length grouping can read their token counts.

Deviations, none of which changes the work of a step: a fast tokenizer (the script asks for the slow
sentencepiece one, which needs a `tokenizer.model`); no `[PAD]` token added and no embedding resize
(the script adds one for LLaMA; with one example per micro-batch nothing is padded); all examples
train (the script holds out an evaluation split only with `--do_eval`).

Several GPUs (`bench/multi_gpu.py`), under `accelerate launch`: `--parallel ddp` loads the model onto each
process's GPU (`device_map` LOCAL_RANK) and leaves the recipe as above, Trainer wrapping it in DDP; `--parallel
fsdp` follows PEFT's QLoRA + FSDP guide (peft docs/source/accelerate/fsdp.md, "Use PEFT QLoRA and FSDP"):
`bnb_4bit_quant_storage=bfloat16` with the model loaded in bfloat16 and no `device_map` (accelerate's FSDP
plugin places and shards it), no `prepare_model_for_kbit_training` and no casts (FSDP flattens each wrapped
module's parameters into one dtype), reentrant gradient checkpointing with input gradients enabled (the guide's
`--use_reentrant True`, as TRL's trainer prepares a sharded QLoRA model); Trainer wraps the LoRA modules apart
from the frozen ones (`update_fsdp_plugin_peft`). Token counts are summed over the processes at each step's end
and memory peaks are the largest (and smallest) over them; only the first process writes `--result`.
`--text-blocks N` trains on plain text instead of Alpaca records, as qlora's plain-text format does
(`qlora/data/plain_text.py`): each record's `text` encoded as BOS + text + EOS and cut into blocks of N tokens,
every token a target. `--micro-batch-size` sets the examples per device and micro-batch. Left at their
defaults, these options change nothing above.

Measured, written as one JSON object to `--result`: load seconds (`from_pretrained` to a ready
model, device synchronised), setup seconds (peft and Trainer), Unix times of the process start and of
every optimizer step's end (device synchronised in a callback), the non-padding input tokens
(attention mask 1) and target tokens of every step (counted in `training_step`), the logged loss of
every step, `torch.cuda.max_memory_allocated`/`reserved` after loading and over training (reset in
between), versions. The caller turns these into rates; see `bench/train_cli.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

START_TIME = time.time()  # before the heavy imports: they are part of what a user waits for

import torch  # noqa: E402

from qlora.config import DEFAULT_TARGETS  # noqa: E402
from qlora.data.alpaca import PROMPT_NO_INPUT, PROMPT_WITH_INPUT  # noqa: E402  (the QLoRA code's template: one copy)

TARGET_MODULES = list(DEFAULT_TARGETS)
GiB = 2**30


def read_records(path: str) -> list:
    """The records of a JSON file (one list) or a JSON Lines file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return json.loads(text) if path.endswith(".json") else [json.loads(x) for x in text.splitlines() if x.strip()]


def alpaca_pairs(path: str) -> list[tuple[str, str]]:
    """(prompt, output) of each Alpaca record, with the script's two templates."""
    records = read_records(path)
    pairs = []
    for r in records:
        template = PROMPT_WITH_INPUT if r.get("input") else PROMPT_NO_INPUT
        pairs.append((template.format(instruction=r["instruction"], input=r.get("input") or ""), r["output"]))
    return pairs


def encode_pairs(tokenizer, pairs, source_max_len: int, target_max_len: int) -> list[dict]:
    """The script's collator, tokenizing part: `bos + source` and `target + eos`, truncated separately."""
    sources = tokenizer([f"{tokenizer.bos_token}{s}" for s, _ in pairs], max_length=source_max_len,
                        truncation=True, add_special_tokens=False)["input_ids"]  # fmt: skip
    targets = tokenizer([f"{t}{tokenizer.eos_token}" for _, t in pairs], max_length=target_max_len,
                        truncation=True, add_special_tokens=False)["input_ids"]  # fmt: skip
    return [{"input_ids": s + t, "source_len": len(s)} for s, t in zip(sources, targets, strict=True)]


def text_blocks(tokenizer, path: str, block_size: int) -> list[dict]:
    """qlora's plain-text examples (`qlora/data/plain_text.py`): each record's `text` as BOS + text + EOS, cut into
    blocks of `block_size` tokens (a document's last block shorter), every token a target (`source_len` 0)."""
    texts = [r["text"] for r in read_records(path)]
    bodies = tokenizer(texts, add_special_tokens=False)["input_ids"]
    blocks = []
    for body in bodies:
        ids = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
        blocks += [{"input_ids": ids[i : i + block_size], "source_len": 0} for i in range(0, len(ids), block_size)]
    return blocks


class PadCollator:
    """The script's collator, batching part: right padding, labels -100 over source and padding."""

    def __init__(self, pad_id: int, train_on_source: bool = False):
        self.pad_id, self.train_on_source = pad_id, train_on_source

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"])
            mask[row, :n] = 1
            first = 0 if self.train_on_source else e["source_len"]
            labels[row, first:n] = ids[row, first:n]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def qlorapy_casts(model) -> None:
    """What qlora.py does after get_peft_model with --bf16: LoRA bf16, norms fp32, embeddings/lm_head bf16."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            module.to(torch.bfloat16)
        if "norm" in name:
            module.to(torch.float32)
        weight = getattr(module, "weight", None)
        if ("lm_head" in name or "embed_tokens" in name) and weight is not None and weight.dtype == torch.float32:
            module.to(torch.bfloat16)


def training_arguments(output_dir: str, steps: int, grad_accum: int, seed: int, cpu: bool, micro_batch_size: int = 1,
                       reentrant_checkpointing: bool = False):  # fmt: skip
    """The script's TrainingArguments, spelled for whichever transformers is installed (`reentrant_checkpointing`:
    the QLoRA + FSDP guide's `use_reentrant=True`)."""
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kw = dict(
        output_dir=output_dir, per_device_train_batch_size=micro_batch_size, gradient_accumulation_steps=grad_accum,
        max_steps=steps, learning_rate=2e-4, lr_scheduler_type="constant", weight_decay=0.0, adam_beta2=0.999,
        max_grad_norm=0.3, optim="paged_adamw_32bit", bf16=True, gradient_checkpointing=True, logging_steps=1,
        save_strategy="no", report_to="none", remove_unused_columns=False, seed=seed, data_seed=42, disable_tqdm=True,
    )  # fmt: skip
    if "warmup_ratio" in fields:
        kw["warmup_ratio"] = 0.03  # the script's; transformers' "constant" schedule ignores it
    if "group_by_length" in fields:
        kw["group_by_length"] = True
    else:  # transformers >= 5.2x spells it as a sampling strategy
        kw["train_sampling_strategy"] = "group_by_length"
    if cpu:
        kw["use_cpu" if "use_cpu" in fields else "no_cuda"] = True
    if reentrant_checkpointing:
        kw["gradient_checkpointing_kwargs"] = {"use_reentrant": True}
    return TrainingArguments(**kw)


def over_ranks(values: list[float], device: torch.device) -> tuple[list[float], list[float]]:
    """(max, min) of each value over the processes of the job (the values themselves in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values), list(values)
    high = torch.tensor(values, dtype=torch.float64, device=device)
    low = high.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return high.tolist(), low.tolist()


def summed_over_ranks(values: list, device: torch.device) -> list[int]:
    """Each count (ints or device tensors) summed over the processes of the job."""
    import torch.distributed as dist

    wire = torch.stack([torch.as_tensor(v, device=device).long() for v in values])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(wire)
    return [int(v) for v in wire.tolist()]


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 (a version string is all this wants)
            out[mod] = f"unavailable: {e.__class__.__name__}: {e}"
    return out


def run(args) -> dict:
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer, TrainerCallback

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("hf_qlora_recipe: --device cuda but torch sees no CUDA device")
    fsdp = args.parallel == "fsdp"
    rank, world, local_rank = 0, 1, 0
    if args.parallel != "none":
        if fsdp and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
            raise SystemExit("hf_qlora_recipe: --parallel fsdp needs `accelerate launch` with an FSDP config "
                             "(bench/multi_gpu.py writes one)")  # fmt: skip
        from accelerate import PartialState

        state = PartialState(cpu=not cuda)  # joins the launcher's process group now: FSDP's loading asks for it
        rank, world, local_rank = state.process_index, state.num_processes, state.local_process_index
        if world != int(os.environ.get("WORLD_SIZE", "1")):
            raise SystemExit(f"hf_qlora_recipe: accelerate sees {world} processes, the launcher started "
                             f"{os.environ.get('WORLD_SIZE')}")  # fmt: skip
        if cuda:
            torch.cuda.set_device(local_rank)  # one GPU per process
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    wire = torch.device("cuda", local_rank) if cuda else torch.device("cpu")  # where collectives' tensors live
    result: dict = {"start_time": START_TIME, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                    "versions": versions(), "recipe": "peft-fsdp-qlora" if fsdp else args.recipe, "steps": args.steps,
                    "source_max_len": args.source_max_len, "target_max_len": args.target_max_len,
                    "grad_accum": args.grad_accum}  # fmt: skip
    if args.parallel != "none" or args.text_blocks or args.micro_batch_size != 1:
        result.update(parallel=args.parallel, world_size=world, rank=rank, micro_batch_size=args.micro_batch_size,
                      text_blocks=args.text_blocks)  # fmt: skip

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="right")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    if args.text_blocks:
        examples = text_blocks(tokenizer, args.data, args.text_blocks)
    else:
        examples = encode_pairs(tokenizer, alpaca_pairs(args.data), args.source_max_len, args.target_max_len)
    result["examples"] = len(examples)
    result["example_tokens_mean"] = sum(len(e["input_ids"]) for e in examples) / len(examples)

    storage = {"bnb_4bit_quant_storage": torch.bfloat16} if fsdp else {}  # the FSDP guide's: shardable bf16 storage
    quant = BitsAndBytesConfig(load_in_4bit=True, llm_int8_threshold=6.0, llm_int8_has_fp16_weight=False,
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True,
                               bnb_4bit_quant_type="nf4", **storage)  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    placement = {} if fsdp else {"device_map": {"": local_rank} if cuda else {"": "cpu"}}  # FSDP: the plugin places it
    result["load_start_time"] = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, dtype=torch.bfloat16,
                                                 **placement)  # fmt: skip
    sync()
    result["load_end_time"] = time.time()
    if cuda:
        load_peak = over_ranks([torch.cuda.max_memory_allocated() / GiB], wire)[0][0]
        result["load_max_allocated_gib"] = load_peak
        torch.cuda.reset_peak_memory_stats()

    model.config.use_cache = False
    if fsdp:  # the guide's sharded QLoRA: no fp32 casts (FSDP flattens one dtype per wrapped module)
        model.enable_input_require_grads()
    else:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, bias="none", task_type="CAUSAL_LM",
                      target_modules=list(TARGET_MODULES))  # fmt: skip
    model = get_peft_model(model, lora)
    if args.recipe == "qlorapy" and not fsdp:
        qlorapy_casts(model)
    result["n_linear4bit"] = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    steps: list[dict] = []
    counts: dict = {"tokens": 0, "target_tokens": 0}  # device tensors once a micro-batch added to them

    class Timing(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            sync()
            if args.parallel == "none":
                totals = {k: int(v) for k, v in counts.items()}
            else:  # the whole job's step: every process's tokens (one small all-reduce, after the synchronisation)
                totals = dict(zip(counts, summed_over_ranks(list(counts.values()), wire), strict=True))
            steps.append({"step": state.global_step, "end_time": time.time(), **totals})
            counts.update(tokens=0, target_tokens=0)

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                for s in reversed(steps):
                    if s["step"] == state.global_step:
                        s["loss"] = float(logs["loss"])
                        break

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, *a, **kw):
            # summed on the device, read at the step's end (already synchronised): no extra host sync per micro-batch
            counts["tokens"] = counts["tokens"] + inputs["attention_mask"].sum()
            counts["target_tokens"] = counts["target_tokens"] + (inputs["labels"][:, 1:] != -100).sum()
            return super().training_step(model, inputs, *a, **kw)

    with tempfile.TemporaryDirectory(prefix="hf_qlora_recipe_") as out_dir:
        targs = training_arguments(out_dir, args.steps, args.grad_accum, args.seed, cpu=not cuda,
                                   micro_batch_size=args.micro_batch_size, reentrant_checkpointing=fsdp)  # fmt: skip
        trainer = CountingTrainer(model=model, args=targs, train_dataset=examples, data_collator=PadCollator(pad_id),
                                  callbacks=[Timing()])  # fmt: skip
        result["train_start_time"] = time.time()
        trainer.train()
    sync()
    result["train_end_time"] = time.time()
    result["steps_timed"] = steps
    result["optimizer"] = type(trainer.optimizer).__name__
    inner = getattr(trainer.optimizer, "optimizer", None)  # accelerate wraps it
    if inner is not None:
        result["optimizer"] = f"{type(inner).__module__}.{type(inner).__name__}"
    result["transformers_file"] = transformers.__file__
    if cuda:
        peaks = [torch.cuda.max_memory_allocated() / GiB, torch.cuda.max_memory_reserved() / GiB]
        (result["train_max_allocated_gib"], result["train_max_reserved_gib"]), low = over_ranks(peaks, wire)
        if world > 1:
            result["train_max_allocated_gib_min"] = low[0]
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face model directory (config.json, safetensors, tokenizer)")
    ap.add_argument("--data", required=True, help="Alpaca JSON / JSON Lines file")
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps")
    ap.add_argument("--result", required=True, help="write the result JSON here")
    ap.add_argument("--source-max-len", type=int, default=384)
    ap.add_argument("--target-max-len", type=int, default=128)
    ap.add_argument("--grad-accum", type=int, default=16, help="micro-batches (of one example) per optimizer step")
    ap.add_argument("--recipe", default="qlorapy", choices=["qlorapy", "hf"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--micro-batch-size", type=int, default=1, help="examples per device and micro-batch")
    ap.add_argument("--text-blocks", type=int, default=0, metavar="N",
                    help="plain text (records with `text`) cut into blocks of N tokens, as qlora's plain-text format; "
                         "0: Alpaca records (default)")  # fmt: skip
    ap.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"],
                    help="under `accelerate launch`: ddp, or fsdp as PEFT's QLoRA + FSDP guide "
                         "(module docstring)")  # fmt: skip
    args = ap.parse_args(argv)
    result = run(args)
    if result.get("rank", 0) == 0:  # one process writes
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
