"""Input checks shared by the package's public functions: each error names the parameter and what was
expected (``TypeError`` for the wrong kind of value, ``ValueError`` for a wrong value of the right kind).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["positive_int", "stable_name"]

_STABLE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def positive_int(value: Any, name: str, unit: str = "") -> int:
    """``value`` if it is an int > 0 (not a bool); the message names ``name`` and, if given, the ``unit``."""
    what = f"a positive int (number of {unit})" if unit else "a positive int"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be {what}, got {value}")
    return value


def stable_name(value: Any, name: str) -> str:
    """``value`` if it is lowercase words joined by '-' (a file name or key that stays the same from build
    to build: figures, claims, GPU records)."""
    if not isinstance(value, str) or not _STABLE.match(value):
        raise ValueError(
            f"{name} must be lowercase words joined by '-' (a stable name), got {value!r}"
        )
    return value
