"""Treatment recommendations and an honest estimate of what following them is worth.

Recommendation rule (documented for clinicians in the README): regimens are
ordered by intensity, nCT < nCRT < TNT. For each patient the model gives the
pCR probability under every regimen; the recommended regimen is the *least
intensive* one whose predicted pCR is within ``margin`` (absolute, default
0.05) of the best. Against the regimen the patient received, that is an
escalation (more intensive), maintenance (the same) or de-intensification.

What following the advice is worth is estimated in :mod:`shared_model.policy_value`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared_model.clinical import REGIMENS
from shared_model.messages import expert_group

INTENSITY: dict[str, int] = {"nCT": 0, "nCRT": 1, "TNT": 2}
DIRECTIONS = ("escalate", "maintain", "de-intensify")
ESTIMATORS = ("model_estimate", "ipw", "dr", "observed")


@dataclass(frozen=True)
class RecommendationRule:
    """Least intensive regimen within ``margin`` of the best predicted pCR."""

    margin: float = 0.05
    allowed: tuple[str, ...] = REGIMENS

    def __post_init__(self) -> None:
        if not 0 <= self.margin < 1:
            raise ValueError("the recommendation margin must be in [0, 1)")
        if any(r not in REGIMENS for r in self.allowed):
            raise ValueError(f"allowed regimens must be among {REGIMENS}")

    @property
    def withheld(self) -> bool:
        """No regimen may be advised: each patient's received regimen stands."""
        return not self.allowed


def supported_regimens(
    support: Mapping[str, int] | None, min_support: int
) -> tuple[tuple[str, ...], dict[str, str]]:
    """The regimens whose expert may be recommended, and why the others not.

    ``support``: per regimen, the patients that trained its expert (summed over
    sites; None when unknown, e.g. an older checkpoint: every regimen is
    allowed). An expert below ``min_support`` patients is never recommended;
    when none has the support, the allowed set is empty and advice is withheld
    (:attr:`RecommendationRule.withheld`).
    """
    if support is None:
        return REGIMENS, {}
    reasons = {
        r: f"its expert was trained on {int(support.get(r, 0))} patients, fewer than "
        f"the {min_support} required (min-expert-support)"
        for r in REGIMENS
        if int(support.get(r, 0)) < min_support
    }
    return tuple(r for r in REGIMENS if r not in reasons), reasons


def expert_support(rounds: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Per regimen, the most patients that trained its expert in one round of a
    run record (rounds that train the pCR part: joint or heads)."""
    out = dict.fromkeys(REGIMENS, 0)
    for entry in rounds:
        if entry.get("stage", "joint") not in ("joint", "heads"):
            continue
        for r in REGIMENS:
            group = entry.get("groups", {}).get(expert_group(r), {})
            if group.get("updated"):
                out[r] = max(out[r], int(group.get("n", 0)))
    return out


def recommend(
    probs: np.ndarray,
    rule: RecommendationRule | None = None,
    received: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Recommended regimen index per patient from ``probs`` (n, 3); when the
    rule withholds advice, each patient's ``received`` regimen (required then)."""
    rule = rule or RecommendationRule()
    if rule.withheld:
        if received is None:
            raise ValueError("advice is withheld: the received regimens are needed")
        return np.asarray(received, int).copy()
    p = np.asarray(probs, np.float64)
    allowed = np.array([r in rule.allowed for r in REGIMENS])
    masked = np.where(allowed[None, :], p, -np.inf)
    best = masked.max(axis=1, keepdims=True)
    ok = masked >= best - rule.margin - 1e-12
    by_intensity = sorted(range(len(REGIMENS)), key=lambda j: INTENSITY[REGIMENS[j]])
    out = np.full(len(p), -1, dtype=int)
    for j in reversed(by_intensity):  # the least intensive qualifying one wins
        out = np.where(ok[:, j], j, out)
    return out


def share_of_oracle_gain(
    value: float, best_fixed: float, oracle: float
) -> float | None:
    """The share of the oracle's gain over the best fixed regimen a policy gets.

    ``(value - best_fixed) / (oracle - best_fixed)``, all three the mean true pCR
    probability over the same patients: 1 is the oracle, 0 is no better than
    giving everyone the best single regimen, negative is worse than that. None
    when the oracle gains nothing over a fixed regimen (no policy can).
    """
    gain = oracle - best_fixed
    if gain <= 1e-12:
        return None
    return float((value - best_fixed) / gain)


def format_share(share: dict[str, Any] | None) -> str:
    """A share of the oracle's gain with its interval, e.g. ``0.29 (-0.23 to
    0.81)`` (``to``, since the bounds are often negative)."""
    if not share:
        return "n/a"
    return f"{share['value']:.2f} ({share['ci'][0]:.2f} to {share['ci'][1]:.2f})"


def direction(recommended: int, received: int) -> str:
    """escalate / maintain / de-intensify, by regimen intensity."""
    a, b = INTENSITY[REGIMENS[recommended]], INTENSITY[REGIMENS[received]]
    return DIRECTIONS[0] if a > b else DIRECTIONS[1] if a == b else DIRECTIONS[2]
