"""The export commands: `qlora merge`, `qlora quantize`, `qlora export-gguf` (argument parsing only).

Each parses its flags, derived from its typed configuration (`qlora.config.MergeConfig`,
`QuantizeConfig`, `ExportGgufConfig`, whose `model` is the shared `ModelSource`), and calls one
library function; `qlora.cli` dispatches to them and turns the errors a user can fix into one
message with exit status 2. `--dtype` here is the dtype of the written weights (bf16/fp16/fp32 or
their long names); `export-gguf --type` is a GGUF tensor type (f16, bf16, q8_0, f32).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from qlora.cli_args import parse_config_args
from qlora.config import ExportGgufConfig, MergeConfig, ModelSource, QuantizeConfig

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


def merge_main(argv: Sequence[str]) -> int:
    cfg = parse_config_args(MergeConfig, argv, prog="qlora merge")
    return _as_command("merge", lambda: _merge(cfg))


def _trained_base(model: ModelSource):
    """How training stored the base: the adapter's config.yaml, with the flags the user gave winning."""
    from qlora.export.merge import read_trained_base

    return read_trained_base(model.adapter, quant_type=None if model.quant_type == "auto" else model.quant_type,
                             double_quant=model.double_quant, blocksize=model.blocksize)  # fmt: skip


def _merge(cfg: MergeConfig) -> int:
    from qlora.export.merge import merge
    from qlora.export.report import REPORT_FILE, format_report, merge_report
    from qlora.precision import torch_dtype

    base = _trained_base(cfg.model)
    out = merge(cfg.model.path, cfg.model.adapter, cfg.output, dtype=torch_dtype(cfg.dtype), onto=cfg.onto, base=base,
                max_shard_bytes=cfg.max_shard_size * 1024**2)  # fmt: skip
    print(f"merged model written to {out}")
    report = cfg.report
    text = report.text or (SHARED_TEXT if SHARED_TEXT.is_file() else None)
    if not report.enabled:
        return 0
    if text is None:
        print("no merge report: pass --text FILE (held-out text) to measure the merge")
        return 0
    result = merge_report(cfg.model.path, cfg.model.adapter, out, text, base=base, onto=cfg.onto, dtype_name=cfg.dtype,
                          max_tokens=report.tokens, seq_len=report.seq_len)  # fmt: skip
    print(format_report(result))
    print(f"report saved to {out / REPORT_FILE}")
    return 0


def quantize_main(argv: Sequence[str]) -> int:
    cfg = parse_config_args(QuantizeConfig, argv, prog="qlora quantize")
    return _as_command("quantize", lambda: _quantize(cfg))


def _quantize(cfg: QuantizeConfig) -> int:
    from qlora.export.bnb_checkpoint import quantize_checkpoint
    from qlora.precision import torch_dtype

    m = cfg.model
    quant_type = "nf4" if m.quant_type == "auto" else m.quant_type
    double_quant = True if m.double_quant is None else m.double_quant
    out = quantize_checkpoint(m.path, cfg.output, quant_type=quant_type, double_quant=double_quant,
                              blocksize=m.blocksize or 64, dtype=torch_dtype(cfg.dtype),
                              max_shard_bytes=cfg.max_shard_size * 1024**2)  # fmt: skip
    print(f"bitsandbytes 4-bit checkpoint ({quant_type}, double quant {double_quant}) written to {out}")
    return 0


def export_gguf_main(argv: Sequence[str]) -> int:
    cfg = parse_config_args(ExportGgufConfig, argv, prog="qlora export-gguf")
    return _as_command("export-gguf", lambda: _export_gguf(cfg))


def _export_gguf(cfg: ExportGgufConfig) -> int:
    from qlora.export.gguf_export import export_gguf
    from qlora.export.merge import TrainedBase

    base = _trained_base(cfg.model) if cfg.model.adapter else TrainedBase()
    out = export_gguf(cfg.model.path, cfg.model.adapter, cfg.output, kind=cfg.type, onto=cfg.onto, base=base)
    print(f"GGUF ({cfg.type}) written to {out}")
    return 0
