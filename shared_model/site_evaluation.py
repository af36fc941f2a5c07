"""One evaluation's arithmetic, on the server side: what sites send, and every
number made from it.

A site's contribution is :class:`SiteEvaluation`: score counts per regimen
(:class:`shared_model.federated_metrics.ScoreCounts`), Dice and loss sums, and
the policy sums (:class:`shared_model.policy.PolicySums`). :func:`combine`
adds the sites up and computes the report; :func:`combine_by_cohort` does so
for a validation cohort and the cohorts scored at its operating point
(prospective, and the held-out test cohort); paired McNemar tests are in
:mod:`shared_model.model_comparison`. Scoring patients (torch, images) lives in
:mod:`client.scoring.evaluation`.

The report ``moefl evaluate`` writes is the folder's :data:`EVALUATION`, written
by :func:`write_evaluation` and read (by the report and the benchmarks) with
:func:`read_evaluation`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.clinical import REGIMENS
from shared_model.durable import json_bytes, read_record, write_atomic
from shared_model.federated_metrics import (
    ScoreCounts,
    auc_from_histograms,
    binary_report,
    net_benefit,
    threshold_for_sensitivity,
)
from shared_model.messages import SECONDS
from shared_model.noised_counts import (
    DICE_WEIGHT,
    EPSILON,
    NOISE_STD,
    coarse_histogram,
    counts_of_histograms,
    read_noised,
    usable,
    widen_for_noise,
    widened_auc,
)
from shared_model.policy import DIRECTIONS
from shared_model.policy_value import OracleSums, PolicySums, policy_value
from shared_model.reply_values import finite_number, whole_count
from shared_model.rule_choice import CandidateSums
from shared_model.survival import SurvivalCounts, kaplan_meier, logrank

COHORTS = ("validation", "prospective", "test")
"""Evaluation cohorts, in report order: a training site's validation split
(chooses thresholds), an evaluate site's patients (prospective), and the
held-out test cohort (quality claims; never used to choose anything)."""

EVALUATION = "evaluation.json"
"""The evaluation's file in the folder ``moefl evaluate --out`` names."""


def write_evaluation(folder: Path, report: Mapping[str, Any]) -> Path:
    """Write an evaluation's report into ``folder``; returns the file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / EVALUATION, json_bytes(dict(report)))
    return folder / EVALUATION


def read_evaluation(folder: Path) -> dict[str, Any]:
    """The evaluation written into ``folder``; ConfigError names the file when
    it is missing or unreadable."""
    return read_record(
        Path(folder) / EVALUATION,
        "an evaluation",
        "give a folder `moefl evaluate --out` wrote",
    )


MAX_CANDIDATES = 64
"""The most candidate rules one evaluation sums."""

ADVICE_GROUPS = (*DIRECTIONS, "followed", "not-followed")
"""Disease-free survival groups: the recommendation against the received
regimen (escalate / maintain / de-intensify), and whether the patient received
the advised regimen."""


@dataclass
class SiteEvaluation:
    """What one site contributes to an evaluation (counts and sums only)."""

    site: str
    cohort: str  # one of COHORTS
    counts: dict[str, ScoreCounts]  # per regimen received
    dice_sum: float
    dice_n: float  # a whole count, unless DP-noised
    policy: PolicySums
    oracle: OracleSums | None = None  # simulation only, never serialised
    loss_sum: float = 0.0
    loss_n: int = 0
    # disease-free survival per ADVICE_GROUPS entry, when the site has DFS
    survival: dict[str, SurvivalCounts] | None = None
    # (score under the received regimen, outcome) per patient with an outcome:
    # kept at the site for paired tests, never serialised
    local_scores: np.ndarray | None = None
    # the candidate rules' sums, when the federation is choosing its rule
    candidates: list[CandidateSums] | None = None
    # a DP release (shared_model.noised_counts): the histograms' noise std and
    # the epsilon the release spent; 0 and None for exact counts
    noise_std: float = 0.0
    epsilon: float | None = None

    def to_values(self) -> dict[str, Any]:
        """Flat values for a Flower MetricRecord (what the site sends)."""
        if self.noise_std:
            return {
                "dice-sum": self.dice_sum,
                "dice-n": self.dice_n,
                NOISE_STD: self.noise_std,
                EPSILON: self.epsilon,
                **{
                    f"{r}-{k}": getattr(c, k).tolist()
                    for r, c in self.counts.items()
                    for k in ("pos", "neg")
                },
            }
        out: dict[str, Any] = {
            "dice-sum": self.dice_sum,
            "dice-n": self.dice_n,
            "loss-sum": self.loss_sum,
            "loss-n": self.loss_n,
            **self.policy.to_values(),
        }
        for r, c in self.counts.items():
            out |= c.to_values(f"{r}-")
        for group, counts in (self.survival or {}).items():
            out |= counts.to_values(f"dfs-{group}-")
        for k, cand in enumerate(self.candidates or []):
            out |= cand.to_values(f"cand-{k}-")
        return out

    @classmethod
    def from_values(
        cls, site: str, cohort: str, values: dict[str, Any]
    ) -> SiteEvaluation:
        """Server side; raises KeyError, TypeError or ValueError when malformed
        (a key this evaluation would not send included)."""
        out = cls._read(site, cohort, values)
        unknown = sorted(set(values) - set(out.to_values()) - {SECONDS})
        if unknown:
            raise ValueError(f"unknown key `{unknown[0][:40]}` in the evaluation")
        if SECONDS in values:
            finite_number(values[SECONDS], SECONDS)
        return out

    def noised(
        self, std: float, epsilon: float, rng: np.random.Generator
    ) -> SiteEvaluation:
        """Site side: what a DP release sends (:mod:`shared_model.noised_counts`):
        the histograms coarsened and noised at ``std``, the Dice sum and count
        at ``std / DICE_WEIGHT``, nothing of :data:`NOT_RELEASED`."""
        counts = {
            r: counts_of_histograms(
                coarse_histogram(c.pos, std, rng), coarse_histogram(c.neg, std, rng)
            )
            for r, c in self.counts.items()
        }
        dice = np.array([self.dice_sum, self.dice_n], np.float64)
        dice += rng.normal(0.0, std / DICE_WEIGHT, 2)
        return SiteEvaluation(
            self.site, self.cohort, counts, float(dice[0]), float(dice[1]),
            PolicySums(), noise_std=float(std), epsilon=float(epsilon),
        )  # fmt: skip

    @classmethod
    def _read(cls, site: str, cohort: str, values: dict[str, Any]) -> SiteEvaluation:
        if NOISE_STD in values:
            return cls(
                site, cohort, {r: read_noised(values, f"{r}-") for r in REGIMENS},
                finite_number(values["dice-sum"], "dice-sum"),
                finite_number(values["dice-n"], "dice-n"),
                PolicySums(), noise_std=_positive(values[NOISE_STD], NOISE_STD),
                epsilon=_positive(values[EPSILON], EPSILON),
            )  # fmt: skip
        dice_n = whole_count(values["dice-n"], "dice-n")
        loss_n = whole_count(values["loss-n"], "loss-n")
        dice_sum = finite_number(values["dice-sum"], "dice-sum")
        loss_sum = finite_number(values["loss-sum"], "loss-sum")
        if not -1e-9 <= dice_sum <= dice_n + 1e-9:
            raise ValueError("`dice-sum` is outside [0, dice-n]")
        return cls(
            site,
            cohort,
            {r: ScoreCounts.from_values(values, f"{r}-") for r in REGIMENS},
            dice_sum,
            dice_n,
            PolicySums.from_values(values),
            loss_sum=loss_sum,
            loss_n=loss_n,
            survival=(
                {
                    g: SurvivalCounts.from_values(values, f"dfs-{g}-")
                    for g in ADVICE_GROUPS
                }
                if f"dfs-{ADVICE_GROUPS[0]}-at-risk" in values
                else None
            ),
            candidates=_candidates(values),
        )


def _positive(value: Any, key: str) -> float:
    number = finite_number(value, key)
    if not 0 < number <= 1e6:
        raise ValueError(f"`{key}` is {number:g}; expected above 0")
    return number


def _candidates(values: dict[str, Any]) -> list[CandidateSums] | None:
    """The candidate rules' sums, ``cand-0-...`` onwards (consecutive)."""
    out: list[CandidateSums] = []
    while len(out) < MAX_CANDIDATES and f"cand-{len(out)}-n" in values:
        out.append(CandidateSums.from_values(values, f"cand-{len(out)}-"))
    return out or None


def combine(
    sites: list[SiteEvaluation],
    *,
    threshold_sensitivity: float | None = None,
    target_sensitivity: float = 0.8,
    choose_threshold: bool = True,
) -> dict[str, Any]:
    """Every metric from the sites' counts and sums (the server's side).

    Args:
        sites: the sites' contributions for one cohort.
        threshold_sensitivity: the target-sensitivity threshold chosen on the
            validation cohort; None: choose it here when ``choose_threshold``.
        target_sensitivity: the sensitivity that threshold must reach.
        choose_threshold: False for a test cohort whose validation gave no
            threshold (choosing one on the test patients would flatter it).
    """
    released, policy = _pooled_sums(sites)
    noised = [s for s in sites if s.noise_std]
    by_regimen = {r: usable(c) for r, c in released.items()} if noised else released
    overall = sum(by_regimen.values(), ScoreCounts.empty())
    chosen_here = threshold_sensitivity is None and choose_threshold
    if chosen_here:
        threshold_sensitivity = threshold_for_sensitivity(overall, target_sensitivity)
    thresholds = {"0.5": 0.5}
    if threshold_sensitivity is not None:
        thresholds[f"sensitivity>={target_sensitivity:g}"] = threshold_sensitivity
    value = policy_value(policy)
    oracles = [s.oracle for s in sites if s.oracle is not None]
    if oracles and (truth := sum(oracles, OracleSums()).report()) is not None:
        value["oracle"] = truth
    dice_n = sum(s.dice_n for s in sites)
    loss_n = sum(s.loss_n for s in sites)
    out: dict[str, Any] = {
        "n": overall.n,
        "auc": auc_from_histograms(overall.pos, overall.neg),
        "auc_by_regimen": {
            r: auc_from_histograms(c.pos, c.neg) for r, c in by_regimen.items()
        },
        "dice": sum(s.dice_sum for s in sites) / dice_n if dice_n else None,
        "loss": sum(s.loss_sum for s in sites) / loss_n if loss_n else None,
        "thresholds": thresholds,
        "threshold_chosen_on": (
            "this cohort"
            if chosen_here
            else "validation"
            if threshold_sensitivity is not None
            else None
        ),
        "overall": binary_report(overall, thresholds),
        "regimens": {r: binary_report(c, thresholds) for r, c in by_regimen.items()},
        "decision_curve": net_benefit(overall),
        "policy_value": value,
        "sites": _site_reports(sites, thresholds),
    }
    if noised:
        widen_for_noise(
            out, released, {s.site: (s.noise_std, s.epsilon) for s in noised}
        )
    candidates = _candidate_values([s for s in sites if not s.noise_std])
    if candidates is not None:
        out["candidates"] = candidates
    with_dfs = [s.survival for s in sites if s.survival is not None]
    if with_dfs:
        out["survival"] = survival_report(
            {
                g: sum((d[g] for d in with_dfs), SurvivalCounts.empty())
                for g in ADVICE_GROUPS
            }
        )
    return out


def _pooled_sums(
    sites: list[SiteEvaluation],
) -> tuple[dict[str, ScoreCounts], PolicySums]:
    """The sites' score counts per regimen and policy sums, added up."""
    by_regimen = {r: ScoreCounts.empty() for r in REGIMENS}
    policy = PolicySums()
    for s in sites:
        for r in REGIMENS:
            by_regimen[r] = by_regimen[r] + s.counts[r]
        policy = policy + s.policy
    return by_regimen, policy


def _site_reports(
    sites: list[SiteEvaluation], thresholds: dict[str, float]
) -> dict[str, Any]:
    """Each site's own metrics, Dice and policy value, by site name (a DP
    site's from its clamped counts, its AUC interval widened for its noise)."""
    out = {}
    for s in sorted(sites, key=lambda s: s.site):
        counts = sum(s.counts.values(), ScoreCounts.empty())
        out[s.site] = {
            **binary_report(usable(counts) if s.noise_std else counts, thresholds),
            "dice": _dice(s.dice_sum, s.dice_n, bool(s.noise_std)),
            "policy_value": policy_value(s.policy),
        }
        if s.noise_std:
            noise_var = len(s.counts) * s.noise_std**2
            out[s.site]["auc"] = widened_auc(counts, noise_var)
    return out


def _dice(total: float, n: float, noised: bool) -> float | None:
    """Mean Dice; clipped to [0, 1] when noised (None without labelled cases)."""
    if not noised:
        return total / n if n else None
    return min(max(total / n, 0.0), 1.0) if n >= 1 else None


def _candidate_values(sites: list[SiteEvaluation]) -> list[Any] | None:
    """The candidate rules' pooled values, when every site sent the same
    number of candidates; None otherwise."""
    sums = [s.candidates for s in sites]
    if sums and all(c is not None and len(c) == len(sums[0] or []) for c in sums):
        return [
            sum((c[k] for c in sums if c is not None), CandidateSums()).value()
            for k in range(len(sums[0] or []))
        ]
    return None


def survival_report(groups: dict[str, SurvivalCounts]) -> dict[str, Any]:
    """Kaplan-Meier per advice group and the log-rank tests between the
    recommendation directions and between followed and not followed."""
    return {
        "kaplan_meier": {g: kaplan_meier(c) for g, c in groups.items() if c.n},
        "logrank_directions": logrank({g: groups[g] for g in DIRECTIONS}),
        "logrank_followed": logrank(
            {g: groups[g] for g in ("followed", "not-followed")}
        ),
    }


def combine_by_cohort(
    evaluations: list[SiteEvaluation], target_sensitivity: float
) -> dict[str, Any]:
    """combine() per cohort; the prospective and test cohorts at the threshold
    the validation cohort chose (without a validation cohort the prospective
    one chooses its own; the test cohort never does)."""
    out: dict[str, Any] = {}
    val = [e for e in evaluations if e.cohort == "validation"]
    chosen = None
    if val:
        out["validation"] = combine(val, target_sensitivity=target_sensitivity)
        chosen = out["validation"]["thresholds"].get(
            f"sensitivity>={target_sensitivity:g}"
        )
    for cohort in ("prospective", "test"):
        members = [e for e in evaluations if e.cohort == cohort]
        if members:
            out[cohort] = combine(
                members,
                threshold_sensitivity=chosen,
                target_sensitivity=target_sensitivity,
                choose_threshold=not val and cohort == "prospective",
            )
    return out
