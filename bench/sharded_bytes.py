"""Bytes per GPU of a model trained with `--parallel fsdp`: computed from the shapes, and measured by sharding
one real quantized decoder layer with FSDP2 under a fake process group, in one process, without GPUs.

Why. Under FSDP2 (`qlora.distributed.parallel`) each decoder layer's 4-bit base joins its parameters
(`LoRALinear.register_base_storage`: `base_packed`, `base_absmax_codes`, `base_absmax_scales`) and
`fully_shard` splits every parameter along dim 0 into `torch.chunk` pieces, one per rank, each rank's
storage padded to the first (largest) piece. So what one GPU holds between layer gathers is the largest
piece of every parameter, and that is what this table reports, for Llama-2-70B and LLaMA-65B (the shapes
of `bench/llama_shapes.py`, those of the reference script) at 1, 2, 4 and 8 GPUs.

Computed, per linear of n = out x in weights (NF4, block 64, double quantization):
    codes            n/2 bytes          uint8 [n/2, 1]      (two 4-bit codes per byte)
    absmax codes     n/64 bytes         uint8 [n/64]        (one 8-bit code per block of 64)
    absmax scales    4 ceil(n/64/256)   float32 [n/16384]   (one per 256 absmax codes)
    adapters         4 r (in + out)     float32 A [r, in], B [out, r]   (r = 64 on all seven linears)
and per model the 16-bit embeddings and lm_head [vocab, hidden] and RMSNorm weights [hidden] (2 per layer and
the final one), which the root `fully_shard` splits too. A parameter with d rows of b bytes costs each rank
ceil(d / N) x b bytes (the padded piece).

Measured: `bench.llama_shapes.build_model` builds the model with ONE decoder layer at that width, its linears
quantized by qlora's own quantizer (`LoRALinear.set_base_weight`, random N(0, 0.02) weights), `register_base_storage`
moves each base into parameters, and then, for every world size N and every rank, a copy is sharded as training
shards it (`fully_shard` on the layer, then on the root) under `init_process_group("fake", FakeStore(), rank,
world_size=N)` (`torch.testing._internal.distributed.fake_pg`: a process group whose collectives do nothing,
so one process can play any rank; checked with torch 2.13). Read back: `p.to_local()` of each DTensor parameter
(this rank's rows) and FSDP2's padded shard storage (`FSDPParam._sharded_param_data`, a private attribute: the
bytes the rank allocates). Per rank: root + layers x layer. The script asserts that the largest `to_local` piece
and every rank's padded storage equal the computed bytes, and that the `to_local` pieces of all ranks add up to
the unsharded total.

Not counted: each linear's code tables and offset (1,092 bytes, replicated on every rank: 0.6 MB at 70B) and
whatever training adds (activations, gradients and optimizer states of the adapters: 1x and 2x the adapters' sharded
bytes with AdamW, a gathered layer at a time, workspaces).

Run (from the repository root; the 70B layer is 0.86 G weights to quantize: about 2 minutes per shape on 2 CPU cores,
about 3 GiB of host memory):

    python -m bench.sharded_bytes --out bench/results/sharded_bytes.json             # 70b and 65b, N = 1, 2, 4, 8
    python -m bench.sharded_bytes --shape 128,352,2,4,2,512 --world-sizes 1 2 3 8   # a tiny custom shape: seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bench.llama_shapes import BENCH_LORA, SHAPES, Shape, build_model, linear_shapes

GiB = 2**30
BLOCK = 64  # NF4 block of weights per absmax
NESTED_BLOCK = 256  # absmax codes per float32 scale (double quantization)
CATEGORIES = ("base_4bit", "adapters", "dense_16bit")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # linear_shapes' order
SOURCES = {
    "70b": "Llama-2-70B: bench/llama_shapes.py SHAPES['70b'] (meta-llama/Llama-2-70b-hf config.json: hidden 8192, "
           "intermediate 28672, 80 layers, 64 heads, 8 KV heads, vocab 32000)",
    "65b": "LLaMA-65B: bench/llama_shapes.py SHAPES['65b'] (LLaMA paper, Touvron et al. 2023, table 2: dimension 8192, "
           "64 heads, 80 layers; FFN 22016 and vocab 32000 as in the converted Hugging Face config)",
}  # fmt: skip


@dataclass(frozen=True)
class Param:
    """One parameter as FSDP2 splits it: `rows` along dim 0 of `row_bytes` each; `copies` of it in the model."""

    category: str
    name: str
    rows: int
    row_bytes: int
    copies: int

    def rank_bytes(self, world: int) -> int:
        """The largest rank's piece (every rank's padded storage): ceil(rows / world) rows."""
        return math.ceil(self.rows / world) * self.row_bytes * self.copies

    @property
    def total_bytes(self) -> int:
        return self.rows * self.row_bytes * self.copies


def parameters(s: Shape, r: int = BENCH_LORA.r) -> list[Param]:
    """Every parameter of a `s`-shaped model trained with --parallel fsdp (module docstring), layers folded into
    `copies`."""
    out = []
    for name, (fan_in, fan_out) in zip(LINEAR_NAMES, linear_shapes(s), strict=True):
        n = fan_in * fan_out
        blocks = math.ceil(n / BLOCK)
        out += [Param("base_4bit", f"{name}.base_packed", (n + 1) // 2, 1, s.layers),
                Param("base_4bit", f"{name}.base_absmax_codes", blocks, 1, s.layers),
                Param("base_4bit", f"{name}.base_absmax_scales", math.ceil(blocks / NESTED_BLOCK), 4, s.layers),
                Param("adapters", f"{name}.lora_A.weight", r, 4 * fan_in, s.layers),
                Param("adapters", f"{name}.lora_B.weight", fan_out, 4 * r, s.layers)]  # fmt: skip
    out += [Param("dense_16bit", "input_layernorm.weight", s.hidden, 2, s.layers),
            Param("dense_16bit", "post_attention_layernorm.weight", s.hidden, 2, s.layers),
            Param("dense_16bit", "embed_tokens.weight", s.vocab, 2 * s.hidden, 1),
            Param("dense_16bit", "lm_head.weight", s.vocab, 2 * s.hidden, 1),
            Param("dense_16bit", "norm.weight", s.hidden, 2, 1)]  # fmt: skip
    return out


def by_category(values: Iterator[tuple[str, int]]) -> dict[str, int]:
    out = dict.fromkeys(CATEGORIES, 0)
    for category, nbytes in values:
        out[category] += nbytes
    out["total"] = sum(out[c] for c in CATEGORIES)
    return out


def computed(s: Shape, world: int) -> dict[str, int]:
    """Bytes the largest rank holds, by category (and `total`)."""
    return by_category((p.category, p.rank_bytes(world)) for p in parameters(s))


def unsharded(s: Shape) -> dict[str, int]:
    return by_category((p.category, p.total_bytes) for p in parameters(s))


# ----------------------------------------------------------------------------- measured
def category_of(name: str) -> str:
    """The category of a parameter of qlora's model, by its name."""
    if name.rsplit(".", 1)[-1].startswith("base_"):
        return "base_4bit"
    if ".lora_A." in name or ".lora_B." in name:
        return "adapters"
    return "dense_16bit"


def one_layer_model(s: Shape, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """`s` with one decoder layer, quantized by qlora and with each base moved into parameters, unsharded."""
    model = build_model(replace(s, layers=1), "nf4", device, seed=seed, lora=BENCH_LORA)
    from qlora.distributed.parallel import quantized_layers

    linears = list(quantized_layers(model.model.layers[0]))
    if len(linears) != len(LINEAR_NAMES):
        raise RuntimeError(f"expected {len(LINEAR_NAMES)} 4-bit linears in the decoder layer, found {len(linears)}")
    for linear in linears:
        linear.register_base_storage()
    return model


def padded_storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of the padded shard storage FSDP2 allocated for `module`'s own parameters on this rank."""
    state = module._get_fsdp_state()  # private FSDP2 state: torch 2.13's layout
    group = getattr(state, "_fsdp_param_group", None)
    if group is None:
        return 0
    total = 0
    for fsdp_param in group.fsdp_params:
        data = getattr(fsdp_param, "_sharded_param_data", None)
        if data is None:
            raise RuntimeError("FSDP2's FSDPParam has no _sharded_param_data in this torch: update "
                               "bench/sharded_bytes.py:padded_storage_bytes")  # fmt: skip
        total += data.numel() * data.element_size()
    return total


def shard_as_training_does(model: torch.nn.Module, world: int, rank: int, device: torch.device) -> dict:
    """Shard a copy of `model` as rank `rank` of `world` (fake process group); its bytes by category, the layer's
    and the root's apart, `to_local` pieces and padded storage."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        mesh = init_device_mesh(device.type, (world,))
        copy_ = copy.deepcopy(model)
        layer = copy_.model.layers[0]
        fully_shard(layer, mesh=mesh)
        fully_shard(copy_, mesh=mesh)
        layer_names = {id(p) for p in layer.parameters()}
        layer_parts, root_parts = [], []
        for name, p in copy_.named_parameters():
            if not isinstance(p, DTensor):
                raise RuntimeError(f"{name} was not sharded by fully_shard")
            local = p.to_local()
            (layer_parts if id(p) in layer_names else root_parts).append((category_of(name), local.numel() *
                                                                           local.element_size()))  # fmt: skip
        return {"layer": by_category(iter(layer_parts)), "root": by_category(iter(root_parts)),
                "padded_layer": padded_storage_bytes(layer), "padded_root": padded_storage_bytes(copy_)}  # fmt: skip
    finally:
        dist.destroy_process_group()


def rank_total(piece: dict, layers: int) -> dict[str, int]:
    return {k: piece["root"][k] + layers * piece["layer"][k] for k in (*CATEGORIES, "total")}


def measure(s: Shape, worlds: list[int], device: torch.device, seed: int = 0) -> dict:
    """Measured bytes for each world size: the largest rank's, the smallest's, every rank's padded storage, and the
    sum over ranks of the `to_local` pieces."""
    started = time.perf_counter()
    model = one_layer_model(s, device, seed)
    build_s = time.perf_counter() - started
    out: dict = {"build_s": round(build_s, 2), "world_sizes": {}}
    for world in worlds:
        ranks = [shard_as_training_does(model, world, rank, device) for rank in range(world)]
        totals = [rank_total(piece, s.layers) for piece in ranks]
        padded = [piece["padded_root"] + s.layers * piece["padded_layer"] for piece in ranks]
        out["world_sizes"][world] = {
            "largest_rank": max(totals, key=lambda t: t["total"]),
            "smallest_rank": min(totals, key=lambda t: t["total"]),
            "padded_per_rank": padded,
            "sum_over_ranks": {k: sum(t[k] for t in totals) for k in (*CATEGORIES, "total")},
        }
    out["measure_s"] = round(time.perf_counter() - started, 2)
    return out


# ----------------------------------------------------------------------------- checks, table
def check(name: str, s: Shape, measured: dict) -> None:
    """Measured == computed, or an error naming the model, world size and category."""
    whole = unsharded(s)
    for world, m in measured["world_sizes"].items():
        expected = computed(s, world)
        if m["largest_rank"] != expected:
            raise AssertionError(f"{name}, {world} ranks: the largest rank holds {m['largest_rank']}, "
                                 f"computed {expected}")  # fmt: skip
        if any(p != expected["total"] for p in m["padded_per_rank"]):
            raise AssertionError(f"{name}, {world} ranks: padded shard storage per rank {m['padded_per_rank']}, "
                                 f"computed {expected['total']}")  # fmt: skip
        if m["sum_over_ranks"] != whole:
            raise AssertionError(f"{name}, {world} ranks: the ranks' pieces add up to {m['sum_over_ranks']}, "
                                 f"the unsharded model is {whole}")  # fmt: skip


def table(results: list[dict]) -> str:
    lines = ["| model | GPUs | 4-bit base | adapters (fp32) | 16-bit (emb, lm_head, norms) | per GPU | x GPUs / "
             "unsharded |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        whole = r["unsharded"]["total"]
        unit, scale = ("GiB", GiB) if whole >= GiB else ("KiB", 2**10)
        for world, row in r["computed"].items():
            cells = [f"{row[c] / scale:,.3f} {unit}" for c in (*CATEGORIES, "total")]
            ratio = int(world) * row["total"] / whole
            lines.append(f"| {r['name']} | {world} | " + " | ".join(cells) + f" | {ratio:.4f} |")
    return "\n".join(lines)


def parse_shape(text: str) -> Shape:
    try:
        hidden, inter, layers, heads, kv_heads, vocab = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: give six integers HIDDEN,INTERMEDIATE,LAYERS,HEADS,"
                                         "KV_HEADS,VOCAB, e.g. 128,352,2,4,2,512") from None  # fmt: skip
    if hidden % heads or heads % kv_heads:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: heads must divide hidden and kv_heads must divide heads")
    return Shape(hidden, inter, layers, heads, kv_heads, vocab)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.sharded_bytes", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--models", nargs="+", default=["70b", "65b"], choices=sorted(SHAPES),
                    help="shapes of bench/llama_shapes.py (default: 70b 65b)")  # fmt: skip
    ap.add_argument("--shape", type=parse_shape, default=None, metavar="H,I,L,HEADS,KV,V",
                    help="a custom shape instead of --models: hidden, intermediate, layers, heads, kv_heads, "
                         "vocab")  # fmt: skip
    ap.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--device", default="cpu", help="where the layer is quantized and sharded (cpu, cuda)")
    ap.add_argument("--computed-only", action="store_true", help="skip the measurement (the table from the shapes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if any(w < 1 for w in args.world_sizes):
        ap.error("--world-sizes must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    models = [("custom", args.shape)] if args.shape else [(name, SHAPES[name]) for name in args.models]
    results = []
    for name, s in models:
        r = {"name": name, "shape": asdict(s), "source": SOURCES.get(name, "--shape"),
             "unsharded": unsharded(s), "computed": {w: computed(s, w) for w in args.world_sizes}}  # fmt: skip
        if not args.computed_only:
            print(f"{name}: quantizing one decoder layer on {device} and sharding it ...", file=sys.stderr, flush=True)
            r["measured"] = measure(s, args.world_sizes, device, args.seed)
            check(name, s, r["measured"])
            r["measured_equals_computed"] = True
        results.append(r)
    print(table(results))
    if not args.computed_only:
        print("\nmeasured (one real layer sharded under a fake process group) == computed, for every world size")
    if args.out:
        report = {"tool": "bench.sharded_bytes", "device": str(device), "torch": torch.__version__,
                  "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "models": results}  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
