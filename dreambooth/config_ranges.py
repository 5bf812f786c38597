"""Allowed ranges of the numeric config fields, and the checks that enforce them.

A field's range sits in its metadata next to its help text, so `describe_config`, the CLI and
the web app all show and enforce the same bounds. NaN and infinities are refused everywhere.
"""
from __future__ import annotations

import math
from dataclasses import fields

from dreambooth.errors import Problem

SEED_MAX = 2**32 - 1  # numpy and most samplers take 32-bit seeds
MANY = 1_000_000  # the cap on step counts and intervals: far past any DreamBooth run


def field_range(f) -> tuple | None:
    """(lo, hi, lo_excluded, multiple) of a dataclass field, or None for a field without bounds."""
    return f.metadata.get("range")


def range_text(bounds: tuple) -> str:
    lo, hi, above, multiple = bounds
    text = f"{'(' if above else '['}{_num(lo)}, {_num(hi)}]"
    return text + (f", a multiple of {multiple}" if multiple else "")


def value_problems(where: str, value, bounds: tuple | None) -> list[Problem]:
    """Problems of one value against its field's range; NaN and infinities are never allowed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return []
    if isinstance(value, float) and not math.isfinite(value):
        return [Problem(where, f"{value}: must be a finite number")]
    if bounds is None:
        return []
    lo, hi, above, multiple = bounds
    if (value <= lo if above else value < lo) or value > hi or (multiple and value % multiple):
        return [Problem(where, f"{_num(value)}: must be in {range_text(bounds)}")]
    return []


def _num(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def bound_problems(group: str, values) -> list[Problem]:
    """Every numeric field of a config group checked against its documented range."""
    return [p for f in fields(values) for p in value_problems(f"{group}.{f.name}", getattr(values, f.name),
                                                                field_range(f))]



def bounds_of(cls, key: str) -> tuple | None:
    """The range of field `key` of config class `cls` (a command checks its flags with it)."""
    return field_range(next(f for f in fields(cls) if f.name == key))
