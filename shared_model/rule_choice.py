"""Choosing the advice rule on the federated validation split (no Flower).

The candidates (:func:`candidate_rules`) are, for each allowed regimen as the
reference, "that regimen for everyone" and the ``switch`` rule at each ``q``.
The sites sum each candidate's doubly robust terms on their validation
patients (:class:`CandidateSums`), the first
candidate being the guideline for everyone, so every other candidate comes
with its paired difference from it. :func:`choose` then:

1. keeps the guideline as the reference unless another regimen, given to
   everyone, is better than the guideline *with confidence* (the lower end of
   the 95 % interval of its paired gain above 0). A regimen with few patients
   behind it cannot become everyone's default by a lucky estimate;
2. among "the reference for everyone" and the reference's ``switch`` rules
   that beat it *with confidence*, takes the highest doubly robust value;
   equal values go to the more conservative rule (never switching, then the
   higher ``q``). A switch rule beats the guideline for everyone with
   confidence when the lower end of the 95 % interval of its paired gain is
   above 0; where another regimen became the reference, it must also have a
   higher value than that regimen for everyone. On a validation split of
   tens of patients a switch rule rarely clears this, and the reference is
   then advised to everyone: declining to advise is the outcome when the
   validation patients cannot tell a gain from noise.

With a fixed ``q`` (run config ``gain-threshold``), step 2 is skipped. The
table of every candidate's value is kept in the run record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
from scipy.stats import norm

from shared_model.clinical import REGIMENS
from shared_model.policy import GAIN_THRESHOLDS, RecommendationRule, recommend
from shared_model.policy_value import policy_terms
from shared_model.posterior import Posterior
from shared_model.reply_values import finite_number, whole_count


def candidate_rules(
    allowed: Sequence[str],
    guideline: str,
    posterior: Posterior,
    thresholds: Sequence[float] = GAIN_THRESHOLDS,
) -> list[RecommendationRule]:
    """The candidates, the guideline for everyone first."""
    references = [guideline, *(r for r in allowed if r != guideline)]
    out = [
        RecommendationRule(kind="fixed", reference=r, allowed=tuple(allowed))
        for r in references
    ]
    for r in references:
        out += [
            RecommendationRule(
                kind="switch",
                reference=r,
                q=q,
                allowed=tuple(allowed),
                posterior=posterior,
            )
            for q in sorted(thresholds)
        ]
    return out


def choose(
    candidates: Sequence[RecommendationRule],
    values: Sequence[Mapping[str, Any] | None],
    *,
    fixed_q: float | None = None,
    posterior: Posterior | None = None,
) -> tuple[RecommendationRule, list[dict[str, Any]]]:
    """The chosen rule and the table of candidates (see the module docstring).

    ``values``: per candidate, :meth:`CandidateSums.value` of the summed sites
    (None where no patient was scored: the guideline for everyone is then
    kept). ``fixed_q``: the run config's ``gain-threshold`` when it is a number.
    """
    guideline = candidates[0].reference
    table = [
        {
            **c.to_dict(),
            **(
                {}
                if v is None
                else {
                    "dr": v["dr"],
                    "gain_over_guideline": v["gain_over_first"],
                    "switched": v["switched"],
                    "n": v["n"],
                }
            ),
        }
        for c, v in zip(candidates, values, strict=True)
    ]
    reference = guideline
    better = [
        (v["dr"]["value"], c.reference)
        for c, v in zip(candidates, values, strict=True)
        if v is not None
        and c.kind == "fixed"
        and c.reference != guideline
        and v["gain_over_first"]["ci"][0] > 0
    ]
    if better:
        reference = max(better)[1]
    pool = [
        (c, v)
        for c, v in zip(candidates, values, strict=True)
        if c.reference == reference and (c.kind == "fixed" or fixed_q is None)
    ]
    if fixed_q is not None:
        allowed = candidates[0].allowed
        rule = RecommendationRule(
            kind="switch",
            reference=reference,
            q=fixed_q,
            allowed=allowed,
            posterior=posterior or _posterior(candidates),
        )
        return rule, table
    baseline = next((v for c, v in pool if c.kind == "fixed" and v is not None), None)
    scored = [
        (c, v)
        for c, v in pool
        if v is not None
        and (
            c.kind == "fixed" or _confidently_better(v, baseline, reference, guideline)
        )
    ]
    keep = posterior or _posterior(candidates)  # what-ifs and the clinic's P(gain)
    if not scored:
        return replace(candidates[0], posterior=keep), table

    def rank(item: tuple[RecommendationRule, Mapping[str, Any]]) -> tuple:
        c, v = item
        conservative = 2.0 if c.kind == "fixed" else c.q
        return (round(v["dr"]["value"], 9), conservative)

    return replace(max(scored, key=rank)[0], posterior=keep), table


def _confidently_better(
    value: Mapping[str, Any],
    baseline: Mapping[str, Any] | None,
    reference: str,
    guideline: str,
) -> bool:
    """Whether a switch rule beats its reference for everyone with confidence
    (step 2 of the module docstring)."""
    if value["gain_over_first"]["ci"][0] <= 0:
        return False
    if reference == guideline or baseline is None:
        return True
    return bool(value["dr"]["value"] > baseline["dr"]["value"])


def _posterior(candidates: Sequence[RecommendationRule]) -> Posterior | None:
    return next((c.posterior for c in candidates if c.posterior is not None), None)


@dataclass
class CandidateSums:
    """A site's sums for one candidate rule on its validation split: the
    doubly robust terms, their paired difference from the first candidate's
    (the guideline for everyone), and the patients it advises away from its
    reference. What the federation chooses its rule from."""

    n: int = 0
    dr: float = 0.0
    dr2: float = 0.0
    diff: float = 0.0
    diff2: float = 0.0
    switched: int = 0

    KEYS: ClassVar[tuple[str, ...]] = ("n", "dr", "dr2", "diff", "diff2", "switched")

    def __add__(self, other: CandidateSums) -> CandidateSums:
        return CandidateSums(
            *(getattr(self, k) + getattr(other, k) for k in CandidateSums.KEYS)
        )

    def to_values(self, prefix: str) -> dict[str, float | int]:
        return {f"{prefix}{k}": getattr(self, k) for k in CandidateSums.KEYS}

    @classmethod
    def from_values(cls, values: Mapping[str, Any], prefix: str) -> CandidateSums:
        """Server side; ValueError/KeyError on a malformed record."""
        n = whole_count(values[f"{prefix}n"], f"{prefix}n")
        switched = whole_count(values[f"{prefix}switched"], f"{prefix}switched")
        sums = [
            finite_number(values[f"{prefix}{k}"], f"{prefix}{k}")
            for k in ("dr", "dr2", "diff", "diff2")
        ]
        if switched > n or sums[1] < 0 or sums[3] < 0:
            raise ValueError(f"`{prefix}*` sums are impossible")
        return cls(n, sums[0], sums[1], sums[2], sums[3], switched)

    def value(self, level: float = 0.95) -> dict[str, Any] | None:
        """The doubly robust value and its difference from the first
        candidate, each with a normal interval; None without patients."""
        if self.n < 2:
            return None
        z = float(norm.ppf(0.5 + level / 2))

        def mean_ci(total: float, squares: float) -> dict[str, Any]:
            mean = total / self.n
            var = max(squares / self.n - mean * mean, 0.0) * self.n / (self.n - 1)
            se = float(np.sqrt(var / self.n))
            return {"value": mean, "se": se, "ci": (mean - z * se, mean + z * se)}

        return {
            "dr": mean_ci(self.dr, self.dr2),
            "gain_over_first": mean_ci(self.diff, self.diff2),
            "switched": self.switched,
            "n": self.n,
        }


def candidate_sums(
    probs: np.ndarray,
    received: Sequence[int] | np.ndarray,
    outcome: Sequence[float] | np.ndarray,
    propensity: np.ndarray,
    rules: Sequence[RecommendationRule],
    design: Any = None,
) -> list[CandidateSums]:
    """Each rule's :class:`CandidateSums` over the patients with an outcome
    (site side); the first rule is the one the others are compared with."""
    y = np.asarray(outcome, np.float64)
    known = ~np.isnan(y)
    p = np.asarray(probs, np.float64)[known]
    a = np.asarray(received, int)[known]
    e = np.asarray(propensity, np.float64)[known]
    z = None if design is None else np.asarray(design, np.float64)[known]
    terms = []
    switched = []
    for rule in rules:
        rec = recommend(p, rule, a, z)
        terms.append(policy_terms(p, a, y[known], e, rec)["dr"])
        switched.append(int((rec != REGIMENS.index(rule.reference)).sum()))
    out = []
    for t, moved in zip(terms, switched, strict=True):
        d = t - terms[0]
        out.append(
            CandidateSums(
                int(len(t)),
                float(t.sum()),
                float((t * t).sum()),
                float(d.sum()),
                float((d * d).sum()),
                moved,
            )
        )
    return out
