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
    ref:bf16+amp  the same tensors, under autocast(bf16)
    ours          Triton kernels (default on CUDA)
    ours:torch    the plain-PyTorch twins of every kernel (QLORA_KERNELS=torch)
    ours:fp32res  residual stream held in float32 (`model.residual_dtype`)
    ours:fp32     every activation and matmul in float32 (the arithmetic reference; slow)

Run on a GPU machine from the repository root (bitsandbytes importable for the reference):

    PYTHONPATH=. python -m bench.learning_curve --reference PATH/reference_stack.py --shape 7b \\
        --batch 4 --seq 512 --steps 20 --out curves.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import time
import types

import torch

from bench.llama_shapes import BENCH_LORA, SHAPES, Shape, build_model, reference_batches, train_step
from qlora.lora import LoRALinear
from qlora.model import llama
from qlora.ops import KernelPolicy
from qlora.optim import build_optimizer
from qlora.train.loss import loss_sum

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


def adapter_tensors(model, kind: str = "lora_", rename=lambda n: n, grads: bool = False) -> dict[str, torch.Tensor]:
    """The adapter weights (or their gradients) whose names contain `kind`, by our names, float32 on the CPU."""
    return {rename(n): (p.grad if grads else p).detach().float().cpu() for n, p in model.named_parameters()
            if kind in n and (p.grad is not None or not grads)}  # fmt: skip


def layer_index(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def compare_groups(ours: dict, theirs: dict) -> dict:
    """Per projection kind and per depth (first, middle, last layer): cosine and norm ratio of two sets of
    same-named tensors (batch 0's lora_B gradients; lora_B after training)."""
    groups: dict[str, list[str]] = {}
    layers = sorted({layer_index(n) for n in theirs})
    picks = {layers[0]: "layer_first", layers[len(layers) // 2]: "layer_mid", layers[-1]: "layer_last"}
    for n in theirs:
        groups.setdefault(n.split(".")[-3], []).append(n)
        if layer_index(n) in picks:
            groups.setdefault(picks[layer_index(n)], []).append(n)
    out = {}
    for group, names in groups.items():
        a = torch.cat([ours[n].reshape(-1) for n in names]).double()
        b = torch.cat([theirs[n].reshape(-1) for n in names]).double()
        out[group] = {"cos": round(float(a @ b / (a.norm() * b.norm())), 5),
                      "norm_ratio": round(float(a.norm() / b.norm()), 4),
                      "rms": float(a.square().mean().sqrt()),  # against AdamW's eps (1e-8): below it, steps shrink
                      "frac_under_eps": [round(float((a.abs() < 1e-8).double().mean()), 4),
                                         round(float((b.abs() < 1e-8).double().mean()), 4)]}  # fmt: skip
    return out


@torch.no_grad()
def load_adapters_(model, adapters: dict[str, torch.Tensor], rename=lambda n: n, kinds=("lora_A", "lora_B")) -> None:
    """Copy `adapters` (our names) into the model's adapter weights of the given kinds; every one must match."""
    targets = {rename(n): p for n, p in model.named_parameters() if any(k in n for k in kinds)}
    wanted = {n: a for n, a in adapters.items() if any(k in n for k in kinds)}
    if set(targets) != set(wanted):
        raise RuntimeError(f"adapter names differ: {sorted(set(targets) ^ set(wanted))[:3]}")
    for n, a in wanted.items():
        targets[n].copy_(a)


@dataclasses.dataclass
class Run:
    losses: list[float]  # the loss of each training step's batch, before that step's update
    loss_after: float  # batch 0's loss after the last step
    adapters: dict  # the adapter weights after the last step
    first_gradients: dict  # batch 0's lora_B gradients before any step


def run_reference(ref, recipe: str, args, device, adapters: dict | None = None, steps: int | None = None):
    """-> (Run, lora_A init by our names, bnb state dicts of two probe layers by our names).
    `adapters` (our names) replace the fresh adapters before anything runs."""
    s = {**ref.SHAPES[args.shape], "layers": our_shape(args).layers}
    recipe, _, amp_override = recipe.partition("+")  # "bf16+amp": that recipe's tensors, under autocast
    torch.manual_seed(args.seed)  # as the reference script does before building
    model = ref.build_model(s, "qlora", "sdpa", device, args.seq, args.seed)
    model = ref.prepare_and_wrap(model, "qlora", recipe, 64, 16, args.dropout)
    model.train()
    lora_a = adapter_tensors(model, "lora_A", reference_name_to_ours)
    if adapters is not None:
        load_adapters_(model, adapters, reference_name_to_ours)
    probes = {}
    for name, module in model.named_modules():
        if name.endswith(("layers.0.self_attn.q_proj", f"layers.{s['layers'] - 1}.mlp.down_proj")):
            state = module.base_layer.state_dict()
            probes[reference_name_to_ours(name)] = {k: v.cpu() for k, v in state.items() if torch.is_tensor(v)}
    params = [p for p in model.parameters() if p.requires_grad]
    opt, _, _, _ = ref.make_optimizer(params, device, "paged_adamw32", args.lr)
    autocast = recipe != "bf16" or amp_override == "amp"
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    batches = reference_batches(our_shape(args), args.batch, args.seq, device, args.seed, n=4)

    def loss_of(batch):
        with amp():
            return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    loss_of(batches[0]).backward()
    grads = adapter_tensors(model, "lora_B", reference_name_to_ours, grads=True)
    opt.zero_grad(set_to_none=True)
    losses = []
    for i in range(args.steps if steps is None else steps):
        loss = loss_of(batches[i % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    with torch.no_grad():
        after = float(loss_of(batches[0]))
    run = Run(losses, after, adapter_tensors(model, rename=reference_name_to_ours), grads)
    model = opt = params = None  # freed before the next build
    release_cache(device)
    return run, lora_a, probes


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


def run_ours(variant: str, adapters: dict, probes: dict, args, device, steps: int | None = None):
    """-> (Run, base comparison). `adapters` (our names): lora_A only (the reference's init) or A and B."""
    s = our_shape(args)
    lora = dataclasses.replace(BENCH_LORA, dropout=args.dropout)
    policy = KernelPolicy(kernels="torch" if variant == "torch" else "auto")
    model = build_model(s, "nf4", device, seed=args.seed, lora=lora, policy=policy)
    if variant == "fp32res":
        model.residual_dtype = torch.float32
    if variant in ("fp32", "lin_bf16", "attn_bf16"):
        model.float()  # every activation and matmul in fp32 (the 4-bit codes untouched; dequantized to fp32)
    if variant == "lin_bf16":  # ...except the LoRA linears: bf16 in, bf16 out (then widened again)
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.forward = functools.partial(lambda f, x: f(x.to(torch.bfloat16)).float(), module.forward)
    kinds = ("lora_A", "lora_B") if any("lora_B" in n for n in adapters) else ("lora_A",)
    load_adapters_(model, adapters, kinds=kinds)
    base_check = compare_base(model, probes)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer("paged_adamw_32bit", params, lr=args.lr, weight_decay=0.0)
    batches = reference_batches(s, args.batch, args.seq, device, args.seed, n=4)
    attention = llama.F.scaled_dot_product_attention
    if variant == "attn_bf16":  # ...except attention: bf16 in, bf16 out
        llama.F = types.SimpleNamespace(**{**vars(torch.nn.functional), "scaled_dot_product_attention":
            lambda q, k, v, **kw: attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kw).float()})  # fmt: skip
    try:
        run = _train_ours(model, optimizer, batches, args, steps)
    finally:
        llama.F = torch.nn.functional
    model = optimizer = params = None  # freed before the next build
    release_cache(device)
    return run, base_check


def _train_ours(model, optimizer, batches, args, steps) -> Run:
    losses = []

    def loss_of(batch):
        total, n = loss_sum(model, batch)
        return total / n

    loss_of(batches[0]).backward()
    grads = adapter_tensors(model, "lora_B", grads=True)
    optimizer.zero_grad(set_to_none=True)
    for i in range(args.steps if steps is None else steps):
        losses.append(train_step(model, batches[i % len(batches)], optimizer))
    with torch.no_grad():
        after = float(loss_of(batches[0]))
    return Run(losses, after, adapter_tensors(model), grads)


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
    ap.add_argument("--cross-eval", action="store_true",
                    help="then each side's trained adapters in the other's forward (first recipe, first variant)")
    ap.add_argument("--forward-variants", default="", help="with --cross-eval: our trained adapters in these forwards "
                    "too (fp32; lin_bf16, attn_bf16: fp32 but for the LoRA linears / attention)")
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

    runs: dict[str, Run] = {}
    lora_a = probes = None
    for recipe in [r for r in args.recipes.split(",") if r]:
        t0 = time.perf_counter()
        run, a, p = run_reference(ref, recipe, args, device)
        runs[f"ref:{recipe}"] = run
        lora_a, probes = lora_a or a, probes or p  # the first recipe's init is everyone's
        first = next(iter(runs))
        emit({"tool": "reference", "variant": recipe, "losses": run.losses, "loss_after": run.loss_after,
              "seconds": time.perf_counter() - t0,
              f"first_gradients_vs_{first}": compare_groups(run.first_gradients, runs[first].first_gradients)})
    if lora_a is None:
        raise SystemExit("at least one reference recipe is needed (it supplies the shared adapter init)")
    for variant in [v for v in args.variants.split(",") if v]:
        t0 = time.perf_counter()
        run, base_check = run_ours(variant, lora_a, probes, args, device)
        runs[f"ours:{variant}"] = run
        emit({"tool": "qlora", "variant": variant, "losses": run.losses, "loss_after": run.loss_after,
              "base_elements_differing": base_check, "seconds": time.perf_counter() - t0,
              **{f"first_gradients_vs_{k}": compare_groups(run.first_gradients, r.first_gradients)
                 for k, r in runs.items() if k.startswith("ref:")}})  # fmt: skip
    if args.cross_eval:
        # Each side's trained adapters in the other's forward: did they learn different weights, or does
        # the same weights' loss differ between the two forwards?
        ref_name, ours_name = f"ref:{args.recipes.split(',')[0]}", f"ours:{args.variants.split(',')[0]}"
        theirs_in_ours, _ = run_ours(ours_name[5:], runs[ref_name].adapters, probes, args, device, steps=0)
        ours_in_theirs, _, _ = run_reference(ref, ref_name[4:], args, device, runs[ours_name].adapters, steps=0)
        for forward in [v for v in args.forward_variants.split(",") if v]:
            run, _ = run_ours(forward, runs[ours_name].adapters, probes, args, device, steps=0)
            emit({"forward_variant": forward, "adapters": ours_name, "batch0_loss": run.loss_after})
        theirs_in_fp32, _ = run_ours("fp32", runs[ref_name].adapters, probes, args, device, steps=0)
        ours_in_fp32, _ = run_ours("fp32", runs[ours_name].adapters, probes, args, device, steps=0)
        emit({"cross_eval": True, "batch0_loss": {
            f"{ref_name} adapters, {ref_name} forward": runs[ref_name].loss_after,
            f"{ref_name} adapters, {ours_name} forward": theirs_in_ours.loss_after,
            f"{ref_name} adapters, fp32 forward": theirs_in_fp32.loss_after,
            f"{ours_name} adapters, {ours_name} forward": runs[ours_name].loss_after,
            f"{ours_name} adapters, {ref_name} forward": ours_in_theirs.loss_after,
            f"{ours_name} adapters, fp32 forward": ours_in_fp32.loss_after},
            "lora_B_after": compare_groups(*[{n: a for n, a in runs[k].adapters.items() if "lora_B" in n}
                                             for k in (ours_name, ref_name)])})  # fmt: skip
    curves = {k: r.losses for k, r in runs.items()}
    names = list(curves)
    print("step " + " ".join(f"{n:>13}" for n in names))
    for i in range(args.steps):
        print(f"{i:4d} " + " ".join(f"{curves[n][i]:13.4f}" if i < len(curves[n]) else " " * 13 for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
