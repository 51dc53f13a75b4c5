"""The `qlora` command: `train`, `generate`, `data check`, `demo`, `merge`, `quantize`, `export-gguf`, `eval`.

Each subcommand is a thin shell over a library function; `train`'s flags are generated from the
typed configuration (`qlora.config`, `qlora.cli_args`), so `qlora train --help` documents every
option from that one source. Errors a user can fix (bad config, bad data, a missing model) are
printed as one message and exit with status 2, not as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _train(argv: Sequence[str]) -> int:
    from qlora.cli_args import parse_train_args

    cfg = parse_train_args(argv)
    from qlora.train.loop import train

    result = train(cfg)
    print(f"trained {result.steps} steps: final loss {result.final_loss:.4f}"
          + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""))  # fmt: skip
    print(f"adapter, metrics.jsonl, loss.png and checkpoints/ are in {result.output}")
    return 0


def _generate(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="qlora generate", description="Generate text from a base model (+ adapter).")
    p.add_argument("--model", required=True, help="Model directory, .gguf file or hub id.")
    p.add_argument("--adapter", help="A LoRA adapter directory (ours or PEFT's).")
    p.add_argument("--prompt", required=True, action="append", help="Prompt text (repeat for a batch).")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default).")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "int4", "none"])
    p.add_argument("--no-chat-template", action="store_true", help="Feed the prompt as raw text.")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)

    import torch

    from qlora.adapter import load_adapter_weights, read_adapter_config
    from qlora.generate import generate, render_prompt
    from qlora.loading import load_model
    from qlora.tokenizer import Tokenizer
    from qlora.train.loop import resolve_device

    lora = read_adapter_config(args.adapter) if args.adapter else None
    quant = None if args.quant_type == "none" else args.quant_type
    model = load_model(args.model, quant, True, getattr(torch, args.dtype), resolve_device(args.device), lora=lora)
    if args.adapter:
        load_adapter_weights(model, args.adapter)
    tokenizer = Tokenizer.from_pretrained(args.model)
    prompts = [render_prompt(tokenizer, text, use_chat_template=not args.no_chat_template and None) for text in
               args.prompt]  # fmt: skip
    outputs = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, seed=args.seed)  # fmt: skip
    for prompt, out in zip(args.prompt, outputs, strict=True):
        print(f"### {prompt}\n{out}\n")
    return 0


def _data(argv: Sequence[str]) -> int:
    if not argv or argv[0] != "check":
        print("usage: qlora data check FILE --model PATH [options]   (qlora data check --help)", file=sys.stderr)
        return 2
    from qlora.data.check import main as check_main

    return check_main(list(argv[1:]))


def _demo(argv: Sequence[str]) -> int:
    from qlora.demo import main as demo_main

    return demo_main(argv)


def _export(name: str):
    def run(argv: Sequence[str]) -> int:
        from qlora.export import commands

        return getattr(commands, f"{name}_main")(argv)

    return run


def _eval(argv: Sequence[str]) -> int:
    from qlora.eval.cli import main as eval_main

    return eval_main(argv)


COMMANDS = {"train": _train, "generate": _generate, "data": _data, "demo": _demo, "merge": _export("merge"),
            "quantize": _export("quantize"), "export-gguf": _export("export_gguf"), "eval": _eval}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: qlora {{{','.join(COMMANDS)}}} [options]   (qlora COMMAND --help for each)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from qlora.adapter import AdapterError
    from qlora.config import ConfigError
    from qlora.data.errors import DataError
    from qlora.loading import ModelSourceError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except (AdapterError, ConfigError, DataError, ModelSourceError, FileNotFoundError) as e:
        print(f"qlora {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
