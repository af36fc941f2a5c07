"""What a site and the server exchange about training: the one place that names
the reply's keys and the parameter groups.

A training reply carries the trained arrays (in the Flower record; not here)
and :class:`TrainReply`'s values: patients per parameter group (``n-shared``,
``n-nCRT``, ``n-TNT``, ``n-nCT``), the steps and seconds, the losses (not under
DP) and the DP-SGD accounting (``dp-*``, under DP). The site builds it with
:meth:`TrainReply.to_values`; the server reads an untrusted reply with
:meth:`TrainReply.from_values`, which refuses anything malformed with a
ValueError that says what. Evaluation replies have their own contract,
:class:`shared_model.site_evaluation.SiteEvaluation`. No Flower here: the
adapters on each side put these values into Flower records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared_model.clinical import REGIMENS

SHARED = "shared"


def expert_group(regimen: str) -> str:
    """The parameter group of one regimen's expert (``expert/nCRT``)."""
    return f"expert/{regimen}"


GROUPS: tuple[str, ...] = (SHARED, *(expert_group(r) for r in REGIMENS))
"""Parameter groups, each aggregated over the sites that trained it."""

COUNT_KEYS: dict[str, str] = {
    SHARED: "n-shared",
    **{expert_group(r): f"n-{r}" for r in REGIMENS},
}
"""Group -> the reply key of its patient count (an aggregation weight)."""

MAX_SITE_PATIENTS = 100_000
"""No site trains on more patients than this; a reply claiming more is refused
(a count is an aggregation weight: an unbounded one would let one site take
the model)."""

LOSS_KEYS = {"train": "train-loss", "seg": "seg-loss", "pcr": "pcr-loss"}
PRIVACY_PREFIX = "dp-"


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


def privacy_values(privacy: Mapping[str, float]) -> dict[str, float]:
    """DP accounting (snake_case names) as reply values (``dp-`` keys)."""
    return {f"{PRIVACY_PREFIX}{k.replace('_', '-')}": v for k, v in privacy.items()}


def read_privacy(values: Mapping[str, Any]) -> dict[str, float] | None:
    """The DP accounting in a reply (``dp-*`` keys), each a finite number."""
    out = {
        k[len(PRIVACY_PREFIX) :].replace("-", "_"): finite_number(v, k)
        for k, v in values.items()
        if k.startswith(PRIVACY_PREFIX)
    }
    return out or None


@dataclass(frozen=True)
class TrainReply:
    """A site's training reply, apart from its arrays.

    Attributes:
        counts: patients per parameter group (:data:`GROUPS`); a group with a
            positive count must be uploaded whole.
        steps: optimiser steps taken this round.
        seconds: wall time of the round at the site.
        losses: mean ``train``, ``seg`` and ``pcr`` losses; None under DP
            (computed from the patients without noise, so never released).
        privacy: DP-SGD accounting (``epsilon``, ``delta``, ...); None without DP.
    """

    counts: Mapping[str, int]
    steps: int | None = None
    seconds: float | None = None
    losses: Mapping[str, float] | None = None
    privacy: Mapping[str, float] | None = None

    def to_values(self) -> dict[str, Any]:
        """Flat values for a Flower MetricRecord (what the site sends)."""
        out: dict[str, Any] = {
            COUNT_KEYS[g]: int(self.counts.get(g, 0)) for g in GROUPS
        }
        if self.steps is not None:
            out["steps"] = int(self.steps)
        if self.seconds is not None:
            out["seconds"] = float(self.seconds)
        for name, value in (self.losses or {}).items():
            out[LOSS_KEYS[name]] = float(value)
        out |= privacy_values(self.privacy or {})
        return out

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> TrainReply:
        """Read an untrusted reply's values; ValueError says what is wrong."""
        missing = [k for k in COUNT_KEYS.values() if k not in values]
        if missing:
            raise ValueError(f"the reply lacks `{missing[0]}`")
        counts = {g: whole_count(values[k], k) for g, k in COUNT_KEYS.items()}
        losses = {
            name: finite_number(values[key], key)
            for name, key in LOSS_KEYS.items()
            if key in values
        }
        steps = values.get("steps")
        return cls(
            counts=counts,
            steps=None if steps is None else whole_count(steps, "steps", 10**7),
            seconds=(
                finite_number(values["seconds"], "seconds")
                if "seconds" in values
                else None
            ),
            losses=losses or None,
            privacy=read_privacy(values),
        )
