"""Where `qlora.load_model`'s seconds go: each phase of loading one checkpoint, on the CPU or a GPU.

    python -m bench.load_time MODEL_DIR [--device cuda] [--repeat 3] [--lora-r 64] [--out result.json]

Each load is timed in the loader's own calls, which this script wraps by name for the duration of the
load (`qlora.loading`'s helpers, `LlamaForCausalLM.from_config`, `LoRALinear.set_base_weight`); on CUDA
each wrapper synchronises before it stops its clock, so a phase is charged with its kernels. Phases:

- construct   `LlamaForCausalLM.from_config` on the meta device
- swap        `replace_linears` (the block linears become `LoRALinear`s, still on meta)
- fused       `use_fused_elementwise`
- keys        `expected_keys` + `check_keys`
- read        the checkpoint iterator's `next()` (`iter_weights`: safetensors' `get_tensor`). Shards are
              memory-mapped, so a page is read by what touches it first: `to_device` on CUDA (the host to
              device copy faults the pages in), the quantization on the CPU (where `to_device` is a no-op)
- to_device   `qlora.loading._to_device`: every checkpoint tensor's move to the device
- quantize    `LoRALinear.set_base_weight`: the cast to the compute dtype and `QuantizedTensor.quantize`
- adapters    `qlora.loading._init_adapters`: LoRA A/B allocated on the device and initialised
- other       the rest of `load_model` (config, loop bookkeeping, tie_weights, the meta check)

The first load in a process is the cold one (lazy imports, allocator growth, first kernel launches): it is
what `bench/train_cli.py`'s "load" measures, so run this in a fresh process and read row 1 against the
reference's load time; later rows are warm. The shards are read once before timing (`--no-warm-cache`
skips that), as the side-by-side runs had them in the page cache. The last row is one load with no
wrappers (no per-phase synchronisation), to show what the probes cost. On CUDA the context is created
before any timing.

`--staged` (CUDA, an experiment for the loader) replaces the plain `tensor.to(device)` of every dense
checkpoint tensor by `PinnedStager.to_device`: the bytes go through two pinned host buffers, copied in by
torch's multi-threaded CPU copy (which also faults the memory-mapped pages in) while the previous buffer's
asynchronous DMA and the quantization kernels run; a pageable `.to` copies single-threaded through the
driver's staging and waits for the stream first. The staged copy is checked bit-equal to `.to` before timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch

import qlora.loading
from qlora.checkpoint_io.safetensors_dir import list_checkpoint_files
from qlora.lora import LoRALinear, LoraSpec
from qlora.model.llama import LlamaForCausalLM

PHASES = ("construct", "swap", "fused", "keys", "read", "to_device", "quantize", "adapters", "other")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class PinnedStager:
    """Host tensors to a CUDA device through two pinned buffers of `nbytes` each, in turn.

    Per piece: wait until the DMA that last read this buffer is done (its event), copy the piece in on the
    CPU, start the DMA on the current stream (so later kernels on it see the data), record the event.
    """

    def __init__(self, device: torch.device, nbytes: int = 64 << 20) -> None:
        self.device = device
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in range(2)]
        self.turn = 0

    def to_device(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        src = t.contiguous().reshape(-1).view(torch.uint8)  # [numel * itemsize] bytes
        out = torch.empty(t.shape, dtype=t.dtype, device=self.device)
        dst = out.reshape(-1).view(torch.uint8)
        nbytes = self.buffers[0].numel()
        for start in range(0, src.numel(), nbytes):
            stop = min(start + nbytes, src.numel())
            buf, event = self.buffers[self.turn], self.events[self.turn]
            self.turn ^= 1
            event.synchronize()
            buf[: stop - start].copy_(src[start:stop])
            dst[start:stop].copy_(buf[: stop - start], non_blocking=True)
            event.record()
        return out if dtype is None else out.to(dtype)


def staged_to_device(stager: PinnedStager, original: Callable) -> Callable:
    """`qlora.loading._to_device` with dense CPU tensors going through `stager`."""

    def to_device(tensor, device, dtype=None):
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and torch.device(device).type == "cuda":
            return stager.to_device(tensor, dtype)
        return original(tensor, device, dtype)

    return to_device


def check_stager(stager: PinnedStager) -> None:
    """Bit-equality of the staged copy with `.to` on a tensor of several buffers with a ragged end."""
    n = 2 * stager.buffers[0].numel() + 12_345
    for dtype in (torch.bfloat16, torch.float32):
        t = torch.randn(n // 2, generator=torch.Generator().manual_seed(0)).to(dtype)
        if not torch.equal(stager.to_device(t), t.to(stager.device)):
            raise SystemExit(f"PinnedStager gave different bytes from .to for {dtype}: not timing it")


class Clock:
    """Seconds per phase; `wrap(phase, fn)` charges `fn`'s calls (synchronised on CUDA) to `phase`."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, phase: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[phase] += time.perf_counter() - start

        return timed

    def wrap_iterator(self, phase: str, make: Callable[..., Iterator]) -> Callable[..., Iterator]:
        def timed(*args, **kwargs):
            items = make(*args, **kwargs)
            while True:
                start = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    self.seconds[phase] += time.perf_counter() - start
                yield item

        return timed


@contextlib.contextmanager
def probes(clock: Clock):
    """The loader's calls wrapped by `clock` while inside; everything restored on the way out."""
    loading = qlora.loading
    from_config = LlamaForCausalLM.__dict__["from_config"].__func__
    with contextlib.ExitStack() as stack:
        helpers = {"replace_linears": "swap", "use_fused_elementwise": "fused", "expected_keys": "keys",
                   "check_keys": "keys", "_to_device": "to_device", "_init_adapters": "adapters"}  # fmt: skip
        for name, phase in helpers.items():
            stack.enter_context(mock.patch.object(loading, name, clock.wrap(phase, getattr(loading, name))))
        read = clock.wrap_iterator("read", loading.iter_weights)
        stack.enter_context(mock.patch.object(loading, "iter_weights", read))
        stack.enter_context(
            mock.patch.object(LlamaForCausalLM, "from_config", classmethod(clock.wrap("construct", from_config)))
        )
        stack.enter_context(
            mock.patch.object(LoRALinear, "set_base_weight", clock.wrap("quantize", LoRALinear.set_base_weight))
        )
        yield


def load_once(
    args: argparse.Namespace, device: torch.device, instrumented: bool, stager: PinnedStager | None
) -> dict[str, float]:
    clock = Clock(device)
    lora = LoraSpec(r=args.lora_r) if args.lora_r else None
    quant_type = None if args.quant_type == "none" else args.quant_type
    staged = staged_to_device(stager, qlora.loading._to_device) if stager else None
    with (
        mock.patch.object(qlora.loading, "_to_device", staged) if staged else contextlib.nullcontext(),
        probes(clock) if instrumented else contextlib.nullcontext(),
    ):
        clock.sync()
        start = time.perf_counter()
        model = qlora.loading.load_model(args.model, quant_type, not args.no_double_quant, DTYPES[args.compute_dtype],
                                         device, lora=lora)  # fmt: skip
        clock.sync()
        total = time.perf_counter() - start
    row = {"total": total}
    if instrumented:
        row.update({p: clock.seconds.get(p, 0.0) for p in PHASES if p != "other"})
        row["other"] = total - sum(row[p] for p in PHASES if p != "other")
    if device.type == "cuda":
        row["max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a Hugging Face model directory (safetensors)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "int4", "none"])
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--compute-dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--lora-r", type=int, default=64, help="adapter rank on every block linear; 0: none")
    parser.add_argument("--repeat", type=int, default=2, help="instrumented loads (the first is the cold one)")
    parser.add_argument("--no-warm-cache", action="store_true", help="do not read the shards before timing")
    parser.add_argument("--staged", action="store_true", help="CUDA: copy through pinned buffers (see above)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.empty(1, device=device)  # the CUDA context, outside every timing
    if args.staged and device.type != "cuda":
        parser.error("--staged needs a CUDA device")
    stager = PinnedStager(device) if args.staged else None  # allocated outside the timing: a loader would too
    if stager:
        check_stager(stager)
    files = list_checkpoint_files(args.model)
    if not args.no_warm_cache:
        for file in files:
            with open(file, "rb") as f:
                while f.read(1 << 26):
                    pass
    header = {
        "model": str(args.model), "shards": len(files), "gb": round(sum(f.stat().st_size for f in files) / 1e9, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "quant_type": args.quant_type,
        "double_quant": not args.no_double_quant, "compute_dtype": args.compute_dtype, "lora_r": args.lora_r,
        "staged": args.staged,
    }  # fmt: skip
    print(json.dumps(header))
    rows = []
    for i in range(args.repeat + 1):
        instrumented = i < args.repeat
        row = {"run": i + 1, "kind": "cold" if i == 0 else "warm", "probes": instrumented}
        row.update(load_once(args, device, instrumented, stager))
        rows.append(row)
    columns = ["total", *PHASES] + (["max_allocated_gib"] if device.type == "cuda" else [])
    print("run  kind  probes  " + "  ".join(f"{c:>9}" for c in columns))
    for row in rows:
        cells = "  ".join(f"{row[c]:9.3f}" if c in row else f"{'':>9}" for c in columns)
        print(f"{row['run']:>3}  {row['kind']:<4}  {'yes' if row['probes'] else 'no':<6}  {cells}")
    if args.out:
        args.out.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
