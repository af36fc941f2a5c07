"""Metrics from counts: what sites send instead of per-patient scores.

A site bins its predicted probabilities into a fine histogram per class
(pCR = 1 and pCR = 0); the server adds the histograms of all sites and computes
the AUC from them as the Mann-Whitney statistic, counting pairs that share a
bin as ties (one half). With 1000 bins the result differs from the AUC of the
pooled per-patient scores only by pairs closer than 0.001, which a test
bounds against scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

AUC_BINS = 1000


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
