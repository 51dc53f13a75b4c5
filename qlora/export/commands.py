"""The export commands: `qlora merge`, `qlora quantize`, `qlora export-gguf` (argument parsing only).

Each parses its flags and calls one library function; `qlora.cli` dispatches to them and turns
the errors a user can fix into one message with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# The held-out text beside a development checkout (../shared), used when --text is not given.
SHARED_TEXT = Path(__file__).resolve().parents[2].parent / "shared/data/text/wikitext-2-raw/wiki.test.raw"


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message tells the user what to fix: printed without a traceback, exit status 2."""
    from qlora.adapter import AdapterError
    from qlora.checkpoint_io import CheckpointError, GGUFError
    from qlora.export.merge import MergeError
    from qlora.model.config import UnsupportedModelError

    return AdapterError, CheckpointError, GGUFError, MergeError, UnsupportedModelError


def _as_command(name: str, run) -> int:
    try:
        return run()
    except _user_errors() as e:
        print(f"qlora {name}: error: {e}", file=sys.stderr)
        return 2


def _dtype_flag(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--dtype", default=default, choices=["bf16", "fp16", "fp32"], help=f"Output dtype ({default}).")


def merge_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="qlora merge",
        description="Merge a LoRA adapter into its base model and write a Hugging Face directory.",
    )
    p.add_argument("--model", required=True, help="Base model: a Hugging Face directory, .gguf file or hub id.")
    p.add_argument("--adapter", required=True, help="Adapter directory (from qlora train, or PEFT's).")
    p.add_argument("--output", required=True, help="New directory for the merged model.")
    _dtype_flag(p, "bf16")
    p.add_argument("--onto", default="dequantized", choices=["dequantized", "original"],
                   help="Add the LoRA delta to the dequantized 4-bit base the adapter trained against "
                        "(default), or to the original 16-bit weights.")  # fmt: skip
    p.add_argument("--quant-type", choices=["nf4", "fp4", "int4", "none"],
                   help="How training quantized the base (default: the adapter's config.yaml, else nf4).")  # fmt: skip
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=None,
                   help="Whether training used double quantization (default: config.yaml, else yes).")  # fmt: skip
    p.add_argument("--text", help="Held-out text file for the merge report (default: ../shared wikitext if present).")
    p.add_argument("--report-tokens", type=int, default=4096, help="Tokens of the text the report evaluates.")
    p.add_argument("--report-seq-len", type=int, default=256, help="Window length of the report's evaluation.")
    p.add_argument("--no-report", action="store_true", help="Skip the merge report.")
    p.add_argument("--max-shard-size", type=int, default=2048, help="Largest safetensors shard, MiB (default 2048).")
    args = p.parse_args(argv)
    return _as_command("merge", lambda: _merge(args))


def _merge(args: argparse.Namespace) -> int:
    from qlora.export.hf_dir import DTYPES
    from qlora.export.merge import merge, read_trained_base
    from qlora.export.report import REPORT_FILE, format_report, merge_report

    base = read_trained_base(args.adapter, quant_type=args.quant_type, double_quant=args.double_quant)
    out = merge(args.model, args.adapter, args.output, dtype=DTYPES[args.dtype], onto=args.onto, base=base,
                max_shard_bytes=args.max_shard_size * 1024**2)  # fmt: skip
    print(f"merged model written to {out}")
    text = args.text or (SHARED_TEXT if SHARED_TEXT.is_file() else None)
    if args.no_report:
        return 0
    if text is None:
        print("no merge report: pass --text FILE (held-out text) to measure the merge")
        return 0
    report = merge_report(args.model, args.adapter, out, text, base=base, onto=args.onto, dtype_name=args.dtype,
                          max_tokens=args.report_tokens, seq_len=args.report_seq_len)  # fmt: skip
    print(format_report(report))
    print(f"report saved to {out / REPORT_FILE}")
    return 0


def quantize_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="qlora quantize",
        description="Write a bitsandbytes 4-bit checkpoint that transformers + bitsandbytes (and qlora) load.",
    )
    p.add_argument("--model", required=True, help="Model: a Hugging Face directory, .gguf file or hub id.")
    p.add_argument("--output", required=True, help="New directory for the 4-bit checkpoint.")
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"], help="4-bit data type (default nf4).")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="Quantize the block constants to 8 bits too (default: yes).")  # fmt: skip
    p.add_argument("--blocksize", type=int, default=64, help="Elements per absmax block (default 64).")
    _dtype_flag(p, "bf16")
    p.add_argument("--max-shard-size", type=int, default=2048, help="Largest safetensors shard, MiB (default 2048).")
    args = p.parse_args(argv)
    return _as_command("quantize", lambda: _quantize(args))


def _quantize(args: argparse.Namespace) -> int:
    from qlora.export.bnb_checkpoint import quantize_checkpoint
    from qlora.export.hf_dir import DTYPES

    out = quantize_checkpoint(args.model, args.output, quant_type=args.quant_type, double_quant=args.double_quant,
                              blocksize=args.blocksize, dtype=DTYPES[args.dtype],
                              max_shard_bytes=args.max_shard_size * 1024**2)  # fmt: skip
    print(f"bitsandbytes 4-bit checkpoint ({args.quant_type}, double quant {args.double_quant}) written to {out}")
    return 0


def export_gguf_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="qlora export-gguf",
        description="Write the model (+ adapter, merged) as a GGUF file for llama.cpp, tokenizer included.",
    )
    p.add_argument("--model", required=True, help="Base model: a Hugging Face directory, .gguf file or hub id.")
    p.add_argument("--adapter", help="Adapter directory to merge in (from qlora train, or PEFT's).")
    p.add_argument("--output", required=True, help="The .gguf file to write.")
    p.add_argument("--type", default="f16", choices=["f16", "bf16", "q8_0", "f32"],
                   help="Type of the matrices (default f16; 1-D tensors are always f32).")  # fmt: skip
    p.add_argument("--onto", choices=["dequantized", "original"],
                   help="Merge onto the dequantized 4-bit base (default with --adapter) or the originals.")  # fmt: skip
    p.add_argument("--quant-type", choices=["nf4", "fp4", "int4", "none"],
                   help="How training quantized the base (default: the adapter's config.yaml, else nf4).")  # fmt: skip
    args = p.parse_args(argv)
    return _as_command("export-gguf", lambda: _export_gguf(args))


def _export_gguf(args: argparse.Namespace) -> int:
    from qlora.export.gguf_export import export_gguf
    from qlora.export.merge import TrainedBase, read_trained_base

    base = read_trained_base(args.adapter, quant_type=args.quant_type) if args.adapter else TrainedBase()
    out = export_gguf(args.model, args.adapter, args.output, kind=args.type, onto=args.onto, base=base)
    print(f"GGUF ({args.type}) written to {out}")
    return 0
