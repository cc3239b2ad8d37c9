"""Checks of user settings, shared by `Thresholds`, `MonitorOptions` and
`tensor_stats`: each names the setting and says what is wrong with the value.
Any real number is accepted (int, float, NumPy scalars of any width); bools,
strings and NaN are not."""
from __future__ import annotations

import math
import numbers


def number(name: str, value, *, low: float = 0.0, low_open: bool = True,
           high: float = math.inf, high_open: bool = False) -> float:
    """`value` as a float in the interval from `low` to `high` (open or closed
    ends as given), or a TypeError/ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    try:
        x = float(value)
    except OverflowError:
        raise ValueError(f"{name} = {value!r} is too large for a float") from None
    if math.isnan(x) or x < low or (low_open and x == low) or x > high or (high_open and x == high):
        lo, hi = "(" if low_open else "[", ")" if high_open or math.isinf(high) else "]"
        raise ValueError(f"{name} must be in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return x


def positive_int(name: str, value) -> int:
    """`value` as an int >= 1, or a TypeError/ValueError naming `name` (a bool or
    a float such as 2.0 is refused: these settings count steps)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)
