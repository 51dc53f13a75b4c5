"""Decode speed: our generation engine against transformers + bitsandbytes `generate`, in one command.

    PYTHONPATH=. python -m bench.generate --reference PATH/reference_stack.py --corpus alpaca.json \\
        [--shape 7b] [--batches 1,8,32] [--prompt-len 128] [--new-tokens 256] [--out results.json]

Both sides hold the same random-weight Llama shape (N(0, 0.02), NF4 + double quantization, blocks of 64, bf16
compute) and decode the same prompts greedily (EOS ignored, so every row makes `--new-tokens` tokens).
Decode tokens/s = batch x (new - 1) tokens / (the time of `new` tokens - the time of 1 token): the prompt's
prefill is measured apart and taken out. Ours runs as users run it: `qlora.generation.Engine` (a static slot
cache, the decode step as a CUDA graph, 4-bit projections straight from the codes), with an unmerged LoRA
adapter (r = 64 on every projection, B random) and without one. The roofline: bytes a decode step must read
(4-bit weights with their scales, the 16-bit lm_head and the KV cache the step attends over) / the copy
bandwidth measured here; `--device cpu` is a smoke run on the tiny shape (no reference, no roofline).
Prints a table; `--out` writes every number as JSON. The median of `--repeats` runs, with the range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.learning_curve import load_reference
from bench.llama_shapes import SHAPES, build_model
from bench.random_checkpoint import write_tokenizer
from qlora.generation import Engine, SamplingParams
from qlora.lora import LoraSpec, lora_layers
from qlora.tokenizer import Tokenizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        runs.append(time.perf_counter() - start)
    return 2 * src.numel() / statistics.median(runs)


def step_bytes(model, batch: int, max_len: int) -> int:
    """What one decode step reads: every 4-bit projection's storage, the lm_head, the attended KV cache."""
    weights = 0
    for layer in lora_layers(model).values():
        base = layer.current_base()
        weights += sum(t.numel() * t.element_size() for t in base.storage().values())
    cfg = model.config
    kv = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * max_len * cfg.head_dim * 2
    return weights + model.lm_head.weight.numel() * 2 + kv


def time_ours(engine: Engine, prompts: list[list[int]], new: int) -> float:
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    sync(engine.device)
    start = time.perf_counter()
    done = engine.generate(prompts, params)
    sync(engine.device)
    assert all(len(c.token_ids) == new for c in done), [len(c.token_ids) for c in done]
    return time.perf_counter() - start


def time_reference(model, prompts: list[list[int]], new: int, pad: int) -> float:
    ids = torch.tensor(prompts, device=model.device)
    sync(model.device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=pad)  # fmt: skip
    sync(model.device)
    assert out.shape[1] == ids.shape[1] + new
    return time.perf_counter() - start


def decode_rate(timer, prompts, new: int, repeats: int) -> dict:
    timer(prompts, 2)  # warm-up (our CUDA graph is captured here)
    rates, prefills = [], []
    for _ in range(repeats):
        one = timer(prompts, 1)
        full = timer(prompts, new)
        rates.append(len(prompts) * (new - 1) / (full - one))
        prefills.append(one)
    return {"decode_tokens_per_s": statistics.median(rates), "range": [min(rates), max(rates)],
            "prefill_s": statistics.median(prefills), "runs": rates}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--reference", type=Path, help="reference_stack.py (transformers + bitsandbytes)")
    ap.add_argument("--corpus", type=Path, required=True, help="text or Alpaca JSON to train the tokenizer on")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    batches = [int(b) for b in args.batches.split(",")]
    max_len = args.prompt_len + args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp), args.corpus, shape.vocab)
        tokenizer = Tokenizer.from_pretrained(tmp)
    gen = torch.Generator().manual_seed(0)
    prompts_all = torch.randint(3, shape.vocab, (max(batches), args.prompt_len), generator=gen).tolist()
    result = {"shape": args.shape, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "rows": []}  # fmt: skip
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    result["copy_bandwidth_gb_s"] = bandwidth / 1e9 if bandwidth else None
    for adapter in (True, False):
        lora = LoraSpec(r=64, alpha=16.0, dropout=0.0) if adapter else LoraSpec(targets=())
        model = build_model(shape, "nf4", device, lora=lora).eval()
        if adapter:
            with torch.no_grad():
                for layer in lora_layers(model).values():
                    layer.lora_B.weight.normal_(0.0, 0.02, generator=torch.Generator(device).manual_seed(1))
        for batch in batches:
            engine = Engine(model, tokenizer, slots=batch, max_len=max_len)
            row = {"stack": "ours", "adapter": adapter, "batch": batch,
                   **decode_rate(lambda p, n, e=engine: time_ours(e, p, n), prompts_all[:batch], args.new_tokens,
                                 args.repeats)}  # fmt: skip
            if bandwidth:
                row["roofline_tokens_per_s"] = batch * bandwidth / step_bytes(model, batch, max_len)
                row["of_roofline"] = row["decode_tokens_per_s"] / row["roofline_tokens_per_s"]
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.reference and device.type == "cuda":
        ref = load_reference(str(args.reference))
        model = ref.build_model(shape, "qlora", "sdpa", device, max_len, 0).eval()
        model.config.use_cache = True
        for batch in batches:
            row = {"stack": "transformers+bitsandbytes", "adapter": False, "batch": batch,
                   **decode_rate(lambda p, n, m=model: time_reference(m, p, n, tokenizer.eos_id or 0),
                                 prompts_all[:batch], args.new_tokens, args.repeats)}  # fmt: skip
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    ours = {(r["batch"], r["adapter"]): r["decode_tokens_per_s"] for r in result["rows"] if r["stack"] == "ours"}
    theirs = {r["batch"]: r["decode_tokens_per_s"] for r in result["rows"] if r["stack"] != "ours"}
    print(f"{'batch':>5} {'ours':>10} {'ours+LoRA':>10} {'reference':>10} {'ratio':>7}")
    for b in batches:
        ref_rate = theirs.get(b)
        ratio = f"{ours[(b, False)] / ref_rate:.2f}x" if ref_rate else "-"
        print(f"{b:>5} {ours[(b, False)]:>10.1f} {ours[(b, True)]:>10.1f} {ref_rate or 0:>10.1f} {ratio:>7}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
