"""Score counts released under differential privacy, and the AUC read from them.

A site under ``privacy.release_evaluation: dp`` sends its score histograms in
:data:`DP_SCORE_BINS` coarse bins per (regimen, outcome), each coarse count at
its middle fine bin, with Gaussian noise of a standard deviation it declares
(:data:`NOISE_STD`); its Dice sum and count are scaled by :data:`DICE_WEIGHT`
before the noise. Nothing else of its evaluation leaves it (:data:`NOT_RELEASED`).

Sensitivity (add/remove one validation patient, the ledger's convention):
the patient sits in one coarse bin of one histogram (its regimen, its outcome),
so the histograms move by 1 in one entry; its Dice (in [0, 1]) and the Dice
count move by at most 1 each, times :data:`DICE_WEIGHT`. The L2 sensitivity of
the whole released vector is so ``sqrt(1 + 2 * DICE_WEIGHT**2)``
(:data:`RELEASE_SENSITIVITY`). Brier sums and calibration bins are not sent: the
coordinator reads them off the released bins' centres (post-processing).

The coordinator clamps pooled noised counts at 0 for its point estimates and
widens the AUC's DeLong interval by the variance of the AUC under the declared
noise, re-drawn :data:`AUC_DRAWS` times (:func:`widened_auc`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.stats import norm

from shared_model.federated_metrics import (
    AUC_BINS,
    CALIBRATION_BINS,
    ScoreCounts,
    auc_from_histograms,
    delong,
)
from shared_model.messages import PRIVACY_PREFIX
from shared_model.reply_values import MAX_SITE_PATIENTS, finite_number

DP_SCORE_BINS = 5
"""Coarse bins per released histogram (0.2 wide): fewer bins carry less noise
into the AUC, more lose less of its resolution (ties count one half)."""
DICE_WEIGHT = 0.5
"""The Dice sum and count are released at this scale: their noise is
``1 / DICE_WEIGHT`` times the histograms', and the histograms carry most of the
budget."""
RELEASE_SENSITIVITY = math.sqrt(1.0 + 2.0 * DICE_WEIGHT**2)
"""L2 sensitivity of a DP release to adding or removing one patient."""
NOT_RELEASED = ("loss", "policy", "candidates", "survival")
"""What a DP release leaves out: the loss is unbounded per patient, the policy
and candidate sums weigh patients by a propensity model fitted (without DP) on
the site's training patients, and one patient sits in many at-risk counts."""
NOISE_STD = f"{PRIVACY_PREFIX}noise-std"
"""The key of the released values' noise standard deviation (histogram counts)."""
EPSILON = f"{PRIVACY_PREFIX}epsilon"
"""The key of the epsilon one release spends (the site's ``evaluation_epsilon``)."""
AUC_DRAWS = 400
"""Noise re-draws behind a widened AUC interval."""

_BLOCK = AUC_BINS // DP_SCORE_BINS
RELEASED_BINS = np.arange(DP_SCORE_BINS) * _BLOCK + _BLOCK // 2
"""The fine bins a DP release's coarse counts sit at (their blocks' middles)."""


def coarse_histogram(fine: np.ndarray, std: float, rng: np.random.Generator) -> Any:
    """Site side: a fine histogram summed into :data:`DP_SCORE_BINS` blocks,
    each with Gaussian noise of ``std``, placed at :data:`RELEASED_BINS`."""
    blocks = np.asarray(fine, np.float64).reshape(DP_SCORE_BINS, _BLOCK).sum(1)
    out = np.zeros(AUC_BINS, np.float64)
    out[RELEASED_BINS] = blocks + rng.normal(0.0, std, DP_SCORE_BINS)
    return out


def counts_of_histograms(pos: np.ndarray, neg: np.ndarray) -> ScoreCounts:
    """Counts whose Brier sums and calibration bins are read off the bins'
    centres (what a DP release's histograms say of them); float counts kept."""
    centres = (np.arange(AUC_BINS) + 0.5) / AUC_BINS
    both = pos + neg
    calib = (both * centres).reshape(CALIBRATION_BINS, -1).sum(1)
    return ScoreCounts(
        pos,
        neg,
        float(both @ centres),
        float(both @ centres**2),
        float(pos @ centres),
        calib,
    )


def read_noised(values: Mapping[str, Any], prefix: str) -> ScoreCounts:
    """Server side: a DP release's histograms (``{prefix}pos``/``neg``): finite
    numbers, zero outside :data:`RELEASED_BINS`; ValueError otherwise."""
    out = []
    for cls in ("pos", "neg"):
        key = f"{prefix}{cls}"
        raw = values[key]
        if not isinstance(raw, list) or len(raw) != AUC_BINS:
            raise ValueError(f"`{key}` must be a list of {AUC_BINS} numbers")
        h = np.array([finite_number(v, key) for v in raw], np.float64)
        outside = np.ones(AUC_BINS, bool)
        outside[RELEASED_BINS] = False
        if h[outside].any() or np.abs(h).max() > 10 * MAX_SITE_PATIENTS:
            raise ValueError(f"`{key}` is not a DP release's histogram")
        out.append(h)
    return counts_of_histograms(out[0], out[1])


def usable(counts: ScoreCounts) -> ScoreCounts:
    """Noised counts clamped at 0 and rounded (post-processing), for the
    metrics that need whole counts (operating points, calibration)."""
    pos = np.maximum(np.round(counts.pos), 0).astype(np.int64)
    neg = np.maximum(np.round(counts.neg), 0).astype(np.int64)
    out = counts_of_histograms(pos.astype(np.float64), neg.astype(np.float64))
    return ScoreCounts(pos, neg, out.sum_p, out.sum_p2, out.sum_py, out.calib_sum_p)


def widened_auc(
    counts: ScoreCounts,
    noise_var: float,
    *,
    draws: int = AUC_DRAWS,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any] | None:
    """AUC of pooled counts some of which are noised, with an interval that
    adds the noise's variance to DeLong's.

    Args:
        counts: the pooled counts (noised ones included, unclamped).
        noise_var: the noise variance at each of :data:`RELEASED_BINS` (the
            sum of the noised sites' ``std ** 2``; 0 leaves DeLong's interval).
        draws: noise re-draws on the released counts.
        level: the interval's coverage.
        seed: the re-draws' seed (the report is reproducible).

    The point estimate is the AUC of the counts clamped at 0. The noise's
    variance is that of the clamped AUC over fresh noise of ``noise_var`` added
    to the released counts (a parametric bootstrap of the mechanism).
    """
    pos, neg = np.maximum(counts.pos, 0.0), np.maximum(counts.neg, 0.0)
    res = delong(ScoreCounts(pos, neg)) if min(pos.sum(), neg.sum()) >= 1 else None
    if res is None:
        return None
    auc, se_delong = res
    se_noise = 0.0
    if noise_var > 0:
        rng = np.random.default_rng(seed)
        sd = math.sqrt(noise_var)
        redrawn = []
        for _ in range(draws):
            p, n = counts.pos.astype(np.float64), counts.neg.astype(np.float64)
            p[RELEASED_BINS] += rng.normal(0, sd, DP_SCORE_BINS)
            n[RELEASED_BINS] += rng.normal(0, sd, DP_SCORE_BINS)
            redrawn.append(auc_from_histograms(np.maximum(p, 0), np.maximum(n, 0)))
        kept = [a for a in redrawn if a is not None]
        se_noise = float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.5
    se = math.sqrt(se_delong**2 + se_noise**2)
    z = float(norm.ppf(0.5 + level / 2))
    return {
        "auc": auc,
        "se": se,
        "se_delong": se_delong,
        "se_noise": se_noise,
        "ci": (max(0.0, auc - z * se), min(1.0, auc + z * se)),
    }


def widen_for_noise(
    report: dict[str, Any],
    released: Mapping[str, ScoreCounts],
    noised: Mapping[str, tuple[float, float | None]],
) -> None:
    """A report with DP sites (``noised``: site -> noise std, epsilon): the
    AUCs overall and per regimen from the clamped ``released`` counts per
    regimen, with intervals widened for the noise; the Dice clipped; which
    sites were noised at what epsilon."""
    var = sum(std**2 for std, _ in noised.values())
    pooled = sum(released.values(), ScoreCounts.empty())
    overall = widened_auc(pooled, len(released) * var)
    report["overall"]["auc"] = overall
    report["auc"] = None if overall is None else overall["auc"]
    for r, c in released.items():
        report["regimens"][r]["auc"] = widened = widened_auc(c, var)
        report["auc_by_regimen"][r] = None if widened is None else widened["auc"]
    if report["dice"] is not None:
        report["dice"] = min(max(report["dice"], 0.0), 1.0)
    report["dp_release"] = {
        "sites": {
            site: {"epsilon": eps, "noise_std": std}
            for site, (std, eps) in sorted(noised.items())
        },
        "not_released": list(NOT_RELEASED),
        "note": "these sites' score histograms and Dice are Gaussian-noised; the "
        "AUC intervals add the noise's variance; the policy value, the loss, "
        "the candidate rules and survival come from the exact sites alone",
    }
