"""Two models compared on the same patients: exact McNemar tests from the
sites' discordant counts (each site pairs its own patients' scores)."""

from __future__ import annotations

from typing import Any

from shared_model.federated_metrics import mcnemar
from shared_model.site_evaluation import COHORTS, SiteEvaluation


def paired_counts(
    a: SiteEvaluation, b: SiteEvaluation, threshold_a: float, threshold_b: float
) -> tuple[int, int]:
    """At a site: patients only model A classifies right, and only model B."""
    if a.local_scores is None or b.local_scores is None:
        raise ValueError("paired counts need the site's local scores")
    y = a.local_scores[:, 1]
    right_a = (a.local_scores[:, 0] >= threshold_a) == (y == 1)
    right_b = (b.local_scores[:, 0] >= threshold_b) == (y == 1)
    return int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())


def compare_models(
    ours: list[SiteEvaluation],
    theirs: list[SiteEvaluation],
    report_ours: dict[str, Any],
    report_theirs: dict[str, Any],
) -> dict[str, Any]:
    """Exact McNemar per cohort and operating point, from the sites' discordant
    counts (each model at its own threshold: 0.5, and the one its validation
    chose for the target sensitivity)."""
    out: dict[str, Any] = {}
    for cohort in COHORTS:
        if cohort not in report_ours or cohort not in report_theirs:
            continue
        pairs = [
            (a, b)
            for a in ours
            for b in theirs
            if a.site == b.site and a.cohort == b.cohort == cohort
        ]
        th_a = report_ours[cohort]["thresholds"]
        th_b = report_theirs[cohort]["thresholds"]
        out[cohort] = {}
        for name in th_a:
            if name not in th_b:
                continue
            b_total = c_total = 0
            for a, b in pairs:
                n_b, n_c = paired_counts(a, b, th_a[name], th_b[name])
                b_total, c_total = b_total + n_b, c_total + n_c
            out[cohort][name] = {
                "threshold": th_a[name],
                "threshold_against": th_b[name],
                **mcnemar(b_total, c_total),
            }
    return out
