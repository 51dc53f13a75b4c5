"""Checking a value against a config field's annotation: `int | None`, `Literal[...]`, `list[str]`, the
scalars. Ints widen to float; a dtype alias ("bf16") becomes its canonical name ("bfloat16") where the
field's choices hold that name; anything else of the wrong type is a `ConfigError` naming where
(the flag and key, or the file and key) the value came from, the expected type and what was found.
"""

from __future__ import annotations

import difflib
import types
from typing import Any, Literal, Union, get_args, get_origin

from qlora.config.errors import ConfigError
from qlora.config.names import DTYPE_ALIASES, canonical_dtype_name


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True); `int` -> (int, False)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def literal_aliases(choices: tuple[Any, ...]) -> tuple[str, ...]:
    """The dtype aliases that name one of `choices` (("bfloat16", "float32") -> ("bf16", "fp32", "float"))."""
    return tuple(alias for alias, name in DTYPE_ALIASES.items() if name in choices and alias not in choices)


def describe_type(tp: Any) -> str:
    base, optional = unwrap_optional(tp)
    if get_origin(base) is Literal:
        choices = get_args(base)
        text = "one of " + ", ".join(repr(c) for c in choices)
        aliases = literal_aliases(choices)
        if aliases:
            text += " (or " + ", ".join(f"{a!r} for {DTYPE_ALIASES[a]!r}" for a in aliases) + ")"
    elif get_origin(base) is list:
        text = "a list of strings"
    else:
        text = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base, str(base))
    return text + (" or null" if optional else "")


def coerce(key: str, value: Any, tp: Any, *, where: str) -> Any:
    """Check `value` against the annotation `tp`; widen int -> float, resolve dtype aliases.

    Raise ConfigError naming `where`; `key` only names the field in the error for an annotation this
    function does not know (a bug in the config classes, not the user's).
    """
    base, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} must be {describe_type(tp)}, got null/None")
    wrong = ConfigError(f"{where} must be {describe_type(tp)}, got {type(value).__name__} {value!r}")
    if get_origin(base) is Literal:
        choices = get_args(base)
        if value not in choices and canonical_dtype_name(value) in choices:
            return canonical_dtype_name(value)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where} must be {describe_type(tp)}, got {value!r}{hint}")
        return value
    if get_origin(base) is list:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise wrong
        return list(value)
    if base is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise wrong
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")
