"""Flags generated from the config dataclasses: coverage in --help, the alias contract, precedence."""

from __future__ import annotations

import argparse

import pytest

from qlora.cli import main as qlora_main
from qlora.cli_args import (
    add_config_arguments,
    build_train_parser,
    config_from_namespace,
    parse_config_args,
    parse_train_args,
)
from qlora.config import (
    AnswerConfig,
    ConfigError,
    DataCheckConfig,
    DatatypesConfig,
    EvalConfig,
    ExportGgufConfig,
    GenerateConfig,
    JudgeConfig,
    MergeConfig,
    QuantizeConfig,
    TrainConfig,
    config_options,
)
from qlora.demo import DemoConfig

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
    "--compute-dtype": ("model.compute_dtype", ["bf16"], "bfloat16"),
    "--parallel": ("parallel.mode", ["fsdp"], "fsdp"),
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


# Every command and the root config its flags come from.
COMMANDS = {
    ("train",): TrainConfig,
    ("generate",): GenerateConfig,
    ("eval",): EvalConfig,
    ("eval", "answer"): AnswerConfig,
    ("eval", "judge"): JudgeConfig,
    ("eval", "datatypes"): DatatypesConfig,
    ("merge",): MergeConfig,
    ("quantize",): QuantizeConfig,
    ("export-gguf",): ExportGgufConfig,
    ("demo",): DemoConfig,
    ("data", "check"): DataCheckConfig,
}


@pytest.mark.parametrize("command", sorted(COMMANDS), ids=" ".join)
def test_every_commands_help_lists_its_typed_fields(command, capsys):
    with pytest.raises(SystemExit) as done:
        qlora_main([*command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    squeezed = "".join(text.split())
    options = list(config_options(COMMANDS[command]))
    assert options
    for opt in options:
        assert f"--{opt.key}" in text, opt.key
        assert "".join(opt.help.split()) in squeezed, f"help text of {opt.key} missing"
        for alias in opt.aliases:
            assert alias in text, alias
    assert "--config FILE" in text
    for metavar in getattr(COMMANDS[command], "POSITIONAL", {}).values():
        assert f"{metavar}  " in text.split("positional arguments:")[1], metavar


def _parse(cls, argv):
    return parse_config_args(cls, argv, prog="test")


def test_readme_spellings_of_generate_and_eval():
    cfg = _parse(GenerateConfig, ["--model", "m", "--adapter", "a", "--prompt", "Hi, you", "--prompt", "Two",
                                  "--max-new-tokens", "8", "--temperature", "0.7", "--top-p", "0.9", "--seed", "3",
                                  "--quant-type", "none", "--no-chat-template", "--device", "cpu",
                                  "--dtype", "bf16"])  # fmt: skip
    assert cfg.prompt == ["Hi, you", "Two"]  # one item per flag, commas kept
    assert (cfg.model.path, cfg.model.adapter, cfg.model.quant_type, cfg.model.compute_dtype, cfg.model.device) == \
        ("m", "a", "none", "bfloat16", "cpu")  # fmt: skip
    assert (cfg.sampling.max_new_tokens, cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.seed) == \
        (8, 0.7, 0.9, 3)  # fmt: skip
    assert cfg.chat_template is False
    assert _parse(GenerateConfig, ["--model", "m", "--prompt", "x", "--dtype", "bfloat16"]).model.compute_dtype == \
        "bfloat16"  # fmt: skip
    assert _parse(GenerateConfig, ["--model", "m", "--prompt", "x"]).model.compute_dtype == "auto"
    cfg = _parse(EvalConfig, ["--model", "m", "--perplexity", "w.raw", "--max-length", "64", "--stride", "32",
                              "--max-tokens", "300", "--mmlu", "mm", "--shots", "0", "--subjects", "a", "b",
                              "--limit", "2", "--letters", "space", "--batch-size", "2", "--dtype", "fp32",
                              "--output", "r.json"])  # fmt: skip
    assert (cfg.perplexity.file, cfg.perplexity.max_length, cfg.perplexity.stride, cfg.perplexity.max_tokens) == \
        ("w.raw", 64, 32, 300)  # fmt: skip
    assert (cfg.mmlu.path, cfg.mmlu.shots, cfg.mmlu.subjects, cfg.mmlu.limit, cfg.mmlu.letters) == \
        ("mm", 0, ["a", "b"], 2, "space")  # fmt: skip
    assert (cfg.batch_size, cfg.model.compute_dtype, cfg.output) == (2, "float32", "r.json")
    cfg = _parse(AnswerConfig, ["--model", "m", "--questions", "q.jsonl", "--output", "a.jsonl", "--template", "raw"])
    assert (cfg.sampling.max_new_tokens, cfg.template) == (256, "raw")
    cfg = _parse(JudgeConfig, ["--answers", "a", "b", "--judge-local", "m", "--dtype", "fp32", "--k", "16"])
    assert (cfg.judge_source().path, cfg.judge_source().compute_dtype, cfg.k) == ("m", "float32", 16.0)
    cfg = _parse(DatatypesConfig, ["--model", "m", "--text", "w.raw", "--max-tokens", "100", "--dtype", "float32"])
    assert (cfg.model, cfg.perplexity.file, cfg.perplexity.max_tokens, cfg.device) == ("m", "w.raw", 100, "cpu")


def test_readme_spellings_of_the_export_commands():
    for spelling, dtype in [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32"), ("float16", "float16")]:
        cfg = _parse(MergeConfig, ["--model", "m", "--adapter", "a", "--output", "o", "--dtype", spelling])
        assert cfg.dtype == dtype
    cfg = _parse(MergeConfig, ["--model", "m", "--adapter", "a", "--output", "o", "--onto", "original", "--text",
                               "t.raw", "--no-report", "--quant-type", "fp4", "--no-double-quant", "--report-tokens",
                               "64", "--report-seq-len", "16", "--max-shard-size", "10"])  # fmt: skip
    assert (cfg.onto, cfg.report.text, cfg.report.enabled, cfg.report.tokens, cfg.report.seq_len) == \
        ("original", "t.raw", False, 64, 16)  # fmt: skip
    assert (cfg.model.quant_type, cfg.model.double_quant, cfg.max_shard_size) == ("fp4", False, 10)
    cfg = _parse(QuantizeConfig, ["--model", "m", "--output", "o", "--quant-type", "fp4", "--double-quant",
                                  "--blocksize", "128", "--dtype", "fp32"])  # fmt: skip
    assert (cfg.model.quant_type, cfg.model.double_quant, cfg.model.blocksize, cfg.dtype) == \
        ("fp4", True, 128, "float32")  # fmt: skip
    for kind in ("f16", "bf16", "q8_0", "f32"):  # GGUF tensor types: bf16 stays "bf16", not a dtype
        assert _parse(ExportGgufConfig, ["--model", "m", "--output", "x.gguf", "--type", kind]).type == kind
    cfg = _parse(DemoConfig, ["--model", "m", "--output", "o", "--steps", "3", "--heldout", "4",
                              "--train-examples", "5", "--seed", "6"])  # fmt: skip
    assert (cfg.model, cfg.steps, cfg.heldout, cfg.train_examples, cfg.seed, cfg.compute_dtype) == \
        ("m", 3, 4, 5, 6, "auto")  # fmt: skip


def test_readme_spellings_of_data_check():
    cfg = _parse(DataCheckConfig, ["data.jsonl", "--model", "m"])  # README: qlora data check data.jsonl --model PATH
    assert (cfg.model, cfg.data.path, cfg.data.format, cfg.data.languages) == ("m", "data.jsonl", "auto", None)
    cfg = _parse(DataCheckConfig, ["--format", "oasst1", "--max-source-len", "8", "--max-target-len", "4",
                                   "--train-on-source", "--lang", "de", "d.jsonl", "--lang", "en,es", "--model", "m",
                                   "--data.block_size", "16"])  # fmt: skip
    assert (cfg.data.path, cfg.data.format, cfg.data.max_source_len, cfg.data.max_target_len) == \
        ("d.jsonl", "oasst1", 8, 4)  # fmt: skip
    assert cfg.data.train_on_source is True and cfg.data.block_size == 16
    assert cfg.data.languages == ["de", "en,es"]  # one language per flag, as the first parser took them
    cfg = _parse(DataCheckConfig, ["--data", "d.jsonl", "--model", "m"])
    assert cfg.data.path == "d.jsonl"


def test_positional_field_given_twice_is_an_error(capsys):
    with pytest.raises(SystemExit) as err:
        _parse(DataCheckConfig, ["a.jsonl", "--data.path", "b.jsonl", "--model", "m"])
    assert err.value.code == 2
    assert "data.path is given twice, as FILE and as --data / --data.path: give it once" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a command without POSITIONAL takes no positional argument
        _parse(GenerateConfig, ["m", "--prompt", "x"])
    assert "unrecognized arguments: m" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("cls", "argv", "message"),
    [
        (ExportGgufConfig, ["--model", "m", "--output", "x", "--type", "fp16"], "invalid choice: 'fp16'"),
        (MergeConfig, ["--model", "m", "--output", "o"], "--adapter / model.adapter is required"),
        (
            MergeConfig,
            ["--model", "m", "--adapter", "a", "--output", "o", "--compute-dtype", "bf16"],
            "unrecognized arguments: --compute-dtype",
        ),
        (QuantizeConfig, ["--model", "m", "--output", "o", "--quant-type", "int4"], "must be nf4 or fp4"),
        (QuantizeConfig, ["--model", "m", "--output", "o", "--adapter", "a"], "unrecognized arguments: --adapter"),
        (EvalConfig, ["--model", "m"], "nothing to evaluate"),
        (JudgeConfig, ["--answers", "a", "b"], "give exactly one judge"),
        (GenerateConfig, ["--model", "m"], "--prompt / prompt is required"),
        (GenerateConfig, ["--model", "m", "--prompt", "x", "--dtype", "bf61"], "invalid choice: 'bf61'"),
    ],
)
def test_command_flag_errors_exit_2_with_a_message(cls, argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        _parse(cls, argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_command_config_files_are_strict(tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text("model:\n  path: m\n  compute_dtype: bf16\nprompt: [Hello]\nsampling:\n  max_new_token: 4\n")
    with pytest.raises(SystemExit):
        _parse(GenerateConfig, ["--config", str(path)])
    assert "g.yaml: unknown key 'sampling.max_new_token'; did you mean 'sampling.max_new_tokens'?" in \
        capsys.readouterr().err  # fmt: skip
    path.write_text("model:\n  path: m\n  compute_dtype: bf16\nprompt: [Hello]\n")
    cfg = _parse(GenerateConfig, ["--config", str(path), "--max-new-tokens", "4"])
    assert (cfg.model.compute_dtype, cfg.prompt, cfg.sampling.max_new_tokens) == ("bfloat16", ["Hello"], 4)
