"""Reading configuration files: TOML, YAML (strict: YAML 1.2 floats, no duplicated keys) or JSON, into a
checked nested dict that a root config's `from_dict` (`TrainConfig`, `GenerateConfig`, ...) turns into a
config; and merging a file's dict with the command line's. The file formats' concept, kept apart from
the typed fields.

YAML is read with YAML 1.2 float syntax, so `lr: 2e-4` is a float (YAML 1.1, PyYAML's default, makes
it a string); a duplicated YAML key is an error (PyYAML would silently keep the last).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from qlora.config.errors import ConfigError
from qlora.config.root import check_tree
from qlora.config.sections import QuantSection, TrainConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: no stdlib TOML reader, and we add no dependency for it.
    tomllib = None


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (`2e-4` is a float) and an error on duplicated keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicated key {key!r} (first at line {seen[key].line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_StrictYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
            |\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_config_file(path: str | Path, cls: type = TrainConfig) -> dict[str, Any]:
    """Read a .toml, .yaml/.yml or .json config file into a nested dict checked against the root config
    `cls` (possibly partial: the command line may add the rest)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    if suffix == ".toml":
        if tomllib is None:
            raise ConfigError(
                f"{path}: reading TOML needs Python 3.11+ (stdlib tomllib); use a .yaml config file instead"
            )
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from e
    elif suffix in (".yaml", ".yml"):
        try:
            data = yaml.load(text, Loader=_StrictYamlLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        data = {} if data is None else data
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON: {e}") from e
    else:
        raise ConfigError(f"{path}: unsupported config file type {suffix!r}; use .toml, .yaml, .yml or .json")
    check_tree(data, source=str(path), cls=cls)
    return data


def merge_config_dicts(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` wins key by key, one level into sections (the tree is two levels deep)."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def read_config(path: str | Path, cls: type = TrainConfig):
    """A whole root config (default `TrainConfig`) from a config file (every required key in it)."""
    return cls.from_dict(load_config_file(path, cls), source=str(path))


# The resolved configuration a training run writes beside its adapter (`TrainConfig.to_yaml`).
RUN_CONFIG = "config.yaml"


def run_quantization(directory: str | Path) -> dict[str, Any]:
    """How the training run in `directory` stored its frozen base: {"quant_type", "double_quant", "blocksize"}
    from its resolved config.yaml, checked; {} when there is no such file (a PEFT adapter, say)."""
    path = Path(directory) / RUN_CONFIG
    if not path.is_file():
        return {}
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictYamlLoader) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the training run's configuration: {e}") from e
    quant = data.get("quant") if isinstance(data, Mapping) else None
    if not isinstance(quant, Mapping):
        return {}
    check_tree({"quant": dict(quant)}, source=str(path))
    return dataclasses.asdict(QuantSection(**quant))
