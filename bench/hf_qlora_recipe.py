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


def alpaca_pairs(path: str) -> list[tuple[str, str]]:
    """(prompt, output) of each Alpaca record, with the script's two templates."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    records = json.loads(text) if path.endswith(".json") else [json.loads(x) for x in text.splitlines() if x.strip()]
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


def training_arguments(output_dir: str, steps: int, grad_accum: int, seed: int, cpu: bool):
    """The script's TrainingArguments, spelled for whichever transformers is installed."""
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kw = dict(
        output_dir=output_dir, per_device_train_batch_size=1, gradient_accumulation_steps=grad_accum, max_steps=steps,
        learning_rate=2e-4, lr_scheduler_type="constant", weight_decay=0.0, adam_beta2=0.999, max_grad_norm=0.3,
        optim="paged_adamw_32bit", bf16=True, gradient_checkpointing=True, logging_steps=1, save_strategy="no",
        report_to="none", remove_unused_columns=False, seed=seed, data_seed=42, disable_tqdm=True,
    )  # fmt: skip
    if "warmup_ratio" in fields:
        kw["warmup_ratio"] = 0.03  # the script's; transformers' "constant" schedule ignores it
    if "group_by_length" in fields:
        kw["group_by_length"] = True
    else:  # transformers >= 5.2x spells it as a sampling strategy
        kw["train_sampling_strategy"] = "group_by_length"
    if cpu:
        kw["use_cpu" if "use_cpu" in fields else "no_cuda"] = True
    return TrainingArguments(**kw)


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
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    result: dict = {"start_time": START_TIME, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                    "versions": versions(), "recipe": args.recipe, "steps": args.steps,
                    "source_max_len": args.source_max_len, "target_max_len": args.target_max_len,
                    "grad_accum": args.grad_accum}  # fmt: skip

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="right")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    examples = encode_pairs(tokenizer, alpaca_pairs(args.data), args.source_max_len, args.target_max_len)
    result["examples"] = len(examples)
    result["example_tokens_mean"] = sum(len(e["input_ids"]) for e in examples) / len(examples)

    quant = BitsAndBytesConfig(load_in_4bit=True, llm_int8_threshold=6.0, llm_int8_has_fp16_weight=False,
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True,
                               bnb_4bit_quant_type="nf4")  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result["load_start_time"] = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0} if cuda else {"": "cpu"})  # fmt: skip
    sync()
    result["load_end_time"] = time.time()
    if cuda:
        result["load_max_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        torch.cuda.reset_peak_memory_stats()

    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, bias="none", task_type="CAUSAL_LM",
                      target_modules=list(TARGET_MODULES))  # fmt: skip
    model = get_peft_model(model, lora)
    if args.recipe == "qlorapy":
        qlorapy_casts(model)
    result["n_linear4bit"] = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    steps: list[dict] = []
    counts: dict = {"tokens": 0, "target_tokens": 0}  # device tensors once a micro-batch added to them

    class Timing(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            sync()
            steps.append({"step": state.global_step, "end_time": time.time(),
                          **{k: int(v) for k, v in counts.items()}})  # fmt: skip
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
        targs = training_arguments(out_dir, args.steps, args.grad_accum, args.seed, cpu=not cuda)
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
        result["train_max_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        result["train_max_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
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
    args = ap.parse_args(argv)
    result = run(args)
    with open(args.result, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
