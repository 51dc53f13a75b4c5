"""Value checks for the configuration fields: each returns None when a value is fine, else what it
must be ("must be a positive integer"); `qlora.config.fields.Section` turns that into an error naming
the flag and the key. Kept apart from the dataclasses so each file holds one concept; imports nothing.
"""

from __future__ import annotations

import math
import re
from typing import Any

# Mirrors qlora.quant.blockwise.SUPPORTED_BLOCKSIZES (a test keeps them equal); repeated here so
# that reading a config never imports torch.
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def positive_int(v: Any) -> str | None:
    return None if v is None or v > 0 else "must be a positive integer"


def non_negative_int(v: Any) -> str | None:
    return None if v is None or v >= 0 else "must be a non-negative integer"


def positive_float(v: Any) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be a finite number > 0"


def non_negative_float(v: Any) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "must be a finite number >= 0"


def unit_interval_open(v: Any) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def unit_interval_closed(v: Any) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def non_empty_str(v: Any) -> str | None:
    return None if v.strip() else "must not be empty"


def blocksize(v: Any) -> str | None:
    return None if v in SUPPORTED_BLOCKSIZES else f"must be one of {', '.join(map(str, SUPPORTED_BLOCKSIZES))}"


def device(v: Any) -> str | None:
    return None if DEVICE_RE.match(v) else "must be auto, cpu, cuda, cuda:<index> or mps"


def module_names(v: Any) -> str | None:
    if not v:
        return "must name at least one module"
    if any(not name.strip() for name in v):
        return "must not contain an empty name"
    if len(set(v)) != len(v):
        return "must not repeat a name"
    return None


def eval_fraction(v: Any) -> str | None:
    if not math.isfinite(v) or v < 0:
        return "must be a fraction in [0, 1) or a whole number of examples >= 1"
    if v >= 1 and v != int(v):
        return "must be a fraction in [0, 1) or a whole number of examples >= 1 (not a mixed number)"
    return None
