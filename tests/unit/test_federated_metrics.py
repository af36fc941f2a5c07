"""Metrics from counts against scikit-learn, scipy and textbook formulas on the
pooled per-patient data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score

from shared_model.federated_metrics import (
    AUC_BINS,
    ScoreCounts,
    auc_interval,
    brier,
    calibration,
    confusion,
    delong,
    mcnemar,
    net_benefit,
    operating_point,
    threshold_for_sensitivity,
    wilson_interval,
)


def cohort(
    n: int, seed: int, prevalence: float = 0.25
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(float)
    logit = -1.2 + 1.4 * y + rng.normal(0, 1.0, n)
    return 1 / (1 + np.exp(-logit)), y


def split_sites(p: np.ndarray, y: np.ndarray, k: int = 3) -> ScoreCounts:
    """Counts made at k sites and added up, as the server does."""
    total = ScoreCounts.empty()
    for part in np.array_split(np.arange(len(p)), k):
        total = total + ScoreCounts.from_scores(p[part].tolist(), y[part].tolist())
    return total


def delong_textbook(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """DeLong et al. 1988 from the pairwise kernel, O(m n)."""
    x, z = p[y == 1], p[y == 0]
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
    auc = psi.mean()
    v10, v01 = psi.mean(1), psi.mean(0)
    var = v10.var(ddof=1) / len(x) + v01.var(ddof=1) / len(z)
    return float(auc), float(math.sqrt(var))


def test_auc_and_delong_match_the_textbook_and_sklearn() -> None:
    p, y = cohort(600, 0)
    counts = split_sites(p, y)
    auc, se = delong(counts)
    binned = np.minimum((p * AUC_BINS).astype(int), AUC_BINS - 1)
    ref_auc, ref_se = delong_textbook(binned.astype(float), y)
    assert auc == pytest.approx(ref_auc, abs=1e-12)  # exact on the binned scores
    assert se == pytest.approx(ref_se, rel=1e-9)
    assert abs(auc - roc_auc_score(y, p)) < 0.002  # raw scores: the stated tolerance
    assert se == pytest.approx(delong_textbook(p, y)[1], rel=0.01)
    ci = auc_interval(counts)["ci"]
    assert ci[0] < auc < ci[1] and ci[1] - ci[0] == pytest.approx(2 * 1.96 * se, 1e-3)


def test_confusion_operating_point_and_wilson() -> None:
    p, y = cohort(500, 1)
    counts = split_sites(p, y)
    for t in (0.1, 0.25, 0.5, 0.731):
        tn, fp, fn, tp = confusion_matrix(y, p >= t).ravel()
        assert confusion(counts, t) == {"tp": tp, "fn": fn, "fp": fp, "tn": tn}
    op = operating_point(counts, 0.5)
    sens = op["sensitivity"]
    assert sens["value"] == pytest.approx(np.mean(p[y == 1] >= 0.5))
    k, n, z = sens["k"], sens["n"], 1.959963984540054
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    assert sens["ci"] == pytest.approx((centre - half, centre + half), abs=1e-9)
    assert wilson_interval(0, 0) is None


def test_brier_and_calibration() -> None:
    p, y = cohort(800, 2)
    counts = split_sites(p, y)
    assert brier(counts) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    cal = calibration(counts)
    edges = np.minimum((p * 10).astype(int), 9)
    ece = sum(
        (edges == b).mean() * abs(y[edges == b].mean() - p[edges == b].mean())
        for b in range(10)
        if (edges == b).any()
    )
    assert cal["ece"] == pytest.approx(ece, abs=1e-9)
    pooled = LogisticRegression(C=np.inf).fit(np.log(p / (1 - p))[:, None], y)
    assert cal["slope"] == pytest.approx(pooled.coef_[0, 0], abs=0.02)
    assert cal["intercept"] == pytest.approx(pooled.intercept_[0], abs=0.02)
    assert sum(b["n"] for b in cal["bins"]) == 800


def test_threshold_for_target_sensitivity() -> None:
    p, y = cohort(400, 3)
    counts = split_sites(p, y)
    t = threshold_for_sensitivity(counts, 0.8)
    assert np.mean(p[y == 1] >= t) >= 0.8
    assert np.mean(p[y == 1] >= t + 1 / AUC_BINS) < 0.8  # the highest such threshold


def test_net_benefit_against_the_formula() -> None:
    p, y = cohort(300, 4)
    curve = net_benefit(split_sites(p, y), [0.1, 0.2, 0.35])
    n = len(y)
    for i, t in enumerate(curve["threshold"]):
        tp = np.sum((p >= t) & (y == 1))
        fp = np.sum((p >= t) & (y == 0))
        assert curve["model"][i] == pytest.approx(tp / n - fp / n * t / (1 - t))
        prev = y.mean()
        assert curve["treat_all"][i] == pytest.approx(prev - (1 - prev) * t / (1 - t))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 40), st.integers(0, 40))
def test_mcnemar_is_the_exact_binomial_test(b: int, c: int) -> None:
    n = b + c
    if n == 0:
        expected = 1.0
    else:
        tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
        expected = min(1.0, 2 * tail)
    assert mcnemar(b, c)["p_value"] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_counts_round_trip_and_reject_impossible_records() -> None:
    p, y = cohort(50, 5)
    counts = ScoreCounts.from_scores(p.tolist(), y.tolist())
    back = ScoreCounts.from_values(counts.to_values("x-"), "x-")
    assert np.array_equal(back.pos, counts.pos) and back.sum_py == counts.sum_py
    bad = counts.to_values("x-")
    bad["x-pos"] = [-1] + bad["x-pos"][1:]
    with pytest.raises(ValueError, match="negative"):
        ScoreCounts.from_values(bad, "x-")
    bad = counts.to_values("x-")
    bad["x-sums"] = [1e6, 0.0, 0.0]
    with pytest.raises(ValueError, match="inconsistent"):
        ScoreCounts.from_values(bad, "x-")
    nan_labels = ScoreCounts.from_scores([0.2, 0.9], [float("nan"), 1.0])
    assert nan_labels.n == 1
