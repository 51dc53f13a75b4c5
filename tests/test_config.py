"""The configuration tree: documentation, defaults, validation messages, strict files, round trips."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from qlora.config import (
    OPTIMIZER_NAMES,
    ConfigError,
    DataSection,
    EvalConfig,
    GenerateConfig,
    LoopSection,
    LoraSection,
    MergeConfig,
    ModelSection,
    TrainConfig,
    config_options,
    load_config_file,
    read_config,
)
from qlora.config import files as config_files

REQUIRED = {"model": {"path": "models/tiny"}, "data": {"path": "data/train.jsonl"}, "output": "runs/x"}


def _cfg(**sections) -> TrainConfig:
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in REQUIRED.items()}
    for key, value in sections.items():
        if isinstance(value, dict):
            d.setdefault(key, {}).update(value)
        else:
            d[key] = value
    return TrainConfig.from_dict(d)


def test_every_field_and_section_has_help_text():
    options = list(config_options(sections=True))
    assert len(options) > 40  # the walk really expanded the sections
    undocumented = [o.key for o in options if len(o.help.strip()) < 10]
    assert not undocumented, f"fields without help text: {undocumented}"


def test_defaults_are_the_qlora_papers():
    cfg = _cfg()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.use_rslora) == (64, 16.0, None, False)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (cfg.quant.quant_type, cfg.quant.double_quant, cfg.quant.blocksize) == ("nf4", True, 64)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.max_grad_norm) == (None, 0.0, 0.3)
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps) == (0.9, 0.999, 1e-8)
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.effective_batch_size) == (1, 16, 16)
    assert (cfg.train.lr_schedule, cfg.train.warmup_steps, cfg.train.warmup_ratio) == ("constant", None, 0.03)
    # the paper computes in bf16; ours picks it where the device computes it natively (qlora.precision)
    assert (cfg.model.compute_dtype, cfg.model.gradient_checkpointing) == ("auto", True)
    assert (cfg.data.max_source_len, cfg.data.max_target_len, cfg.data.train_on_source) == (384, 128, False)
    assert (cfg.seed, cfg.device) == (0, "auto")


def test_default_lists_are_not_shared_between_instances():
    a, b = _cfg(), _cfg()
    a.lora.target_modules.append("lm_head")
    assert "lm_head" not in b.lora.target_modules


def test_optimizer_registry():
    assert OPTIMIZER_NAMES == ("adamw", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit")
    for name in OPTIMIZER_NAMES:
        assert _cfg(optim={"name": name}).optim.name == name


def test_blocksizes_match_the_format_floor():
    from qlora.config import SUPPORTED_BLOCKSIZES as checked
    from qlora.quant.blockwise import SUPPORTED_BLOCKSIZES

    assert checked == SUPPORTED_BLOCKSIZES


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora": {"r": -3}}, "--lora-r / lora.r must be a positive integer, got -3"),
        ({"lora": {"dropout": 1.0}}, "--lora.dropout / lora.dropout must be in [0, 1), got 1.0"),
        ({"lora": {"alpha": 0}}, "--lora.alpha / lora.alpha must be a finite number > 0, got 0.0"),
        ({"optim": {"lr": 0.0}}, "--lr / optim.lr must be a finite number > 0, got 0.0"),
        ({"optim": {"lr": math.nan}}, "--lr / optim.lr must be a finite number > 0, got nan"),
        ({"optim": {"beta2": 1.0}}, "--optim.beta2 / optim.beta2 must be in [0, 1)"),
        ({"optim": {"name": "adam"}}, "--optim / optim.name must be one of"),
        ({"optim": {"name": "adam"}}, "(did you mean 'adamw'?)"),
        ({"quant": {"blocksize": 48}}, "--quant.blocksize / quant.blocksize must be one of 32, 64, 128"),
        ({"quant": {"quant_type": "nf5"}}, "--quant-type / quant.quant_type must be one of 'nf4', 'fp4'"),
        ({"device": "gpu"}, "--device / device must be auto, cpu, cuda, cuda:<index> or mps, got 'gpu'"),
        ({"seed": -1}, "--seed / seed must be a non-negative integer, got -1"),
        ({"lora": {"target_modules": []}}, "lora.target_modules must name at least one module"),
        ({"lora": {"target_modules": ["q_proj", "q_proj"]}}, "must not repeat a name"),
        ({"data": {"eval_fraction": 2.5}}, "--data.eval_fraction / data.eval_fraction must be a fraction"),
        ({"train": {"max_steps": 0}}, "--max-steps / train.max_steps must be a positive integer, got 0"),
        ({"train": {"max_steps": 10, "warmup_steps": 20}}, "longer than --max-steps / train.max_steps (10)"),
        ({"train": {"keep_last": 0}}, "--train.keep_last / train.keep_last must be a positive integer"),
        ({"model": {"path": "  "}}, "--model / model.path must not be empty"),
    ],
)
def test_invalid_values_name_the_flag_and_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        _cfg(**overrides)
    assert message in str(err.value)


def test_the_same_values_are_accepted_at_the_edges():
    # Negative control for the test above: the boundaries on the valid side pass.
    cfg = _cfg(
        lora={"r": 1, "dropout": 0.0},
        optim={"max_grad_norm": 0, "weight_decay": 0},
        train={"max_steps": 10, "warmup_steps": 10},
        data={"eval_fraction": 1024},
        device="cuda:1",
    )
    assert (cfg.lora.r, cfg.train.effective_warmup_steps, cfg.device) == (1, 10, "cuda:1")


def test_missing_required_fields_say_how_to_set_them():
    with pytest.raises(ConfigError, match=r"--model / model.path is required: pass the flag or set model.path"):
        TrainConfig.from_dict({"data": {"path": "d"}, "output": "o"})
    with pytest.raises(ConfigError, match=r"--data / data.path is required"):
        TrainConfig.from_dict({"model": {"path": "m"}, "output": "o"})
    with pytest.raises(ConfigError, match=r"--output / output is required"):
        TrainConfig.from_dict({"model": {"path": "m"}, "data": {"path": "d"}})


def test_types_are_checked_and_ints_widen_to_float():
    with pytest.raises(ConfigError, match=r"lora.r must be an integer, got str '64'"):
        _cfg(lora={"r": "64"})
    with pytest.raises(ConfigError, match=r"lora.r must be an integer, got bool True"):
        _cfg(lora={"r": True})
    with pytest.raises(ConfigError, match=r"gradient_checkpointing must be true or false, got int 1"):
        _cfg(model={"gradient_checkpointing": 1})
    with pytest.raises(ConfigError, match=r"target_modules must be a list of strings"):
        _cfg(lora={"target_modules": "q_proj"})
    alpha = _cfg(lora={"alpha": 32}).lora.alpha
    assert alpha == 32.0 and type(alpha) is float


def test_validate_catches_mutation_after_construction():
    cfg = _cfg()
    cfg.lora.r = 0
    with pytest.raises(ConfigError, match="--lora-r / lora.r"):
        cfg.validate()


def test_warmup_resolution_uses_transformers_rounding():
    # ceil(ratio * steps), as transformers' TrainingArguments.get_warmup_steps.
    assert LoopSection(max_steps=1000).effective_warmup_steps == 30
    assert LoopSection(max_steps=1875).effective_warmup_steps == 57
    assert LoopSection(max_steps=10).effective_warmup_steps == 1
    assert LoopSection(max_steps=10, warmup_steps=0).effective_warmup_steps == 0
    assert LoopSection(max_steps=1000, warmup_ratio=0.0).effective_warmup_steps == 0


@pytest.mark.parametrize(
    ("fraction", "n", "expected"),
    [(0.05, 1000, 50), (0.05, 10, 1), (1024, 5000, 1024), (1024, 100, 99), (0.0, 1000, 0), (0.5, 1, 0)],
)
def test_eval_count(fraction, n, expected):
    assert DataSection(path="d", eval_fraction=fraction).eval_count(n) == expected


# ---------------------------------------------------------------------------------------------
# Files


TOML = """
output = "runs/toml"
seed = 7

[model]
path = "models/tiny"
compute_dtype = "float32"

[lora]
r = 8
alpha = 16
target_modules = ["q_proj", "v_proj"]

[data]
path = "data.jsonl"

[optim]
lr = 1e-4

[train]
max_steps = 20
lr_schedule = "cosine"
"""

YAML = """
output: runs/yaml
seed: 7
model:
  path: models/tiny
  compute_dtype: float32
lora:
  r: 8
  alpha: 16
  target_modules: [q_proj, v_proj]
data:
  path: data.jsonl
optim:
  lr: 1e-4   # YAML 1.1 would read this as the string "1e-4"
train:
  max_steps: 20
  lr_schedule: cosine
"""


@pytest.mark.parametrize(("name", "text"), [("c.toml", TOML), ("c.yaml", YAML), ("c.yml", YAML)])
def test_load_toml_and_yaml(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    cfg = read_config(path)
    assert cfg.lora.r == 8 and cfg.lora.alpha == 16.0 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert (cfg.train.max_steps, cfg.train.lr_schedule, cfg.model.compute_dtype) == (20, "cosine", "float32")
    assert cfg.lora.dropout is None  # untouched keys keep their defaults


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lora:\n  rank: 8\n", "unknown key 'lora.rank'; did you mean 'lora.r'?"),
        ("optimizer:\n  lr: 1.0e-4\n", "unknown key 'optimizer'; did you mean 'optim'?"),
        ("lora:\n  lr: 1.0e-4\n", "unknown key 'lora.lr'; did you mean 'optim.lr'?"),
        ("lora.r: 8\n", "unknown key 'lora.r'; nest it in its section"),
        ("train:\n  max_step: 8\n", "unknown key 'train.max_step'; did you mean 'train.max_steps'?"),
        ("lora:\n  r: '8'\n", "lora.r must be an integer, got str '8'"),
        ("lora: 8\n", "lora must be a section (a mapping of keys), got int"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("lora:\n  r: 8\nlora:\n  alpha: 4\n", "duplicated key 'lora'"),
        ("lora: [unclosed\n", "invalid YAML"),
    ],
)
def test_yaml_errors_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config_file(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_toml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[lora]\nrank = 8\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key 'lora.rank'; did you mean 'lora.r'\?"):
        load_config_file(path)
    path.write_text("[lora\n")
    with pytest.raises(ConfigError, match=r"bad.toml: invalid TOML"):
        load_config_file(path)


def test_toml_without_tomllib_says_what_to_do(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text(TOML)
    monkeypatch.setattr(config_files, "tomllib", None)
    with pytest.raises(ConfigError, match=r"needs Python 3.11\+.*use a .yaml config file"):
        load_config_file(path)


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "c.ini").write_text("[lora]\n")
    with pytest.raises(ConfigError, match=r"unsupported config file type '.ini'"):
        load_config_file(tmp_path / "c.ini")
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope.yaml"):
        load_config_file(tmp_path / "nope.yaml")


def _non_default_config() -> TrainConfig:
    return TrainConfig(
        model=ModelSection(path="m", compute_dtype="float16", max_seq_len=512, gradient_checkpointing=False),
        data=DataSection(path="d", eval_fraction=0.1, train_on_source=True),
        lora=LoraSection(r=16, alpha=32.0, target_modules=["q_proj"], use_rslora=True),
        train=LoopSection(max_steps=50, warmup_steps=5, lr_schedule="linear", keep_last=3),
        output="out",
        seed=3,
        device="cpu",
    )


def test_resolved_yaml_round_trips(tmp_path):
    cfg = _non_default_config()
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    again = read_config(path)
    assert again == cfg
    assert again != _cfg()  # equality is not vacuous


def test_dict_and_json_round_trip(tmp_path):
    cfg = _non_default_config()
    d = cfg.to_dict()
    assert TrainConfig.from_dict(d) == cfg
    d["lora"]["target_modules"].append("v_proj")  # to_dict copies: the config is not aliased
    assert cfg.lora.target_modules == ["q_proj"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert read_config(path) == cfg


def test_sections_are_dataclasses_with_kw_only_fields():
    # Keyword-only construction lets required and defaulted fields sit in a readable order.
    with pytest.raises(TypeError):
        ModelSection("models/tiny")  # type: ignore[misc]
    assert all(f.kw_only for f in dataclasses.fields(TrainConfig))


def test_paper_defaults_follow_model_size():
    from qlora.config import resolve_size_defaults

    assert resolve_size_defaults(None, None, 6.7e9) == (2e-4, 0.1)  # LLaMA-7B
    assert resolve_size_defaults(None, None, 13.0e9) == (2e-4, 0.1)
    assert resolve_size_defaults(None, None, 32.5e9) == (1e-4, 0.05)  # LLaMA-33B
    assert resolve_size_defaults(None, None, 65.2e9) == (1e-4, 0.05)
    assert resolve_size_defaults(3e-3, 0.2, 65.2e9) == (3e-3, 0.2)  # the user's values win


def test_one_table_of_default_targets_and_optimizers():
    from qlora.config import DEFAULT_TARGETS
    from qlora.optim import build_optimizer

    assert _cfg().lora.target_modules == list(DEFAULT_TARGETS)
    p = [torch.nn.Parameter(torch.zeros(2))]
    for name in OPTIMIZER_NAMES:  # the factory builds every name of the config's registry
        assert build_optimizer(name, p, lr=1e-3) is not None
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("sgd", p, lr=1e-3)


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("bf16", "bfloat16"),
        ("BF16", "bfloat16"),
        ("fp16", "float16"),
        ("fp32", "float32"),
        ("bfloat16", "bfloat16"),
        ("auto", "auto"),
    ],
)
def test_dtype_aliases_are_accepted_and_stored_canonical(alias, canonical, tmp_path):
    assert _cfg(model={"compute_dtype": alias}).model.compute_dtype == canonical
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  compute_dtype: {alias}\n")
    assert load_config_file(path)["model"]["compute_dtype"] == alias  # checked; the dataclass canonicalises
    if alias != "auto":  # the same table serves merge's output dtype
        merge = MergeConfig.from_dict({"model": {"path": "m", "adapter": "a"}, "output": "o", "dtype": alias})
        assert merge.dtype == canonical


def test_unknown_dtype_and_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="--compute-dtype / model.compute_dtype must be one of .*'bf16' for"):
        _cfg(model={"compute_dtype": "bf61"})
    with pytest.raises(ConfigError, match="unknown key 'model.dtype'"):
        GenerateConfig.from_dict({"model": {"path": "m", "dtype": "bf16"}, "prompt": ["x"]}, source="g.yaml")
    with pytest.raises(ConfigError, match="g.yaml: unknown key 'prompts'; did you mean 'prompt'"):
        GenerateConfig.from_dict({"model": {"path": "m"}, "prompts": ["x"]}, source="g.yaml")
    # a shared-section key a command hides is unknown there (merge's --dtype is the output dtype)
    with pytest.raises(ConfigError, match="unknown key 'model.compute_dtype'"):
        MergeConfig.from_dict({"model": {"path": "m", "adapter": "a", "compute_dtype": "bf16"}, "output": "o"})


def test_every_command_shares_the_model_source_section():
    from qlora.config import ExportGgufConfig, ModelSource, QuantizeConfig

    for cls in (GenerateConfig, EvalConfig, MergeConfig, QuantizeConfig, ExportGgufConfig):
        assert dataclasses.fields(cls)[0].type in ("ModelSource", ModelSource), cls
    cfg = _cfg(quant={"quant_type": "fp4", "double_quant": False}, lora={"init_from": "runs/a"}, device="cpu")
    source = cfg.model_source()
    assert (source.path, source.adapter, source.quant_type, source.double_quant, source.device) == \
        ("models/tiny", "runs/a", "fp4", False, "cpu")  # fmt: skip


def test_run_quantization_reads_the_runs_config(tmp_path):
    from qlora.config.files import run_quantization

    assert run_quantization(tmp_path) == {}
    (tmp_path / "config.yaml").write_text("quant:\n  quant_type: fp4\n  double_quant: false\n  blocksize: 128\n")
    assert run_quantization(tmp_path) == {"quant_type": "fp4", "double_quant": False, "blocksize": 128}
    (tmp_path / "config.yaml").write_text("quant:\n  quant_typ: fp4\n")
    with pytest.raises(ConfigError, match="config.yaml: unknown key 'quant.quant_typ'"):
        run_quantization(tmp_path)
