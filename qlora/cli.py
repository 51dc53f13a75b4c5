"""The `qlora` command: `train`, `generate`, `chat`, `serve`, `data check`, `demo`, `merge`, `quantize`,
`export-gguf`, `eval`.

Each subcommand is a thin shell over a library function; its flags are generated from its typed
configuration (`qlora.config`, `qlora.cli_args`), so `qlora COMMAND --help` documents every option
from that one source. Errors a user can fix (bad config, bad data, a missing model) are printed as one
message and exit with status 2, not as a traceback; a run that cannot go on (`TrainingError`: a checkpoint
that cannot be written, non-finite steps, out of memory) says why in one message and exits with status 1.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Sequence


def _train(argv: Sequence[str]) -> int:
    from qlora.cli_args import parse_train_args

    cfg = parse_train_args(argv)
    from qlora.train.loop import train

    result = train(cfg)
    if result.rank != 0:  # torchrun: rank 0 reports for the job
        return 0
    if result.stopped:
        again = list(argv) if "--resume" in argv else [*argv, "--resume"]
        print(f"stopped by {result.stopped} after step {result.steps} of {cfg.train.max_steps}: checkpoint "
              f"{result.checkpoint}\nto continue: qlora train {shlex.join(again)}")  # fmt: skip
        return 0
    print(f"trained {result.steps} steps: final loss {result.final_loss:.4f}"
          + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""))  # fmt: skip
    print(f"adapter, metrics.jsonl, loss.png and checkpoints/ are in {result.output}")
    return 0


def _generate(argv: Sequence[str]) -> int:
    from qlora.cli_args import parse_config_args
    from qlora.config import GenerateConfig

    cfg = parse_config_args(GenerateConfig, argv, prog="qlora generate")
    from qlora.generate import generate_from_config

    for prompt, out in zip(cfg.prompt, generate_from_config(cfg), strict=True):
        print(f"### {prompt}\n{out}\n")
    return 0


def _data(argv: Sequence[str]) -> int:
    if not argv or argv[0] != "check":
        print("usage: qlora data check FILE --model PATH [options]   (qlora data check --help)", file=sys.stderr)
        return 2
    from qlora.cli_args import parse_config_args
    from qlora.config import DataCheckConfig

    cfg = parse_config_args(DataCheckConfig, argv[1:], prog="qlora data check",
                            usage="%(prog)s FILE --model PATH [--config FILE] [options]")  # fmt: skip
    from qlora.data.check import check

    return check(cfg)


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


def _serve(argv: Sequence[str]) -> int:
    from qlora.serve.command import serve_main

    return serve_main(argv)


def _chat(argv: Sequence[str]) -> int:
    from qlora.serve.chat import chat_main

    return chat_main(argv)


COMMANDS = {"train": _train, "generate": _generate, "data": _data, "demo": _demo, "merge": _export("merge"),
            "quantize": _export("quantize"), "export-gguf": _export("export_gguf"), "eval": _eval, "serve": _serve,
            "chat": _chat}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: qlora {{{','.join(COMMANDS)}}} [options]   (qlora COMMAND --help for each)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from qlora.adapter import AdapterError
    from qlora.checkpoint_io import CheckpointError, GGUFError
    from qlora.config import ConfigError
    from qlora.data.errors import DataError
    from qlora.loading import ModelSourceError
    from qlora.model.config import UnsupportedModelError
    from qlora.train.errors import TrainingError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except (AdapterError, CheckpointError, ConfigError, DataError, GGUFError, ModelSourceError, UnsupportedModelError,
            FileNotFoundError) as e:  # fmt: skip
        print(f"qlora {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:  # the run could not go on (a checkpoint, non-finite steps, memory): no traceback
        print(f"qlora {argv[0]}: stopped: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        from qlora.train.checkpoint import storage_errno

        if storage_errno(e) is None:
            raise
        # a full, read-only or vanished output (metrics, logs, the adapter): what and where, not a traceback
        print(f"qlora {argv[0]}: stopped: cannot write {e.filename or 'the output'}: {e.strerror}. Checkpoints "
              "already saved are intact; free space or fix the output, then run again with --resume.",
              file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
