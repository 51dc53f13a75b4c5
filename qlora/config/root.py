"""`Config`: the root of one command's configuration (sections plus top-level fields), built strictly
from a nested dict, and `check_tree`, the strict structural check of such a dict.

Strict means: an unknown section or key is an error that names the source (a file, or "command
line") and the dotted key and suggests the nearest valid one; a missing required field names its
flag and key; a value of the wrong type names the key, the expected type and what was found.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import MISSING
from typing import Any, ClassVar

import yaml

from qlora.config.coercion import coerce
from qlora.config.errors import ConfigError
from qlora.config.fields import Section, default_of, flag_for, hints_of, is_section_type
from qlora.config.options import Option, config_options


class Config(Section):
    """A command's whole configuration: its sections are validated with it; `from_dict` is strict."""

    SECTION: ClassVar[str] = ""
    COMMAND: ClassVar[str] = ""  # "train", "generate", ...: names the command in the resolved YAML's header
    ALIASES: ClassVar[dict[str, str]] = {}  # extra flags of this command: dotted key -> "--flag"
    HIDDEN: ClassVar[frozenset[str]] = frozenset()  # dotted keys of shared sections this command does not have

    def validate(self) -> None:
        hints = hints_of(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            tp, value = hints[f.name], getattr(self, f.name)
            if is_section_type(tp):
                if not isinstance(value, tp):
                    raise ConfigError(
                        f"{type(self).__name__}.{f.name} must be a {tp.__name__}, got {type(value).__name__}"
                    )
                value.validate()
        super().validate()  # ends with _check_together

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "configuration"):
        """Build from a nested dict (a loaded config file, possibly partial, merged with flags).

        Unknown keys are errors naming `source`. Types and values are checked by the dataclasses,
        whose errors name the flag and the key, as do those for a missing required field. (A file's
        types were already checked, naming the file, by `qlora.config.files.load_config_file`.)
        """
        check_tree(d, source=source, cls=cls, check_types=False)
        kwargs: dict[str, Any] = {}
        for opt in config_options(cls, sections=True):
            if opt.section:
                continue
            if opt.is_section:
                sub = dict(d.get(opt.key, {}))
                _require_present(opt.type, sub, prefix=opt.key, root=cls)
                kwargs[opt.key] = opt.type(**sub)
            elif opt.key in d:
                kwargs[opt.key] = d[opt.key]
        _require_present(cls, kwargs, prefix="", root=cls)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (lists copied); `from_dict(to_dict())` gives an equal config."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        header = f"# Resolved qlora {self.COMMAND} configuration; reload it with --config <this file>.\n"
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


def _require_present(cls: type, given: Mapping[str, Any], *, prefix: str, root: type) -> None:
    for f in dataclasses.fields(cls):
        if default_of(f) is MISSING and f.name not in given and not is_section_type(hints_of(cls)[f.name]):
            key = f"{prefix}.{f.name}" if prefix else f.name
            flag = _flag(key, root)
            raise ConfigError(f"{flag} is required: pass the flag or set {key} in the --config file")


def _flag(key: str, root: type) -> str:
    opt = next((o for o in config_options(root) if o.key == key), None)
    return f"{opt.flag} / {key}" if opt is not None else flag_for(key, root=root)


def check_tree(d: Any, *, source: str, cls: type | None = None, check_types: bool = True) -> None:
    """Strict structural check of a (partial) nested config dict for the root config `cls` (default TrainConfig).

    Errors name `source` (a file name) and the dotted key, and suggest the nearest valid key.
    With `check_types=False` only the structure is checked (the dataclasses check the values).
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections and keys, got {type(d).__name__}")
    options = {o.key: o for o in config_options(cls, sections=True)}
    for key, value in d.items():
        opt = options.get(key) if isinstance(key, str) else None
        if opt is not None and opt.section:  # a dotted leaf key such as "lora.r" at the top level
            opt = None
        if opt is None:
            raise ConfigError(f"{source}: unknown key {key!r}{_suggest(str(key), options)}")
        if opt.is_section:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {key} must be a section (a mapping of keys), got {type(value).__name__}")
            for sub_key, sub_value in value.items():
                dotted = f"{key}.{sub_key}"
                sub = options.get(dotted)
                if sub is None:
                    raise ConfigError(f"{source}: unknown key {dotted!r}{_suggest(dotted, options)}")
                if check_types:
                    coerce(dotted, sub_value, sub.type, where=f"{source}: {dotted}")
        elif check_types:
            coerce(key, value, opt.type, where=f"{source}: {key}")


def _suggest(key: str, options: Mapping[str, Option]) -> str:
    leaves = [k for k, o in options.items() if not o.is_section]
    if key in leaves:  # e.g. a YAML top-level "lora.r: 8"
        section, name = key.split(".", 1)
        return f"; nest it in its section ({section}: {{{name}: ...}} in YAML, [{section}] in TOML)"
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in leaves if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return f"; did you mean {same_leaf[0]!r}?"
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return "; valid keys: " + ", ".join(leaves)
