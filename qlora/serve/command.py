"""`qlora serve`: load the base model once, put its adapters on it, and serve them all over HTTP.

    qlora serve --model PATH [--adapter NAME=DIR ...] [--host 127.0.0.1] [--port 8000] [--slots 8] [--max-len 4096]

The base is loaded without an adapter and the engine holds every adapter on it (`Engine(adapters=...)`), so
one copy of the 4-bit weights answers for all of them; a request picks one with its `model` field. With
`--quant-type auto` the base is quantized as the first adapter's training run stored it (its config.yaml),
as `qlora generate --adapter` does; adapters from runs that stored their base differently need their own
server (their deltas were trained against other weights).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from qlora.config.commands import ServeConfig
from qlora.config.files import run_quantization
from qlora.generation import Engine
from qlora.loading import load

log = logging.getLogger("qlora.serve")


def default_model_name(path: str) -> str:
    """A local checkpoint is named by its last part (a .gguf file without the suffix); a hub id as given."""
    local = Path(path).expanduser()
    if local.exists():
        return local.stem if local.suffix.lower() == ".gguf" else local.resolve().name
    return path


def base_source(cfg: ServeConfig) -> dict:
    """`qlora.loading.load`'s arguments for the base: the adapters' training-run quantization where "auto"."""
    source = dataclasses.asdict(cfg.model)
    adapters = cfg.adapter_dirs()
    if adapters and source["quant_type"] == "auto":
        run = run_quantization(next(iter(adapters.values())))
        source["quant_type"] = run.get("quant_type", "nf4")
        for key in ("double_quant", "blocksize"):
            if source[key] is None and key in run:
                source[key] = run[key]
    return source


def build_engine(cfg: ServeConfig) -> Engine:
    loaded = load(**base_source(cfg))
    adapters = cfg.adapter_dirs()
    extra = {"adapters": adapters} if adapters else {}
    return Engine(loaded.model, loaded.tokenizer, slots=cfg.slots, max_len=cfg.max_len, cuda_graphs=cfg.cuda_graphs,
                  **extra)  # fmt: skip


def serve_main(argv: Sequence[str]) -> int:
    from qlora.cli_args import parse_config_args

    cfg = parse_config_args(ServeConfig, argv, prog="qlora serve",
                            usage="%(prog)s --model PATH [--adapter NAME=DIR ...] [--host HOST] [--port PORT] "
                            "[options]")  # fmt: skip
    try:
        import uvicorn

        from qlora.serve.app import build_app
    except ModuleNotFoundError as e:
        print(f"qlora serve: error: {e.name} is not installed: pip install 'qlora[serve]'", file=sys.stderr)
        return 2
    engine = build_engine(cfg)
    name = cfg.served_model_name or default_model_name(cfg.model.path)
    app = build_app(engine, name)
    served = ", ".join([name, *app.state.server.adapters])
    log.info("serving %s (%d slots x %d positions) at http://%s:%d/v1", served, cfg.slots, cfg.max_len, cfg.host,
             cfg.port)  # fmt: skip
    engine.start()
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        engine.close()
    return 0
