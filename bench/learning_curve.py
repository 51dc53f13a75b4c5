"""Per-step losses of our engine and the reference stack from the same start: same 4-bit base, same
adapters, same tokens.

Why this exists: in the throughput runs the reference's loss fell faster than ours at 7B and 65B
(BENCHMARKS.md, "Noticed"). There the two sides' random weights, adapters and batches merely looked
alike. Here they are the same: the base weights are drawn from one seed in the reference script's
order (`bench/llama_shapes.reference_draw_order`) and the quantized bytes are compared; our lora_A
is copied from the reference's PEFT init; both train on the reference script's batches; LoRA dropout
is 0 unless asked. What is left to differ is arithmetic, which the variants take apart:

    ref:hf        transformers + peft + bnb as a HF user gets it (prepare_model_for_kbit_training:
                  embeddings, norms, lm_head fp32; autocast bf16), the throughput benchmark's peer
    ref:qlorapy   Dettmers' qlora.py (norms fp32, LoRA and embeddings bf16, autocast)
    ref:bf16      every non-quantized tensor bf16, no autocast
    ours          Triton kernels (default on CUDA)
    ours:torch    the plain-PyTorch twins of every kernel (QLORA_KERNELS=torch)
    ours:fp32res  residual stream held in float32 (`model.residual_dtype`)

Run on a GPU machine from the repository root (bitsandbytes importable for the reference):

    PYTHONPATH=. python -m bench.learning_curve --reference PATH/reference_stack.py --shape 7b \\
        --batch 4 --seq 512 --steps 20 --out curves.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import time

import torch

from bench.llama_shapes import BENCH_LORA, SHAPES, Shape, build_model, reference_batches, train_step
from qlora import ops
from qlora.optim import build_optimizer

REFERENCE_RECIPES = ("hf", "qlorapy", "bf16")
OUR_VARIANTS = ("triton", "torch", "fp32res")


def load_reference(path: str):
    spec = importlib.util.spec_from_file_location("reference_stack", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def our_shape(args) -> Shape:
    """The named shape, with fewer layers if asked (a quick look on the CPU: `--device cpu --layers 2`)."""
    s = SHAPES[args.shape]
    return dataclasses.replace(s, layers=args.layers) if args.layers else s


def release_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reference_name_to_ours(name: str) -> str:
    """PEFT's `base_model.model.X.lora_A.default.weight` -> our `X.lora_A.weight`."""
    return name.removeprefix("base_model.model.").replace(".default.", ".")


def run_reference(ref, recipe: str, args, device) -> tuple[list[float], dict, dict]:
    """-> (losses, lora_A init by our names, bnb state dicts of two probe layers by our names)."""
    s = {**ref.SHAPES[args.shape], "layers": our_shape(args).layers}
    torch.manual_seed(args.seed)  # as the reference script does before building
    model = ref.build_model(s, "qlora", "sdpa", device, args.seq, args.seed)
    model = ref.prepare_and_wrap(model, "qlora", recipe, 64, 16, args.dropout)
    model.train()
    lora_a = {reference_name_to_ours(n): p.detach().float().cpu() for n, p in model.named_parameters()
              if "lora_A" in n}  # fmt: skip
    probes = {}
    for name, module in model.named_modules():
        if name.endswith(("layers.0.self_attn.q_proj", f"layers.{s['layers'] - 1}.mlp.down_proj")):
            state = module.base_layer.state_dict()
            probes[reference_name_to_ours(name)] = {k: v.cpu() for k, v in state.items() if torch.is_tensor(v)}
    params = [p for p in model.parameters() if p.requires_grad]
    opt, _, _, _ = ref.make_optimizer(params, device, "paged_adamw32", args.lr)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if recipe != "bf16" else contextlib.nullcontext
    losses = []
    for batch in reference_batches(our_shape(args), args.batch, args.seq, device, args.seed, n=4) * 1000:
        if len(losses) == args.steps:
            break
        with amp():
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    del model, opt, params
    release_cache(device)
    return losses, lora_a, probes


def compare_base(model, probes: dict) -> dict:
    """Per probe layer and bnb state-dict key: how many elements of ours differ from the reference's.
    All zero on CUDA; on the CPU bitsandbytes picks the nested absmax codes through an approximate
    lookup table (../shared/reference/format-spec.md), so a few `weight.absmax` codes differ by one."""
    out = {}
    for name, theirs in probes.items():
        ours = {k: v.cpu() for k, v in model.get_submodule(name).base.to_bnb_state_dict("weight").items()}
        missing = sorted(set(theirs) ^ set(ours))
        if missing:
            raise RuntimeError(f"{name}: state-dict keys on one side only: {missing}")
        out[name] = {k: int((ours[k].reshape(-1) != theirs[k].reshape(-1)).sum()) for k in sorted(theirs)}
    return out


def run_ours(variant: str, lora_a: dict, probes: dict, args, device) -> tuple[list[float], dict]:
    s = our_shape(args)
    lora = dataclasses.replace(BENCH_LORA, dropout=args.dropout)
    model = build_model(s, "nf4", device, seed=args.seed, lora=lora)
    if variant == "fp32res":
        model.residual_dtype = torch.float32
    with torch.no_grad():
        named = dict(model.named_parameters())
        missing = [n for n in lora_a if n not in named]
        if missing:
            raise RuntimeError(f"reference adapter names with no match here: {missing[:3]}")
        for n, a in lora_a.items():
            named[n].copy_(a)
    base_check = compare_base(model, probes)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer("paged_adamw_32bit", params, lr=args.lr, weight_decay=0.0)
    losses = []
    kernels = "torch" if variant == "torch" else "auto"
    with ops.use_implementation(kernels):
        for batch in reference_batches(s, args.batch, args.seq, device, args.seed, n=4) * 1000:
            if len(losses) == args.steps:
                break
            losses.append(train_step(model, batch, optimizer))
    del model, optimizer, params
    release_cache(device)
    return losses, base_check


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="path of reference_stack.py")
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on both sides (0: no RNG difference)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=0, help="override the shape's layer count (0: keep)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--recipes", default=",".join(REFERENCE_RECIPES))
    ap.add_argument("--variants", default=",".join(OUR_VARIANTS))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = torch.device(args.device)
    ref = load_reference(args.reference)
    common = {"shape": args.shape, "batch": args.batch, "seq": args.seq, "dropout": args.dropout, "lr": args.lr,
              "seed": args.seed, "layers": our_shape(args).layers, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}  # fmt: skip

    def emit(record: dict) -> None:  # as each run ends, so a later failure loses nothing
        line = json.dumps({**common, **record})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    curves: dict[str, list[float]] = {}
    lora_a = probes = None
    for recipe in [r for r in args.recipes.split(",") if r]:
        t0 = time.perf_counter()
        losses, a, p = run_reference(ref, recipe, args, device)
        lora_a, probes = lora_a or a, probes or p  # the first recipe's init is everyone's
        curves[f"ref:{recipe}"] = losses
        emit({"tool": "reference", "variant": recipe, "losses": losses, "seconds": time.perf_counter() - t0})
    if lora_a is None:
        raise SystemExit("at least one reference recipe is needed (it supplies the shared adapter init)")
    for variant in [v for v in args.variants.split(",") if v]:
        t0 = time.perf_counter()
        losses, base_check = run_ours(variant, lora_a, probes, args, device)
        curves[f"ours:{variant}"] = losses
        emit({"tool": "qlora", "variant": variant, "losses": losses, "base_elements_differing": base_check,
              "seconds": time.perf_counter() - t0})  # fmt: skip
    names = list(curves)
    print("step " + " ".join(f"{n:>13}" for n in names))
    for i in range(args.steps):
        print(f"{i:4d} " + " ".join(f"{curves[n][i]:13.4f}" if i < len(curves[n]) else " " * 13 for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
