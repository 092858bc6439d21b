"""Argument checks shared by the library and the application: each error names the argument."""
from __future__ import annotations

from typing import Optional

import numpy as np


def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value, *, minimum: int, optional: bool = False) -> Optional[int]:
    """``value`` as an int >= ``minimum`` (None passes when ``optional``): TypeError for a non-integer (bools
    included), ValueError below the minimum."""
    if value is None and optional:
        return None
    expected = ("a positive int" if minimum == 1 else f"an int >= {minimum}") + (" or None" if optional else "")
    if not is_int(value):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {expected}, got {value}")
    return int(value)
