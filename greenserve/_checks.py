"""Argument checks shared by every public function: one rule per kind of argument.

A wrong *type* raises ``TypeError``, a value out of range ``ValueError``; the message
names the argument and shows what was given. Checks run before anything is created
(no socket is bound, no fiber started, for a bad argument).
"""

from __future__ import annotations

import math
from typing import overload

__all__ = ["count", "flag", "seconds"]


@overload
def seconds(name: str, value: object, *, optional: bool = ..., none: None = ...
            ) -> float | None: ...
@overload
def seconds(name: str, value: object, *, optional: bool = ..., none: float) -> float: ...
def seconds(name: str, value: object, *, optional: bool = False,
            none: float | None = None) -> float | None:
    """A duration in seconds: a finite number > 0, or ``None`` when ``optional``
    (returned as ``none``). ``bool`` is not a number here (``True`` seconds is a
    mistake); NaN, infinity, 0 and negative values raise ``ValueError``."""
    if value is None and optional:
        return none
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number of seconds or None" if optional else "a number of seconds"
        raise TypeError(f"{name} must be {kind}, not {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number of seconds > 0, not {value!r}")
    return float(value)


def flag(name: str, value: object) -> bool:
    """A yes/no option: exactly ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
    return value


def count(name: str, value: object, *, optional: bool = False, minimum: int = 1) -> int | None:
    """A whole number ``>= minimum`` (``None`` too when ``optional``); not a ``bool``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {kind}, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {value}")
    return value
