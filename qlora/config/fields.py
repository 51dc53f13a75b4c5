"""The field machinery every configuration class is built from: `_opt` (a dataclass field with its help,
short flag alias and value check) and `Section` (a dataclass that checks its fields' types and values
when built and on `validate()`).

Why per-field documentation lives in `field(metadata=...)` and not in attribute docstrings parsed
with `ast` (litgpt's way): the help text, the short flag alias (`--lora-r`) and the value check of
a field then sit together in one declaration and are plain data at run time. Nothing has to find,
read and parse source files, which would break or silently lose the help in installs that ship
bytecode only or run from a zip, and would couple `--help` to source layout. The cost is one
`_opt(...)` call per field instead of a bare default; `tests/test_config.py` enforces that every
field has non-empty help.

A problem raises `ConfigError` whose message names both spellings a user may have used, the flag and
the config-file key: "--lora-r / lora.r must be a positive integer, got -3".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import MISSING, field
from typing import Any, ClassVar, get_type_hints

from qlora.config.coercion import coerce
from qlora.config.errors import ConfigError


def _opt(
    default: Any = MISSING,
    *,
    doc: str,
    alias: str | None = None,
    check: Callable[[Any], str | None] | None = None,
    factory: Callable[[], Any] | None = None,
    append: bool = False,
) -> Any:
    """A dataclass field carrying its help text, its short CLI alias and its value check.

    `append` (lists only): each occurrence of the flag adds one item, taken verbatim (a prompt may hold
    commas); otherwise a list flag takes several values or a comma-separated one.
    """
    metadata = {"help": doc, "alias": alias, "check": check, "append": append}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class Section:
    """Shared validation: types first (with int -> float widening), then each field's check."""

    SECTION: ClassVar[str] = ""  # the key of this section in its root config ("" for a root)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        hints = hints_of(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if is_section_type(hints[f.name]):
                continue
            key = f"{self.SECTION}.{f.name}" if self.SECTION else f.name
            value = coerce(key, getattr(self, f.name), hints[f.name], where=flag_for(key, f))
            object.__setattr__(self, f.name, value)
            check = f.metadata.get("check")
            problem = check(value) if check is not None and value is not None else None
            if problem:
                raise ConfigError(f"{flag_for(key, f)} {problem}, got {value!r}")
        self._check_together()

    def _check_together(self) -> None:
        """Checks that involve more than one field (overridden where needed)."""


def flag_for(key: str, f: dataclasses.Field | None = None, *, root: type | None = None) -> str:
    """How errors name a field: "--lora-r / lora.r" (alias and key) or "--lora.alpha / lora.alpha".

    `f` is the field itself; without it the field is looked up by `key` in `root` (default TrainConfig).
    """
    if f is None:
        f = field_by_key(key, root)
    alias = f.metadata.get("alias") if f is not None else None
    return f"{alias or '--' + key} / {key}"


def field_by_key(key: str, root: type | None = None) -> dataclasses.Field | None:
    """The dataclass field a dotted key names in `root` (default TrainConfig), or None."""
    if root is None:
        from qlora.config.sections import TrainConfig  # the training tree, the default root

        root = TrainConfig
    cls: Any = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        match = [f for f in dataclasses.fields(cls) if f.name == part]
        if not match:
            return None
        if i < len(parts) - 1:
            cls = hints_of(cls)[part]
    return match[0]


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


_HINTS: dict[type, dict[str, Any]] = {}


def hints_of(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config class (cached: they never change)."""
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def is_section_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Section)
