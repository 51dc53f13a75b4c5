"""Flags generated from the config dataclasses: coverage in --help, the alias contract, precedence."""

from __future__ import annotations

import argparse

import pytest

from qlora.cli_args import add_config_arguments, build_train_parser, config_from_namespace, parse_train_args
from qlora.config import ConfigError, config_options

BASE = ["--model", "models/tiny", "--data", "data.jsonl", "--output", "runs/x"]

# The short flags that scripts rely on: a contract. Adding or dropping one must be deliberate.
CONTRACT = {
    "--model": ("model.path", ["models/other"], "models/other"),
    "--data": ("data.path", ["d2.jsonl"], "d2.jsonl"),
    "--output": ("output", ["runs/y"], "runs/y"),
    "--max-steps": ("train.max_steps", ["7"], 7),
    "--seed": ("seed", ["11"], 11),
    "--lr": ("optim.lr", ["1e-5"], 1e-5),
    "--lora-r": ("lora.r", ["4"], 4),
    "--optim": ("optim.name", ["paged_adamw_8bit"], "paged_adamw_8bit"),
    "--save-every": ("train.save_every", ["5"], 5),
    "--eval-every": ("train.eval_every", ["3"], 3),
    "--resume": ("train.resume", [], True),
    "--device": ("device", ["cpu"], "cpu"),
    "--adapter": ("lora.init_from", ["runs/previous"], "runs/previous"),
    "--quant-type": ("quant.quant_type", ["fp4"], "fp4"),
}


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_every_field_appears_in_help_with_its_text():
    text = build_train_parser().format_help()
    # argparse wraps lines (also after hyphens): compare with all whitespace removed.
    squeezed = "".join(text.split())
    for opt in config_options():
        assert f"--{opt.key}" in text, opt.key
        assert "".join(opt.help.split()) in squeezed, f"help text of {opt.key} missing"
        if opt.alias:
            assert opt.alias in text
    assert "--config FILE" in text
    assert "Default:64." in squeezed and "Default:on." in squeezed  # shown although argparse's defaults are SUPPRESS


def test_alias_contract():
    aliases = {o.alias: o.key for o in config_options() if o.alias}
    top_level = {f"--{o.key}": o.key for o in config_options() if not o.section}
    for flag, (key, _, _) in CONTRACT.items():
        assert aliases.get(flag, top_level.get(flag)) == key, flag
    assert set(aliases) <= set(CONTRACT), f"aliases outside the contract: {set(aliases) - set(CONTRACT)}"


@pytest.mark.parametrize("flag", sorted(CONTRACT))
def test_each_alias_sets_its_field(flag):
    key, values, expected = CONTRACT[flag]
    default = _get(parse_train_args(BASE), key)
    assert default != expected  # otherwise the test below proves nothing
    cfg = parse_train_args(BASE + [flag, *values])
    assert _get(cfg, key) == expected
    if flag != "--resume":  # the long form reaches the same field
        assert _get(parse_train_args(BASE + [f"--{key}", *values]), key) == expected


def test_precedence_defaults_then_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {path: models/file, gradient_checkpointing: false}\n"
        "lora: {r: 8, alpha: 32}\n"
        "optim: {lr: 1.0e-3}\n"
        "seed: 5\n"
    )
    cfg = parse_train_args(["--config", str(path), "--lora-r", "4", "--data", "d", "--output", "o"])
    assert cfg.lora.r == 4  # flag beats file
    assert (cfg.lora.alpha, cfg.optim.lr, cfg.seed) == (32.0, 1e-3, 5)  # file beats default
    assert cfg.model.path == "models/file"
    assert cfg.model.gradient_checkpointing is False  # an absent flag does not reset the file's value
    assert cfg.lora.dropout is None  # default where neither says anything
    cfg = parse_train_args(["--config", str(path), "--data", "d", "--output", "o", "--model.gradient_checkpointing"])
    assert cfg.model.gradient_checkpointing is True


def test_booleans_lists_and_optional_numbers():
    cfg = parse_train_args(
        BASE
        + ["--no-model.gradient_checkpointing", "--no-quant.double_quant", "--lora.use_rslora"]
        + ["--lora.target_modules", "q_proj,v_proj", "o_proj"]
        + ["--train.warmup_steps", "5", "--model.max_seq_len", "256"]
    )
    assert cfg.model.gradient_checkpointing is False and cfg.quant.double_quant is False
    assert cfg.lora.use_rslora is True
    assert cfg.lora.target_modules == ["q_proj", "v_proj", "o_proj"]
    assert (cfg.train.warmup_steps, cfg.model.max_seq_len) == (5, 256)
    cfg = parse_train_args(BASE + ["--train.warmup_steps", "none", "--resume", "--no-resume"])
    assert cfg.train.warmup_steps is None and cfg.train.resume is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (BASE + ["--lora-r", "-3"], "--lora-r / lora.r must be a positive integer, got -3"),
        (["--data", "d", "--output", "o"], "--model / model.path is required"),
        (BASE + ["--quant-type", "nf5"], "invalid choice: 'nf5'"),
        (BASE + ["--lora-r", "abc"], "invalid int value: 'abc'"),
        (BASE + ["--train.warmup_steps", "x"], "invalid int value: 'x'"),
        (BASE + ["--lora.dr", "0.2"], "unrecognized arguments: --lora.dr"),  # no prefix matching
        (BASE + ["--max-steps", "5", "--train.warmup_steps", "9"], "longer than --max-steps"),
    ],
)
def test_bad_flags_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        parse_train_args(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_config_file_is_reported_through_the_parser(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text("[lora]\nrank = 8\n")
    with pytest.raises(SystemExit):
        parse_train_args(BASE + ["--config", str(path)])
    err = capsys.readouterr().err
    assert "c.toml: unknown key 'lora.rank'; did you mean 'lora.r'?" in err


def test_works_inside_a_subcommand_parser():
    top = argparse.ArgumentParser(prog="qlora", allow_abbrev=False)
    sub = top.add_subparsers(dest="command", required=True)
    add_config_arguments(sub.add_parser("train", allow_abbrev=False))
    sub.add_parser("export").add_argument("--adapter")
    ns = top.parse_args(["train", *BASE, "--lora-r", "8"])
    assert ns.command == "train"
    assert config_from_namespace(ns).lora.r == 8
    with pytest.raises(ConfigError, match="--model / model.path is required"):
        config_from_namespace(top.parse_args(["train", "--data", "d", "--output", "o"]))
