"""Input checks shared by the package's public functions: each error names the parameter and what was
expected (``TypeError`` for the wrong kind of value, ``ValueError`` for a wrong value of the right kind).
"""

from __future__ import annotations

from typing import Any

__all__ = ["positive_int"]


def positive_int(value: Any, name: str, unit: str = "") -> int:
    """``value`` if it is an int > 0 (not a bool); the message names ``name`` and, if given, the ``unit``."""
    what = f"a positive int (number of {unit})" if unit else "a positive int"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be {what}, got {value}")
    return value
