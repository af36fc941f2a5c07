"""Choosing the advice rule on the federated validation split (no Flower).

The candidates (:func:`candidate_rules`) are, for each allowed regimen as the
reference, "that regimen for everyone" and the ``switch`` rule at each ``q``.
The sites sum each candidate's doubly robust terms on their validation
patients (:class:`shared_model.policy_value.CandidateSums`), the first
candidate being the guideline for everyone, so every other candidate comes
with its paired difference from it. :func:`choose` then:

1. keeps the guideline as the reference unless another regimen, given to
   everyone, is better than the guideline *with confidence* (the lower end of
   the 95 % interval of its paired gain above 0). A regimen with few patients
   behind it cannot become everyone's default by a lucky estimate;
2. among "the reference for everyone" and the reference's ``switch`` rules,
   takes the highest doubly robust value; equal values go to the more
   conservative rule (never switching, then the higher ``q``).

With a fixed ``q`` (run config ``gain-threshold``), step 2 is skipped. The
table of every candidate's value is kept in the run record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from shared_model.policy import GAIN_THRESHOLDS, RecommendationRule
from shared_model.posterior import Posterior


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
    scored = [(c, v) for c, v in pool if v is not None]
    if not scored:
        return candidates[0], table

    def rank(item: tuple[RecommendationRule, Mapping[str, Any]]) -> tuple:
        c, v = item
        conservative = 2.0 if c.kind == "fixed" else c.q
        return (round(v["dr"]["value"], 9), conservative)

    return max(scored, key=rank)[0], table


def _posterior(candidates: Sequence[RecommendationRule]) -> Posterior | None:
    return next((c.posterior for c in candidates if c.posterior is not None), None)
