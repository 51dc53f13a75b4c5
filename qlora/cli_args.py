"""Command-line flags derived from the configuration dataclasses (`qlora.config`), for every command.

Nothing here lists a knob by hand: `add_config_arguments(parser, cls)` walks a root config class
(`TrainConfig`, `GenerateConfig`, `MergeConfig`, ...) and generates, per field, a `--section.field`
flag (`--lora.r`, `--train.lr_schedule`; top-level fields are plain `--output`, `--seed`) whose help
text, choices and type come from the field, plus the field's short aliases (`--lora-r`, `--model`,
and a command's own, `cls.ALIASES`). The aliases are a contract that scripts rely on; `qlora train`'s:

    --model  --data  --output  --config  --max-steps  --seed  --lr  --lora-r  --optim
    --save-every  --eval-every  --resume  --device  --quant-type  --adapter  --compute-dtype

Booleans take `--x` / `--no-x`; optional numbers take `none` to mean None; a list takes several
values or a comma-separated one (`--lora.target_modules q_proj,v_proj`), except a list declared
`append` (`--prompt A --prompt B`: one item per flag, commas kept). Dtype choices also accept their
aliases (`bf16` for `bfloat16`, `qlora.config.names.DTYPE_ALIASES`).

A command may also take a field as a positional argument, declared by its root config as
`POSITIONAL = {"data.path": "FILE"}` (key: metavar): `qlora data check data.jsonl` is
`qlora data check --data data.jsonl`; giving both is an error. Such a command should have no list
flag of several values (`nargs="+"` would swallow a positional written after it).

Precedence is defaults < `--config FILE` < flags. To know which flags the user actually typed, every
flag has `default=argparse.SUPPRESS`: a flag that was not given is absent from the namespace, so it
cannot override the file with a default. The defaults still appear in `--help`, written into the
help text from the dataclass.

`parse_config_args(cls, argv)` is the whole path for a command (`parse_train_args` for `train`);
`add_config_arguments` + `config_from_namespace` are the pieces for a parser with subcommands. Build
such parsers with `allow_abbrev=False`: with ~40 dotted flags, argparse's prefix matching would let
a typo silently select another flag.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, get_origin

from qlora.config import (
    ConfigError,
    Option,
    TrainConfig,
    config_options,
    load_config_file,
    merge_config_dicts,
    unwrap_optional,
)

CONFIG_DEST = "config"
POSITIONAL_PREFIX = "positional:"  # namespace attribute of a positional field: "positional:data.path"


def add_config_arguments(parser: argparse.ArgumentParser, cls: type = TrainConfig) -> None:
    """Add `--config` and one flag per field of `cls` (grouped by section) to `parser`."""
    parser.add_argument(
        "--config",
        dest=CONFIG_DEST,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="Config file (.toml, .yaml/.yml or .json) shaped like the sections below; "
        "flags given on the command line override it.",
    )
    groups: dict[str, Any] = {}
    for opt in config_options(cls, sections=True):
        if opt.is_section:
            doc = (opt.type.__doc__ or "").strip().splitlines()[0] if opt.type.__doc__ else opt.help
            groups[opt.key] = parser.add_argument_group(f"{opt.key} (config section [{opt.key}])", doc)
            continue
        if not opt.section and "" not in groups:
            groups[""] = parser.add_argument_group(getattr(cls, "COMMAND", "") or "run")
        _add_option(groups[opt.section], opt)
    options = {opt.key: opt for opt in config_options(cls)}
    for key, metavar in getattr(cls, "POSITIONAL", {}).items():
        # A positional's dest is its name (argparse takes no dest= for one); the metavar is what --help shows.
        text = f"The same as {options[key].flag}: {options[key].help}".replace("%", "%%")
        parser.add_argument(POSITIONAL_PREFIX + key, nargs="?", default=argparse.SUPPRESS, metavar=metavar, help=text)


def _help_text(opt: Option) -> str:
    if opt.required:
        tail = "Required (here or in the config file)."
    else:
        tail = f"Default: {_show(opt.default)}."
    # argparse %-formats help strings: escape literal percent signs.
    return f"{opt.help} {tail}".replace("%", "%%")


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _add_option(group: Any, opt: Option) -> None:
    names = [f"--{opt.key}"] + [a for a in opt.aliases if a != f"--{opt.key}"]
    kwargs: dict[str, Any] = {"dest": opt.key, "default": argparse.SUPPRESS, "help": _help_text(opt)}
    base, optional = unwrap_optional(opt.type)
    if base is bool:
        group.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
        return
    kwargs["metavar"] = opt.name.upper()
    if opt.choices is not None:
        kwargs["choices"] = list(opt.accepted)
        kwargs["metavar"] = "{" + ",".join(map(str, opt.choices)) + "}"
    elif get_origin(base) is list:
        if opt.append:
            kwargs["action"] = "append"
        else:
            kwargs["nargs"] = "+"
    elif base in (int, float):
        kwargs["type"] = _optional_number(base) if optional else base
    group.add_argument(*names, **kwargs)


def _optional_number(base: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else base(text)

    parse.__name__ = base.__name__  # argparse names the type in "invalid int value: 'x'"
    return parse


def namespace_to_dict(ns: argparse.Namespace, cls: type = TrainConfig) -> dict[str, Any]:
    """The flags the user gave, as a nested config dict (absent flags are absent); ConfigError for a field given
    both as a positional argument and as a flag."""
    given = dict(vars(ns))
    for key, metavar in getattr(cls, "POSITIONAL", {}).items():
        if POSITIONAL_PREFIX + key not in given:
            continue
        if key in given:
            flags = " / ".join(next(o for o in config_options(cls) if o.key == key).aliases + (f"--{key}",))
            raise ConfigError(f"{key} is given twice, as {metavar} and as {flags}: give it once")
        given[key] = given.pop(POSITIONAL_PREFIX + key)
    out: dict[str, Any] = {}
    for opt in config_options(cls):
        if opt.key not in given:
            continue
        value = given[opt.key]
        if get_origin(unwrap_optional(opt.type)[0]) is list and not opt.append:
            value = [part.strip() for item in value for part in item.split(",") if part.strip()]
        if opt.section:
            out.setdefault(opt.section, {})[opt.name] = value
        else:
            out[opt.key] = value
    return out


def config_from_namespace(ns: argparse.Namespace, cls: type = TrainConfig) -> Any:
    """defaults < the --config file (if any) < the flags in `ns`; raises ConfigError."""
    file_dict: dict[str, Any] = {}
    path = getattr(ns, CONFIG_DEST, None)
    if path is not None:
        file_dict = load_config_file(path, cls)
    merged = merge_config_dicts(file_dict, namespace_to_dict(ns, cls))
    source = f"command line and {path}" if path is not None else "command line"
    return cls.from_dict(merged, source=source)


def build_parser(
    cls: type, prog: str, description: str | None = None, *, usage: str | None = None, epilog: str | None = None
) -> argparse.ArgumentParser:
    """An `allow_abbrev=False` parser whose flags are `cls`'s fields (and `--config`)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=usage,
        description=description or (cls.__doc__ or "").strip().splitlines()[0],
        epilog=epilog or "Precedence: built-in defaults < --config FILE < flags on the command line.",
        allow_abbrev=False,
    )
    add_config_arguments(parser, cls)
    return parser


def parse_with(parser: argparse.ArgumentParser, argv: Sequence[str] | None, cls: type) -> Any:
    """Parse `argv` with `parser` into a validated `cls`; a bad value exits with status 2 and says why."""
    ns = parser.parse_args(argv)
    try:
        return config_from_namespace(ns, cls)
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def parse_config_args(
    cls: type,
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str | None = None,
    usage: str | None = None,
    epilog: str | None = None,
) -> Any:
    """The whole path of a command: flags (and `--config FILE`) -> a validated `cls`; exit 2 on a bad value."""
    return parse_with(build_parser(cls, prog, description, usage=usage, epilog=epilog), argv, cls)


def build_train_parser(prog: str = "qlora train") -> argparse.ArgumentParser:
    return build_parser(
        TrainConfig,
        prog,
        "QLoRA finetuning: a 4-bit frozen base model with trainable LoRA adapters.",
        usage="%(prog)s --model PATH --data PATH --output DIR [--config FILE] [options]",
    )


def parse_train_args(argv: Sequence[str] | None = None, *, prog: str = "qlora train") -> TrainConfig:
    """Parse `argv` into a validated TrainConfig; a bad value exits with status 2 and says why."""
    return parse_with(build_train_parser(prog), argv, TrainConfig)
