"""The value of treatment advice, estimated off-policy from what sites actually did.

Value of the policy "treat as recommended" (the pCR rate it would achieve),
estimated off-policy from what sites actually did:

* ``model_estimate`` (circular): the mean of the model's own predicted pCR under
  its advice. This is what a model says about itself, not evidence.
* ``ipw``: inverse propensity weighting. Patients whose received regimen equals
  the recommendation count with weight ``1 / e(received | clinical)``, where
  ``e`` is a propensity model fitted at the patient's site (regimen choice is a
  site's policy); the others count zero.
* ``dr``: doubly robust (augmented IPW): the model's prediction under the
  advice, corrected by the weighted residual of the patients who received it.
  Consistent when either the propensities or the outcome model are right.
* ``observed``: the pCR rate under current practice, for comparison.

Each estimate is a mean of per-patient terms, so a site sends only ``n``, the
sum and the sum of squares of each; the server adds them and gives a normal
confidence interval. Positivity diagnostics count patients whose recommended
regimen their site gives rarely (propensity below ``low``) or never.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import norm
from sklearn.linear_model import LogisticRegression

from shared_model.clinical import REGIMENS
from shared_model.policy import (
    DIRECTIONS,
    ESTIMATORS,
    RecommendationRule,
    direction,
    gain_probabilities,
    recommend,
)


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


def fit_propensity(
    clinical: np.ndarray, received: Sequence[int] | np.ndarray
) -> tuple[LogisticRegression | None, np.ndarray]:
    """A site's regimen-choice model: multinomial logistic regression of the
    received regimen on the clinical one-hot (L2, C = 1).

    Returns the fitted model (None when the site gives one regimen only) and
    the regimens it covers; a regimen the site never gives has propensity 0.
    """
    a = np.asarray(received, int)
    classes = np.unique(a)
    if len(classes) < 2:
        return None, classes
    return LogisticRegression(C=1.0, max_iter=2000).fit(clinical, a), classes


def propensities(
    model: LogisticRegression | None, classes: np.ndarray, clinical: np.ndarray
) -> np.ndarray:
    """(n, 3) probability of each regimen at the site given the clinical data."""
    out = np.zeros((len(clinical), len(REGIMENS)))
    if model is None:
        out[:, int(classes[0])] = 1.0
        return out
    out[:, model.classes_.astype(int)] = model.predict_proba(clinical)
    return out


CONFIDENCE_EDGES = (0.5, 0.8, 0.9, 0.95)
CONFIDENCE_BINS = ("<0.5", "0.5-0.8", "0.8-0.9", "0.9-0.95", ">=0.95")
"""Bins of a patient's highest probability that a switch gains."""


@dataclass
class PolicySums:
    """What a site sends about the policy: sums of per-patient terms."""

    n: int = 0
    sums: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(ESTIMATORS, 0.0)
    )
    squares: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(ESTIMATORS, 0.0)
    )
    directions: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(DIRECTIONS, 0)
    )
    recommended: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(REGIMENS, 0)
    )
    followed: int = 0  # patients whose received regimen is the recommended one
    low_propensity: int = 0  # recommended regimen given rarely (below `low`)
    never_given: int = 0  # recommended regimen the site never gives
    # switch rule: patients by the highest posterior probability that an
    # allowed alternative beats the reference (CONFIDENCE_BINS)
    confidence: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(CONFIDENCE_BINS, 0)
    )

    def __add__(self, other: PolicySums) -> PolicySums:
        def add(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
            return {k: a[k] + b[k] for k in a}

        return PolicySums(
            self.n + other.n,
            add(self.sums, other.sums),
            add(self.squares, other.squares),
            add(self.directions, other.directions),
            add(self.recommended, other.recommended),
            self.followed + other.followed,
            self.low_propensity + other.low_propensity,
            self.never_given + other.never_given,
            add(self.confidence, other.confidence),
        )

    def to_values(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {"policy-n": self.n}
        out |= {f"policy-sum-{k}": v for k, v in self.sums.items()}
        out |= {f"policy-sq-{k}": v for k, v in self.squares.items()}
        out |= {f"policy-dir-{k}": v for k, v in self.directions.items()}
        out |= {f"policy-rec-{k}": v for k, v in self.recommended.items()}
        out |= {
            "policy-followed": self.followed,
            "policy-low-propensity": self.low_propensity,
            "policy-never-given": self.never_given,
        }
        out |= {f"policy-conf-{k}": v for k, v in self.confidence.items()}
        return out

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> PolicySums:
        """Server side; raises KeyError/ValueError on a malformed record."""
        n = int(values["policy-n"])
        out = cls(
            n,
            {k: float(values[f"policy-sum-{k}"]) for k in ESTIMATORS},
            {k: float(values[f"policy-sq-{k}"]) for k in ESTIMATORS},
            {k: int(values[f"policy-dir-{k}"]) for k in DIRECTIONS},
            {k: int(values[f"policy-rec-{k}"]) for k in REGIMENS},
            int(values["policy-followed"]),
            int(values["policy-low-propensity"]),
            int(values["policy-never-given"]),
            {k: int(values[f"policy-conf-{k}"]) for k in CONFIDENCE_BINS},
        )
        counts = [n, out.followed, out.low_propensity, out.never_given]
        counts += list(out.confidence.values())
        if min(counts) < 0 or sum(out.directions.values()) != n:
            raise ValueError("policy counts are negative or do not add up")
        if sum(out.confidence.values()) not in (0, n):
            raise ValueError("policy confidence counts do not add up")
        if not all(np.isfinite(list(out.sums.values()) + list(out.squares.values()))):
            raise ValueError("policy sums are not finite")
        return out


def policy_terms(
    probs: np.ndarray,
    received: Sequence[int] | np.ndarray,
    outcome: Sequence[float] | np.ndarray,
    propensity: np.ndarray,
    recommended: Sequence[int] | np.ndarray,
) -> dict[str, np.ndarray]:
    """Per-patient terms whose means are the estimators (site side)."""
    p = np.asarray(probs, np.float64)
    a = np.asarray(received, int)
    y = np.asarray(outcome, np.float64)
    rec = np.asarray(recommended, int)
    rows = np.arange(len(a))
    follows = (a == rec).astype(np.float64)
    e = propensity[rows, a]
    if (e[follows > 0] <= 0).any():
        raise ValueError("a patient received a regimen with propensity 0")
    weight = np.divide(follows, e, out=np.zeros_like(follows), where=follows > 0)
    mu_rec = p[rows, rec]
    mu_received = p[rows, a]
    return {
        "model_estimate": mu_rec,
        "ipw": weight * y,
        "dr": mu_rec + weight * (y - mu_received),
        "observed": y,
    }


def site_policy_sums(
    probs: np.ndarray,
    received: Sequence[int] | np.ndarray,
    outcome: Sequence[float] | np.ndarray,
    propensity: np.ndarray,
    rule: RecommendationRule | None = None,
    low: float = 0.05,
    design: Any = None,
) -> PolicySums:
    """A site's sums for the policy value, recommendations and positivity
    (``design``: the patients' head input, for a ``switch`` rule)."""
    y = np.asarray(outcome, np.float64)
    known = ~np.isnan(y)
    p = np.asarray(probs, np.float64)[known]
    a = np.asarray(received, int)[known]
    e = np.asarray(propensity, np.float64)[known]
    z = None if design is None else np.asarray(design, np.float64)[known]
    rec = recommend(p, rule, a, z)
    terms = policy_terms(p, a, y[known], e, rec)
    confidence = dict.fromkeys(CONFIDENCE_BINS, 0)
    if rule is not None and rule.kind == "switch" and not rule.withheld and len(a):
        gain = gain_probabilities(rule, z)
        ref = REGIMENS.index(rule.reference)
        alts = [j for j, r in enumerate(REGIMENS) if r in rule.allowed and j != ref]
        top = gain[:, alts].max(axis=1) if alts else np.zeros(len(a))
        bins = np.searchsorted(CONFIDENCE_EDGES, top, side="right")
        confidence = {k: int((bins == i).sum()) for i, k in enumerate(CONFIDENCE_BINS)}
    rows = np.arange(len(a))
    dirs = [direction(int(r), int(g)) for r, g in zip(rec, a, strict=True)]
    return PolicySums(
        n=int(len(a)),
        sums={k: float(v.sum()) for k, v in terms.items()},
        squares={k: float((v * v).sum()) for k, v in terms.items()},
        directions={d: dirs.count(d) for d in DIRECTIONS},
        recommended={r: int((rec == j).sum()) for j, r in enumerate(REGIMENS)},
        followed=int((rec == a).sum()),
        low_propensity=int(((e[rows, rec] < low) & (e[rows, rec] > 0)).sum()),
        never_given=int((e[rows, rec] == 0).sum()),
        confidence=confidence,
    )


def policy_value(sums: PolicySums, level: float = 0.95) -> dict[str, Any]:
    """Each estimator's mean with a normal confidence interval, plus the
    recommendation counts and positivity diagnostics (server side)."""
    z = float(norm.ppf(0.5 + level / 2))
    out: dict[str, Any] = {"n": sums.n}
    for k in ESTIMATORS:
        if sums.n == 0:
            out[k] = None
            continue
        mean = sums.sums[k] / sums.n
        var = (
            max(sums.squares[k] / sums.n - mean * mean, 0.0) * sums.n / (sums.n - 1)
            if sums.n > 1
            else 0.0
        )
        se = float(np.sqrt(var / sums.n))
        out[k] = {"value": mean, "se": se, "ci": (mean - z * se, mean + z * se)}
    out["directions"] = dict(sums.directions)
    out["recommended"] = dict(sums.recommended)
    out["followed"] = sums.followed
    if any(sums.confidence.values()):
        out["confidence"] = dict(sums.confidence)
    warnings = []
    if sums.never_given:
        warnings.append(
            f"{sums.never_given} of {sums.n} patients are recommended a regimen their "
            "site never gives: the off-policy estimates cannot see what it would do "
            "for them (positivity fails)"
        )
    if sums.low_propensity:
        warnings.append(
            f"{sums.low_propensity} of {sums.n} patients are recommended a regimen "
            "their site rarely gives to similar patients (propensity < 0.05): large "
            "weights, wide intervals"
        )
    out["positivity"] = {
        "never_given": sums.never_given,
        "low_propensity": sums.low_propensity,
        "warnings": warnings,
    }
    return out


@dataclass
class OracleSums:
    """Simulation only: the true pCR probabilities (the synthetic oracle) of a
    site's patients, summed under the model's advice, under each fixed regimen
    and under the oracle's best regimen, with the second moments that give an
    interval on the share of the oracle's gain. Kept for local reports; never
    part of what a site sends.

    With ``d_i = p_i(advice) - p_i(r)`` and ``g_i = p_i(best) - p_i(r)`` for the
    best fixed regimen ``r``, the share is ``mean(d) / mean(g)``; its standard
    error by the delta method is ``sqrt(mean((d - s g)^2) / n) / mean(g)``
    (patients sampled, true probabilities known, ``r`` taken as given).
    """

    n: int = 0
    advice: float = 0.0
    best: float = 0.0
    fixed: np.ndarray = field(default_factory=lambda: np.zeros(len(REGIMENS)))
    d2: np.ndarray = field(default_factory=lambda: np.zeros(len(REGIMENS)))
    g2: np.ndarray = field(default_factory=lambda: np.zeros(len(REGIMENS)))
    dg: np.ndarray = field(default_factory=lambda: np.zeros(len(REGIMENS)))

    @classmethod
    def from_probabilities(
        cls, true_probs: np.ndarray, advice: Sequence[int] | np.ndarray
    ) -> OracleSums:
        """``true_probs`` (n, 3) in REGIMENS order; ``advice`` the recommended
        regimen index per patient."""
        p = np.asarray(true_probs, np.float64).reshape(-1, len(REGIMENS))
        rows = np.arange(len(p))
        adv = p[rows, np.asarray(advice, int)]
        best = p.max(axis=1)
        d = adv[:, None] - p
        g = best[:, None] - p
        return cls(
            len(p),
            float(adv.sum()),
            float(best.sum()),
            p.sum(axis=0),
            (d**2).sum(axis=0),
            (g**2).sum(axis=0),
            (d * g).sum(axis=0),
        )

    def __add__(self, other: OracleSums) -> OracleSums:
        return OracleSums(
            self.n + other.n,
            self.advice + other.advice,
            self.best + other.best,
            self.fixed + other.fixed,
            self.d2 + other.d2,
            self.g2 + other.g2,
            self.dg + other.dg,
        )

    def report(self, level: float = 0.95) -> dict[str, Any] | None:
        """Mean true pCR under the advice, each fixed regimen and the oracle,
        and the share of the oracle's gain with its interval."""
        if self.n == 0:
            return None
        n = self.n
        fixed = self.fixed / n
        j = int(np.argmax(fixed))
        value, optimum = self.advice / n, self.best / n
        share = share_of_oracle_gain(value, float(fixed[j]), optimum)
        out: dict[str, Any] = {
            "value": value,
            "n": n,
            "fixed": {r: float(v) for r, v in zip(REGIMENS, fixed, strict=True)},
            "best_fixed_regimen": REGIMENS[j],
            "optimal": optimum,
            "share_of_oracle_gain": None,
        }
        if share is not None:
            z = float(norm.ppf(0.5 + level / 2))
            mean_g = optimum - fixed[j]
            resid = (self.d2[j] - 2 * share * self.dg[j] + share**2 * self.g2[j]) / n
            se = float(np.sqrt(max(resid, 0.0) / n) / mean_g)
            out["share_of_oracle_gain"] = {
                "value": share,
                "se": se,
                "ci": (share - z * se, share + z * se),
            }
        return out
