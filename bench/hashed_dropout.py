"""The LoRA dropout's products with the hashed mask against torch's dropout + cuBLAS, per call, on a GPU.

    PYTHONPATH=. python -m bench.hashed_dropout --out results.json

For each shape (tokens N, input width, rank 64) it times, as CUDA graphs of 20 calls each (so that
Triton's Python launcher does not hide the kernels), microseconds per call:

- forward:  torch.native_dropout over the producer's whole rows [N, in + r + pad] + F.linear(xd, A)
            against the hashed mask applied while reading x (`kernels.hashed_dropout.dropout_project`);
- backward: the masked input gradient with the stored bool mask (`kernels.masked_lowrank`, which
            takes a stored mask as well as a seed) + g^T @ xd (cuBLAS) against
            `dropout_backward` (both on the same tiles, the mask hashed once);

with `--sweep`, at other tiles and split targets too (7B shapes). Prints a JSON line per shape.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from qlora.kernels import hashed_dropout as kernels
from qlora.kernels.masked_lowrank import add_masked_lowrank_
from qlora.lora.dropout import HashedDropout
from qlora.lora.matmul import columns_width

SHAPES = {"7b q/k/v/o, gate/up": (4096,), "7b down": (11008,), "65b q/k/v/o": (8192,), "65b down": (22016,)}


def graphed_us(fn, calls: int = 20, repeats: int = 5) -> float:
    """Median microseconds per call of `fn`, captured `calls` times into one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


FORWARD_TILES = [(64, 64, 4), (64, 128, 4), (128, 64, 8), (32, 128, 4)]  # BLOCK_M, BLOCK_K, warps
BACKWARD_TILES = [(64, 64, 4), (128, 32, 8), (128, 32, 4), (128, 64, 8), (32, 128, 4)]  # BLOCK_N, BLOCK_K, warps


def one_shape(n_tokens: int, n_in: int, sweep: bool, rank: int = 64, p: float = 0.05) -> dict:
    device = torch.device("cuda")
    width = columns_width(n_in, rank)
    x_rows = torch.randn(n_tokens, width, device=device, dtype=torch.bfloat16)
    x = x_rows[:, :n_in]
    a = torch.randn(rank, n_in, device=device, dtype=torch.bfloat16) * 0.02
    g = torch.randn(n_tokens, rank, device=device, dtype=torch.bfloat16)
    grad_x = torch.randn(n_tokens, n_in, device=device, dtype=torch.bfloat16)
    mask = HashedDropout.draw(p, device)
    dropped, keep = (t[:, :n_in] for t in torch.native_dropout(x_rows, p, True))
    row: dict = {"tokens": n_tokens, "in": n_in, "rank": rank}
    row["forward_torch"] = graphed_us(lambda: F.linear(torch.native_dropout(x_rows, p, True)[0][:, :n_in], a))
    row["backward_torch"] = graphed_us(
        lambda: (add_masked_lowrank_(grad_x, g, a, keep, 1.0), (g.t() @ dropped).float()))
    row["forward_hashed (default tiles)"] = graphed_us(
        lambda: kernels.dropout_project(x, a, mask.seed, mask.threshold, mask.scale))
    row["backward_hashed (default tiles)"] = graphed_us(
        lambda: kernels.dropout_backward(g, x, mask.seed, mask.threshold, mask.scale, grad_x=grad_x, a=a))
    defaults = kernels.PROJECT_TILES, kernels.PROJECT_TILES_FEW_ROWS, kernels.BACKWARD_TILES
    try:
        for tiles in FORWARD_TILES if sweep else []:
            kernels.PROJECT_TILES = kernels.PROJECT_TILES_FEW_ROWS = tiles
            for programs in (None, 528):
                row[f"forward_hashed {tiles} programs={programs or 'default'}"] = graphed_us(
                    lambda programs=programs: kernels.dropout_project(x, a, mask.seed, mask.threshold, mask.scale,
                                                                      programs=programs))  # fmt: skip
        for tiles in BACKWARD_TILES if sweep else []:
            kernels.BACKWARD_TILES = tiles
            for programs in (None, 528):
                row[f"backward_hashed {tiles} programs={programs or 'default'}"] = graphed_us(
                    lambda programs=programs: kernels.dropout_backward(
                        g, x, mask.seed, mask.threshold, mask.scale, grad_x=grad_x, a=a, programs=programs))
    finally:
        kernels.PROJECT_TILES, kernels.PROJECT_TILES_FEW_ROWS, kernels.BACKWARD_TILES = defaults
    # correctness on these shapes too: the hashed product against the twin's mask
    want = (x.float() * mask.multipliers(n_tokens, n_in, torch.float32)) @ a.float().t()
    got = kernels.dropout_project(x, a, mask.seed, mask.threshold, mask.scale).float()
    row["forward_max_rel_err"] = ((got - want).abs().max() / want.abs().max()).item()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 512])
    ap.add_argument("--sweep", action="store_true", help="also time other tiles and split targets (7B shapes)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for name, (n_in,) in SHAPES.items():
        for n_tokens in args.tokens:
            row = {"shape": name, **one_shape(n_tokens, n_in, sweep=args.sweep and name.startswith("7b"))}
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
