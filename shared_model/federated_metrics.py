"""Metrics from counts: what sites send instead of per-patient scores.

A site bins its predicted probabilities into a fine histogram per class
(pCR = 1 and pCR = 0); the server adds the histograms of all sites and computes
the AUC from them as the Mann-Whitney statistic, counting pairs that share a
bin as ties (one half). With 10,000 bins the result differs from the AUC of the
pooled per-patient scores only by pairs closer than 0.0001, which a test
bounds against scikit-learn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import binomtest, norm
from sklearn.linear_model import LogisticRegression

AUC_BINS = 10_000


def score_histograms(
    scores: Sequence[float], labels: Sequence[float], bins: int = AUC_BINS
) -> tuple[list[int], list[int]]:
    """Site side: counts of positive and negative cases per probability bin.

    Labels that are NaN (outcome unknown) are left out.
    """
    s = np.clip(np.asarray(scores, dtype=float), 0.0, 1.0)
    y = np.asarray(labels, dtype=float)
    known = ~np.isnan(y)
    idx = np.minimum((s * bins).astype(int), bins - 1)
    pos = np.bincount(idx[known & (y == 1)], minlength=bins)
    neg = np.bincount(idx[known & (y == 0)], minlength=bins)
    return pos.astype(int).tolist(), neg.astype(int).tolist()


def auc_from_histograms(
    pos: Sequence[int] | np.ndarray, neg: Sequence[int] | np.ndarray
) -> float | None:
    """Server side: AUC from summed per-class histograms (None with one class)."""
    p = np.asarray(pos, dtype=np.float64)
    n = np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = p.sum(), n.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    below = np.concatenate([[0.0], np.cumsum(n)[:-1]])
    return float((p * (below + 0.5 * n)).sum() / (n_pos * n_neg))


CALIBRATION_BINS = 10
"""Equal-width reliability bins (each is 100 of the fine histogram bins)."""


@dataclass
class ScoreCounts:
    """Everything the evaluation needs about one group of patients, as counts
    and sums a site can send: fine per-class histograms of predicted
    probability, sums for the Brier score, and the sum of predictions per
    reliability bin. Counts from several sites add up (``+``)."""

    pos: np.ndarray  # (AUC_BINS,) patients with pCR per probability bin
    neg: np.ndarray  # (AUC_BINS,) patients without pCR
    sum_p: float = 0.0
    sum_p2: float = 0.0
    sum_py: float = 0.0
    calib_sum_p: np.ndarray = field(
        default_factory=lambda: np.zeros(CALIBRATION_BINS, np.float64)
    )

    @classmethod
    def empty(cls) -> ScoreCounts:
        return cls(np.zeros(AUC_BINS, np.int64), np.zeros(AUC_BINS, np.int64))

    @classmethod
    def from_scores(
        cls, scores: Sequence[float], labels: Sequence[float]
    ) -> ScoreCounts:
        """Site side; patients with an unknown outcome (NaN) are left out."""
        s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
        y = np.asarray(labels, dtype=np.float64)
        known = ~np.isnan(y)
        s, y = s[known], y[known]
        pos, neg = score_histograms(s.tolist(), y.tolist())
        calib = np.minimum((s * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
        return cls(
            np.asarray(pos, np.int64),
            np.asarray(neg, np.int64),
            float(s.sum()),
            float((s * s).sum()),
            float((s * y).sum()),
            np.bincount(calib, weights=s, minlength=CALIBRATION_BINS),
        )

    def __add__(self, other: ScoreCounts) -> ScoreCounts:
        return ScoreCounts(
            self.pos + other.pos,
            self.neg + other.neg,
            self.sum_p + other.sum_p,
            self.sum_p2 + other.sum_p2,
            self.sum_py + other.sum_py,
            self.calib_sum_p + other.calib_sum_p,
        )

    @property
    def n_pos(self) -> int:
        return int(self.pos.sum())

    @property
    def n_neg(self) -> int:
        return int(self.neg.sum())

    @property
    def n(self) -> int:
        return self.n_pos + self.n_neg

    def to_values(self, prefix: str) -> dict[str, list[int] | list[float]]:
        """Flat values for a Flower MetricRecord (lists of numbers)."""
        return {
            f"{prefix}pos": self.pos.astype(int).tolist(),
            f"{prefix}neg": self.neg.astype(int).tolist(),
            f"{prefix}sums": [self.sum_p, self.sum_p2, self.sum_py],
            f"{prefix}calib": self.calib_sum_p.astype(float).tolist(),
        }

    @classmethod
    def from_values(cls, values: Mapping[str, Any], prefix: str) -> ScoreCounts:
        """Server side; raises ValueError on a malformed or impossible record."""
        pos = np.asarray(values[f"{prefix}pos"], np.int64)
        neg = np.asarray(values[f"{prefix}neg"], np.int64)
        sums = np.asarray(values[f"{prefix}sums"], np.float64)
        calib = np.asarray(values[f"{prefix}calib"], np.float64)
        if (
            pos.shape != (AUC_BINS,)
            or neg.shape != (AUC_BINS,)
            or sums.shape != (3,)
            or calib.shape != (CALIBRATION_BINS,)
        ):
            raise ValueError(f"`{prefix}*` has the wrong shape")
        if (
            (pos < 0).any()
            or (neg < 0).any()
            or not np.isfinite(sums).all()
            or not np.isfinite(calib).all()
        ):
            raise ValueError(f"`{prefix}*` holds negative or non-finite counts")
        n = pos.sum() + neg.sum()
        if not (-1e-9 <= sums[0] <= n + 1e-9 and -1e-9 <= sums[2] <= pos.sum() + 1e-9):
            raise ValueError(f"`{prefix}sums` is inconsistent with its histograms")
        return cls(pos, neg, float(sums[0]), float(sums[1]), float(sums[2]), calib)


def confusion(counts: ScoreCounts, threshold: float) -> dict[str, int]:
    """Confusion counts for "pCR predicted when probability >= threshold".

    Exact for thresholds on the histogram grid (multiples of 1 / AUC_BINS);
    others are rounded up to it.
    """
    k = min(max(int(np.ceil(threshold * AUC_BINS - 1e-9)), 0), AUC_BINS)
    tp, fp = int(counts.pos[k:].sum()), int(counts.neg[k:].sum())
    return {
        "tp": tp,
        "fn": counts.n_pos - tp,
        "fp": fp,
        "tn": counts.n_neg - fp,
    }


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion k / n (scipy), None when n = 0."""
    if n == 0:
        return None
    ci = binomtest(int(k), int(n)).proportion_ci(
        confidence_level=level, method="wilson"
    )
    return float(ci.low), float(ci.high)


def delong(counts: ScoreCounts) -> tuple[float, float] | None:
    """AUC and its DeLong standard error from the histograms (ties within a bin
    count one half). None with only one class."""
    p = counts.pos.astype(np.float64)
    q = counts.neg.astype(np.float64)
    m, n = p.sum(), q.sum()
    if m == 0 or n == 0:
        return None
    neg_below = np.concatenate([[0.0], np.cumsum(q)[:-1]])
    pos_above = p.sum() - np.cumsum(p)
    v10 = (neg_below + 0.5 * q) / n  # per positive, by its bin
    v01 = (pos_above + 0.5 * p) / m  # per negative, by its bin
    auc = float((p * v10).sum() / m)
    s10 = float((p * (v10 - auc) ** 2).sum() / (m - 1)) if m > 1 else 0.0
    s01 = float((q * (v01 - auc) ** 2).sum() / (n - 1)) if n > 1 else 0.0
    return auc, float(np.sqrt(s10 / m + s01 / n))


def auc_interval(counts: ScoreCounts, level: float = 0.95) -> dict[str, Any] | None:
    """AUC with a DeLong interval (normal, clipped to [0, 1])."""
    res = delong(counts)
    if res is None:
        return None
    auc, se = res
    z = float(norm.ppf(0.5 + level / 2))
    return {
        "auc": auc,
        "se": se,
        "ci": (max(0.0, auc - z * se), min(1.0, auc + z * se)),
    }


def brier(counts: ScoreCounts) -> float | None:
    """Mean squared error of the probabilities: (sum p^2 - 2 sum p y + sum y) / n."""
    if counts.n == 0:
        return None
    return (counts.sum_p2 - 2 * counts.sum_py + counts.n_pos) / counts.n


def calibration(counts: ScoreCounts) -> dict[str, Any] | None:
    """Reliability bins, expected calibration error, and calibration slope and
    intercept (logistic regression of the outcome on the logit of the
    prediction, fitted on the histogram bins' centres weighted by counts)."""
    if counts.n == 0:
        return None
    width = AUC_BINS // CALIBRATION_BINS
    pos_b = counts.pos.reshape(CALIBRATION_BINS, width).sum(1)
    neg_b = counts.neg.reshape(CALIBRATION_BINS, width).sum(1)
    n_b = pos_b + neg_b
    bins = []
    ece = 0.0
    for b in range(CALIBRATION_BINS):
        if n_b[b] == 0:
            continue
        predicted = counts.calib_sum_p[b] / n_b[b]
        observed = pos_b[b] / n_b[b]
        ece += n_b[b] / counts.n * abs(observed - predicted)
        bins.append(
            {
                "low": b / CALIBRATION_BINS,
                "high": (b + 1) / CALIBRATION_BINS,
                "n": int(n_b[b]),
                "predicted": float(predicted),
                "observed": float(observed),
            }
        )
    out: dict[str, Any] = {"bins": bins, "ece": float(ece)}
    if counts.n_pos and counts.n_neg:
        centres = (np.arange(AUC_BINS) + 0.5) / AUC_BINS
        logit = np.log(centres / (1 - centres))
        x = np.concatenate([logit, logit])[:, None]
        y = np.concatenate([np.ones(AUC_BINS), np.zeros(AUC_BINS)])
        w = np.concatenate([counts.pos, counts.neg]).astype(np.float64)
        keep = w > 0
        fit = LogisticRegression(C=np.inf).fit(x[keep], y[keep], sample_weight=w[keep])
        out["slope"] = float(fit.coef_[0, 0])
        out["intercept"] = float(fit.intercept_[0])
    return out


def threshold_for_sensitivity(counts: ScoreCounts, target: float) -> float | None:
    """The highest grid threshold whose sensitivity is at least ``target``."""
    if counts.n_pos == 0:
        return None
    at_or_above = np.cumsum(counts.pos[::-1])[::-1]  # positives in bins k..end
    ok = np.nonzero(at_or_above / counts.n_pos >= target - 1e-12)[0]
    return float(ok.max() / AUC_BINS)


def operating_point(counts: ScoreCounts, threshold: float) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity, PPV and NPV at a threshold, each with
    its Wilson interval."""
    c = confusion(counts, threshold)
    tp, fn, fp, tn = c["tp"], c["fn"], c["fp"], c["tn"]

    def rate(k: int, n: int) -> dict[str, Any]:
        return {
            "value": k / n if n else None,
            "k": k,
            "n": n,
            "ci": wilson_interval(k, n),
        }

    return {
        "threshold": threshold,
        **c,
        "accuracy": rate(tp + tn, tp + tn + fp + fn),
        "sensitivity": rate(tp, tp + fn),
        "specificity": rate(tn, tn + fp),
        "ppv": rate(tp, tp + fp),
        "npv": rate(tn, tn + fn),
    }


def net_benefit(
    counts: ScoreCounts, thresholds: Sequence[float] | None = None
) -> dict[str, list[float]]:
    """Decision curve: net benefit of treating as a responder when the predicted
    pCR probability is >= t, against treating everyone and no one:
    ``TP/n - FP/n * t / (1 - t)``."""
    ts = (
        np.round(np.arange(1, 100) / 100, 2)
        if thresholds is None
        else np.asarray(thresholds, np.float64)
    )
    n = max(counts.n, 1)
    prevalence = counts.n_pos / n
    model, everyone = [], []
    for t in ts:
        c = confusion(counts, float(t))
        odds = t / (1 - t)
        model.append(c["tp"] / n - c["fp"] / n * odds)
        everyone.append(prevalence - (1 - prevalence) * odds)
    return {
        "threshold": [float(t) for t in ts],
        "model": model,
        "treat_all": everyone,
        "treat_none": [0.0] * len(ts),
    }


def mcnemar(b: int, c: int) -> dict[str, Any]:
    """Exact McNemar test for two classifiers on the same patients: ``b``
    patients only the first gets right, ``c`` only the second."""
    if b + c == 0:
        return {"b": b, "c": c, "p_value": 1.0}
    return {"b": b, "c": c, "p_value": float(binomtest(b, b + c, 0.5).pvalue)}


def roc_curve_points(counts: ScoreCounts, step: int = 100) -> dict[str, list[float]]:
    """ROC curve from the histograms, one point every ``step`` fine bins."""
    if counts.n_pos == 0 or counts.n_neg == 0:
        return {"fpr": [], "tpr": []}
    tp = np.cumsum(counts.pos[::-1])[::-1]  # predicted positive at threshold k
    fp = np.cumsum(counts.neg[::-1])[::-1]
    ks = list(range(0, AUC_BINS, step))
    fpr = [1.0] + [float(fp[k] / counts.n_neg) for k in ks[1:]] + [0.0]
    tpr = [1.0] + [float(tp[k] / counts.n_pos) for k in ks[1:]] + [0.0]
    return {"fpr": fpr, "tpr": tpr}


def binary_report(
    counts: ScoreCounts, thresholds: Mapping[str, float]
) -> dict[str, Any]:
    """Every metric of one group: AUC with DeLong interval, ROC points, Brier,
    calibration, and the operating points named in ``thresholds``."""
    return {
        "n": counts.n,
        "n_pcr": counts.n_pos,
        "auc": auc_interval(counts),
        "roc": roc_curve_points(counts),
        "brier": brier(counts),
        "calibration": calibration(counts),
        "operating_points": {
            name: operating_point(counts, t) for name, t in thresholds.items()
        },
    }


def format_metric(value: Any, digits: int = 3) -> str:
    """A metric for people: ``0.731``, or ``n/a`` when it could not be computed
    (or is not a number: records are read defensively)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a"
    return f"{value:.{digits}f}"


def format_share(share: dict[str, Any] | None) -> str:
    """A share of the oracle's gain with its interval, e.g. ``0.29 (-0.23 to
    0.81)`` (``to``, since the bounds are often negative)."""
    if not share:
        return "n/a"
    return f"{share['value']:.2f} ({share['ci'][0]:.2f} to {share['ci'][1]:.2f})"
