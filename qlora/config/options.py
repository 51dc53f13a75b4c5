"""`Option`: one configurable field of a root config as the command line, the file loader and the error
messages see it (its dotted key, type, default, help, flags); `config_options(cls)` lists them all.

A root config class (`qlora.config.root.Config`) may adjust how a shared section appears in its
command: `ALIASES` adds command-specific flags (`qlora generate` keeps `--dtype` for
`model.compute_dtype`, where `qlora merge`'s `--dtype` is the output dtype), and `HIDDEN` drops keys
the command has no use for (they keep their default and are unknown keys in that command's files).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import MISSING, dataclass
from typing import Any, Literal, get_args, get_origin

from qlora.config.coercion import literal_aliases, unwrap_optional
from qlora.config.fields import default_of, hints_of, is_section_type


@dataclass(frozen=True)
class Option:
    """One configurable field: `key` is the dotted config key ("lora.r"), `aliases` its short flags."""

    key: str
    section: str  # "" for top-level fields
    name: str
    type: Any
    default: Any  # dataclasses.MISSING when required
    help: str
    aliases: tuple[str, ...] = ()
    is_section: bool = False
    append: bool = False  # a list flag given once per item, verbatim

    @property
    def alias(self) -> str | None:
        return self.aliases[0] if self.aliases else None

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def flag(self) -> str:
        return self.alias or f"--{self.key}"

    @property
    def choices(self) -> tuple[Any, ...] | None:
        base, _ = unwrap_optional(self.type)
        return get_args(base) if get_origin(base) is Literal else None

    @property
    def accepted(self) -> tuple[Any, ...] | None:
        """The choices plus the dtype aliases that name one of them ("bf16" where "bfloat16" is a choice)."""
        choices = self.choices
        return None if choices is None else choices + literal_aliases(choices)


def _leaf(key: str, section: str, f: dataclasses.Field, tp: Any, extra: dict[str, str]) -> Option:
    aliases = tuple(a for a in (f.metadata.get("alias"), extra.get(key)) if a)
    return Option(key, section, f.name, tp, default_of(f), f.metadata.get("help", ""), aliases,
                  append=bool(f.metadata.get("append")))  # fmt: skip


def config_options(cls: type | None = None, *, sections: bool = False) -> Iterator[Option]:
    """Every leaf field of the root config `cls` (default TrainConfig) in declaration order, sections expanded.

    With `sections=True` the section fields themselves are also yielded (before their leaves). Keys in
    `cls.HIDDEN` are left out; `cls.ALIASES` adds flags.
    """
    if cls is None:
        from qlora.config.sections import TrainConfig  # the training tree, the default root

        cls = TrainConfig
    hidden: frozenset[str] = getattr(cls, "HIDDEN", frozenset())
    extra: dict[str, str] = getattr(cls, "ALIASES", {})
    hints = hints_of(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name in hidden:
            continue
        if is_section_type(tp):
            if sections:
                yield Option(f.name, "", f.name, tp, default_of(f), f.metadata.get("help", ""), (), True)
            sub_hints = hints_of(tp)
            for sf in dataclasses.fields(tp):
                key = f"{f.name}.{sf.name}"
                if key not in hidden:
                    yield _leaf(key, f.name, sf, sub_hints[sf.name], extra)
        else:
            yield _leaf(f.name, "", f, tp, extra)


__all__ = ["MISSING", "Option", "config_options"]
