"""Each Triton kernel against its plain-PyTorch twin, and the dequantizer against copy bandwidth.

On a GPU (7B shapes, bf16):
- 4-bit NF4 + double-quant dequantization of 4096x4096, 4096x11008 and 11008x4096 weights: the
  twin (`QuantizedTensor.dequantize`), the kernel at its default launch and a small sweep of
  launch settings (lookup, bytes per program, warps), each checked bit-exact against the twin;
  bandwidth counted as bytes read (codes + absmax codes) plus bytes written (bf16 weight), and
  compared with a device-to-device copy (`dst.copy_(src)`, read + write) of the same bf16 tensor;
- RMSNorm [4x512 tokens, 4096], SwiGLU [2048, 11008], RoPE q [4, 32, 512, 128] (transposed, as the
  model passes it), cross-entropy [2048, 32000] and [2048, 128256]: forward and forward+backward
  time of kernel and twin (eager torch), and peak memory of the cross-entropy.

Times are medians over `--reps` runs after warm-up, by CUDA events; the dequantization and the
copy are timed as 20 calls captured in a CUDA graph (so launch overhead, which rivals a 15 us
kernel, is not counted; `dequant eager ms` shows the per-call time with it). Prints a table; `--out`
writes the rows and the versions as JSON.

    PYTHONPATH=. python bench/kernels.py --out kernels.json          # on the GPU machine
    PYTHONPATH=. python bench/kernels.py --smoke --out /tmp/k.json   # CPU: tiny shapes, Triton's interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

DEQUANT_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
SWEEP = [(lookup, bpp, warps) for lookup in ("load", "select") for bpp in (2048, 4096, 8192) for warps in (4, 8)]


class Timer:
    """Median milliseconds of a callable: CUDA events on the GPU, wall clock in the CPU smoke run."""

    def __init__(self, device: str, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps

    def __call__(self, fn: Callable[[], object], graph: bool = False) -> float:
        for _ in range(self.warmup):
            fn()
        if graph and self.device == "cuda":
            try:
                return self.graphed(fn)
            except RuntimeError as e:  # a twin that cannot be captured is timed eagerly instead
                print(f"warning: CUDA graph capture failed ({e}); timing eagerly", file=sys.stderr)
        times = []
        for _ in range(self.reps):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def graphed(self, fn: Callable[[], object], per_graph: int = 20) -> float:
        """Median ms per call of `per_graph` calls captured in one CUDA graph: no launch overhead.

        A 4096x4096 dequantization moves ~42 MB, about 15 us at HBM speed: comparable to a Python +
        Triton launch, which eager timing would add to every call."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(per_graph):
                fn()
        graph.replay()
        times = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / per_graph)
        return statistics.median(times)


def peak_mib(device: str, fn: Callable[[], object]) -> float | None:
    """Peak memory allocated by `fn` above what was allocated before it (CUDA only)."""
    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def bench_dequantize(device: str, timer: Timer, shapes, sweep) -> list[dict]:
    import qlora
    from qlora.kernels.dequantize import dequantize_4bit

    rows = []
    for shape in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        w = (torch.randn(shape, device=device, generator=g) * 0.02).to(torch.bfloat16)
        q = qlora.quantize(w, "nf4", 64, double_quant=True)
        n = q.numel
        moved = (n + 1) // 2 + q.nested.codes.numel() + 4 * q.nested.absmax.numel() + 2 * n  # read + write
        src, dst = torch.empty_like(w), torch.empty_like(w)
        copy_ms = timer(lambda dst=dst, src=src: dst.copy_(src), graph=True)
        copy_gbs = 2 * 2 * n / copy_ms / 1e6
        want = q.dequantize(torch.bfloat16)
        base = {"kernel": "dequantize_nf4_dq", "shape": list(shape), "dtype": "bfloat16"}
        rows.append({**base, "impl": "copy (d2d)", "ms": copy_ms, "GB/s": copy_gbs, "vs_copy": 1.0})
        ref_ms = timer(lambda q=q: q.dequantize(torch.bfloat16), graph=True)
        rows.append({**base, "impl": "twin", "ms": ref_ms, "GB/s": moved / ref_ms / 1e6,
                     "vs_copy": moved / ref_ms / 1e6 / copy_gbs})  # fmt: skip
        out = torch.empty(n, dtype=torch.bfloat16, device=device)
        for lookup, bpp, warps in [("default", None, None), *sweep]:
            kwargs = {} if lookup == "default" else dict(lookup=lookup, bytes_per_program=bpp, num_warps=warps)
            got = dequantize_4bit(q, torch.bfloat16, **kwargs)
            exact = bool(torch.equal(got.view(torch.int16), want.view(torch.int16)))
            call = lambda q=q, kwargs=kwargs, out=out: dequantize_4bit(q, torch.bfloat16, out=out, **kwargs)  # noqa: E731
            ms = timer(call, graph=True)
            impl = "triton default" if lookup == "default" else f"triton {lookup} {bpp}B {warps}w"
            gbs = moved / ms / 1e6
            rows.append({**base, "impl": impl, "ms": ms, "GB/s": gbs, "vs_copy": gbs / copy_gbs, "vs_twin": ref_ms / ms,
                         "bit_exact": exact})  # fmt: skip
            if lookup == "default":
                rows[-1]["dequant eager ms"] = timer(call)
    return rows


def fwd_bwd(fn: Callable, inputs: list[torch.Tensor], grad: torch.Tensor | None) -> Callable[[], object]:
    """A closure running fn forward (grad None) or forward + backward with a fixed upstream gradient."""

    def run():
        for t in inputs:
            t.grad = None
        y = fn(*inputs)
        if grad is not None:
            y.backward(grad)

    return run


def bench_elementwise(device: str, timer: Timer, smoke: bool) -> list[dict]:
    from qlora import ops
    from qlora.kernels.cross_entropy import cross_entropy_sum
    from qlora.kernels.rms_norm import rms_norm
    from qlora.kernels.rotary import apply_rotary
    from qlora.kernels.swiglu import swiglu

    bf16 = torch.bfloat16
    tokens, hidden, inter, heads, hd, seq = (6, 40, 72, 2, 16, 3) if smoke else (2048, 4096, 11008, 32, 128, 512)
    vocabs = (300,) if smoke else (32000, 128256)

    def randn(*shape, grad=True, scale=1.0):
        t = (torch.randn(*shape, device=device) * scale).to(bf16)
        return t.requires_grad_(grad)

    weight = randn(hidden, grad=False) * 0.1 + 1.0
    batch = tokens // seq
    q = randn(batch, seq, heads, hd, grad=False).transpose(1, 2).requires_grad_(True)  # [B, nh, T, hd] view
    angles = torch.arange(seq, device=device)[:, None].float() * torch.rand(hd // 2, device=device)
    cos = torch.cat([angles, angles], -1).cos().to(bf16)[None]
    sin = torch.cat([angles, angles], -1).sin().to(bf16)[None]
    cases = [
        ("rms_norm", [tokens, hidden], lambda x: rms_norm(x, weight, 1e-5),
         lambda x: ops_twin(ops.rms_norm, x, weight, 1e-5), [randn(tokens, hidden)]),
        ("swiglu", [tokens, inter], swiglu, lambda g, u: ops_twin(ops.swiglu, g, u),
         [randn(tokens, inter), randn(tokens, inter)]),
        ("rope", list(q.shape), lambda x: apply_rotary(x, cos, sin),
         lambda x: ops_twin(ops.apply_rotary, x, cos, sin), [q]),
    ]  # fmt: skip
    for vocab in vocabs:
        labels = torch.randint(0, vocab, (tokens,), device=device)
        fused_ce = lambda x, labels=labels: cross_entropy_sum(x, labels)  # noqa: E731
        twin_ce = lambda x, labels=labels: ops_twin(ops.cross_entropy_sum, x, labels)  # noqa: E731
        logits = randn(tokens, vocab, scale=2.0)
        cases.append((f"cross_entropy V={vocab}", [tokens, vocab], fused_ce, twin_ce, [logits]))
    rows = []
    for name, shape, fused, twin, inputs in cases:
        for impl, fn in (("twin", twin), ("triton", fused)):
            out = fn(*inputs)
            grad = torch.randn_like(out) if out.dim() else torch.ones((), device=device)  # scalar loss: dL/dL = 1
            row = {"kernel": name, "shape": shape, "dtype": "bfloat16", "impl": impl,
                   "ms": timer(fwd_bwd(fn, inputs, None)), "fwd+bwd ms": timer(fwd_bwd(fn, inputs, grad))}  # fmt: skip
            if name.startswith("cross_entropy"):
                row["peak MiB fwd+bwd"] = peak_mib(device, fwd_bwd(fn, inputs, grad))
            rows.append(row)
        twin_row, fused_row = rows[-2], rows[-1]
        fused_row["vs_twin"] = twin_row["fwd+bwd ms"] / fused_row["fwd+bwd ms"]
    return rows


def ops_twin(op: Callable, *args):
    """The op's plain-PyTorch twin, whatever device the tensors are on."""
    from qlora.ops import KernelPolicy

    return op(*args, policy=KernelPolicy(kernels="torch"))


def print_table(rows: list[dict]) -> None:
    keys = ["kernel", "shape", "impl", "ms", "fwd+bwd ms", "GB/s", "vs_copy", "vs_twin", "bit_exact",
            "peak MiB fwd+bwd", "dequant eager ms"]  # fmt: skip

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if v < 100 else f"{v:.0f}"
        return "x".join(map(str, v)) if isinstance(v, list) else ("" if v is None else str(v))

    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(cell(r.get(k)) for k in keys) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the rows and versions")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (on a CPU: Triton's interpreter)")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-sweep", action="store_true", help="only the default dequantize launch")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.smoke:
            sys.exit("bench/kernels.py needs a CUDA GPU; on a CPU use --smoke (Triton's interpreter, tiny shapes)")
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import triton

    timer = Timer(device, warmup=1 if args.smoke else args.warmup, reps=1 if args.smoke else args.reps)
    shapes = [(33, 96), (5, 123)] if args.smoke else DEQUANT_SHAPES
    sweep = [] if args.no_sweep else (SWEEP[:2] if args.smoke else SWEEP)
    rows = bench_dequantize(device, timer, shapes, sweep) + bench_elementwise(device, timer, args.smoke)
    print_table(rows)
    info = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "smoke": args.smoke, "reps": timer.reps, "warmup": timer.warmup,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
    }  # fmt: skip
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    if not all(r.get("bit_exact", True) for r in rows):
        sys.exit("a dequantize launch was NOT bit-exact to the reference (see bit_exact in the table)")


if __name__ == "__main__":
    main()
