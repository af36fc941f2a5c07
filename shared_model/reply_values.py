"""The numbers of an untrusted reply, checked: finite numbers, whole counts
and the fields of a DP account in their ranges. The keys they are sent under
are named in :mod:`shared_model.messages`, which reads every reply with these."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MAX_SITE_PATIENTS = 100_000
"""No site trains on more patients than this; a reply claiming more is refused
(a count is an aggregation weight: an unbounded one would let one site take
the model)."""


def finite_number(value: Any, key: str) -> float:
    """A finite real number from an untrusted reply (bools, strings, lists refused)."""
    if isinstance(value, bool) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise ValueError(
            f"metric `{key}` is a {type(value).__name__}; expected a number"
        )
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"metric `{key}` is {out}; expected a finite number")
    return out


def whole_count(value: Any, key: str, upper: int = MAX_SITE_PATIENTS) -> int:
    """A whole number from 0 to ``upper`` from an untrusted reply."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or not 0 <= value <= upper
    ):
        raise ValueError(
            f"count `{key}` is {value!r}; expected a whole number from 0 to {upper}"
        )
    return int(value)


PRIVACY_FIELDS: dict[str, tuple[bool, float, float]] = {
    # name: (required, lowest, highest)
    "epsilon": (True, 0.0, 1e6),
    "target_epsilon": (True, 1e-9, 1e6),
    "delta": (True, 1e-300, 1.0 - 1e-12),
    "epsilon_before": (False, 0.0, 1e6),
    "max_grad_norm": (False, 1e-12, 1e6),
    "noise_multiplier": (False, 0.0, 1e6),
    "sample_rate": (False, 1e-12, 1.0),
    "steps": (False, 0.0, 1e9),
}
"""A DP account's fields (snake_case): whether a reply must carry it, and its
range."""


def privacy_field(name: str, key: str, value: Any) -> float:
    """The checked value of DP account field ``name`` sent under ``key``: a
    finite number in the field's range (a whole count for ``steps``)."""
    _, low, high = PRIVACY_FIELDS[name]
    number = finite_number(value, key)
    if not low <= number <= high:
        raise ValueError(f"`{key}` is {number:g}; expected {low:g} to {high:g}")
    return whole_count(value, key, 10**9) if name == "steps" else number
