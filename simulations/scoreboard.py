"""The oracle's scoreboard: what every policy is worth in a synthetic world.

For each cohort, the mean true pCR probability (the policy value) under the
regimens actually received, under each fixed regimen, under the oracle's best
regimen per patient (with and without the product's recommendation margin),
under the Bayes-optimal policy from the clinical table alone, and under the
Bayes-optimal policy from the clinical table plus a perfect read of the
predictive biomarker (hypoxia); each as its share of the oracle's gain over
the best fixed regimen (:func:`shared_model.policy_value.share_of_oracle_gain`).
Also the AUC ceilings on the received regimen and the trial-scale effects the
response model implies. Written into ``cohort.json`` by ``moefl synth``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from shared_model.clinical import REGIMENS, encode_clinical
from shared_model.policy import DEFAULT_MARGIN, RecommendationRule, recommend
from shared_model.policy_value import share_of_oracle_gain
from simulations.cohort import Patient, World
from simulations.response import REGIMEN_EFFECT, expected_probabilities, sigmoid

POLICIES = (
    "observed",
    *(f"all_{r}" for r in REGIMENS),
    "oracle",
    "oracle_with_margin",
    "clinical_optimal",
    "biomarker_optimal",
)


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    if len(np.unique(y)) < 2:
        return None
    return round(float(roc_auc_score(y, score)), 4)


def cohort_scoreboard(
    patients: list[Patient], world: World, margin: float = DEFAULT_MARGIN
) -> dict[str, Any]:
    """The scoreboard of one cohort (see the module docstring)."""
    if not patients:
        return {"n": 0}
    p = np.stack([q.prob for q in patients])  # (N, 3) true probabilities
    rows = np.arange(len(patients))
    received = np.array([REGIMENS.index(q.regimen) for q in patients])
    risk = np.array([q.risk for q in patients])
    hypoxia = np.array([q.hypoxia for q in patients])
    clinical = expected_probabilities(world.intercept, risk, world.risk_centre)
    biomarker = expected_probabilities(
        world.intercept, risk, world.risk_centre, hypoxia=hypoxia
    )
    choice = {
        "observed": received,
        **{f"all_{r}": np.full(len(p), j) for j, r in enumerate(REGIMENS)},
        "oracle": p.argmax(1),
        "oracle_with_margin": recommend(p, RecommendationRule(margin=margin)),
        "clinical_optimal": clinical.argmax(1),
        "biomarker_optimal": biomarker.argmax(1),
    }
    value = {k: float(p[rows, c].mean()) for k, c in choice.items()}
    fixed = {r: value[f"all_{r}"] for r in REGIMENS}
    best_fixed = max(fixed, key=lambda r: fixed[r])
    y = np.array([q.pcr for q in patients])
    return {
        "n": len(patients),
        "policy_value": {k: round(v, 4) for k, v in value.items()},
        "best_fixed_regimen": best_fixed,
        "oracle_gain_over_best_fixed": round(value["oracle"] - fixed[best_fixed], 4),
        "share_of_oracle_gain": {
            k: (
                None
                if (s := share_of_oracle_gain(v, fixed[best_fixed], value["oracle"]))
                is None
                else round(s, 3)
            )
            for k, v in value.items()
        },
        "best_regimen_share": {
            r: round(float((choice["oracle"] == j).mean()), 3)
            for j, r in enumerate(REGIMENS)
        },
        "auc_ceiling": {
            "clinical_bayes": _auc(y, clinical[rows, received]),
            "biomarker_bayes": _auc(y, biomarker[rows, received]),
            "oracle": _auc(y, p[rows, received]),
        },
        "receivers": {
            r: {
                "n": int((received == j).sum()),
                "expected_pcr_rate": round(float(p[received == j, j].mean()), 4),
                "realised_pcr_rate": round(float(y[received == j].mean()), 4),
            }
            for j, r in enumerate(REGIMENS)
            if (received == j).any()
        },
    }


def regimen_effects(world: World) -> dict[str, float]:
    """Marginal effects at fixed clinical risk, averaged over the latents.

    ``tnt_vs_ncrt_odds_ratio_average_risk`` is the trials' quantity (they
    compare arms of patients whose hidden biology varies); nCT against nCRT is
    given as pCR rates one standard deviation of clinical risk below and above
    the average.
    """
    risk = np.array([q.risk for q in world.retrospective])
    sd = float(risk.std())
    at = np.array([world.risk_centre - sd, world.risk_centre, world.risk_centre + sd])
    e = expected_probabilities(world.intercept, at, world.risk_centre)
    odds = e / (1 - e)
    i_n, i_t, i_c = (REGIMENS.index(r) for r in ("nCRT", "TNT", "nCT"))
    return {
        "tnt_vs_ncrt_odds_ratio_average_risk": round(
            float(odds[1, i_t] / odds[1, i_n]), 3
        ),
        "conditional_tnt_vs_ncrt_odds_ratio": round(
            float(np.exp(REGIMEN_EFFECT["TNT"] - REGIMEN_EFFECT["nCRT"])), 3
        ),
        "ncrt_pcr_low_risk": round(float(e[0, i_n]), 3),
        "nct_pcr_low_risk": round(float(e[0, i_c]), 3),
        "ncrt_pcr_high_risk": round(float(e[2, i_n]), 3),
        "nct_pcr_high_risk": round(float(e[2, i_c]), 3),
        "common_intercept": round(world.intercept, 4),
        "average_patient_ncrt_pcr": round(float(sigmoid(world.intercept)), 4),
    }


LEARNABLE_Q = (0.8, 0.9, 0.95)
BOOTSTRAPS = 40


def _readouts(patients: list[Patient]) -> np.ndarray:
    """The noise-free image readouts (necrotic-core fraction, tumour ADC
    mean, texture, log volume) beside the clinical one-hot."""
    return np.array(
        [
            [
                q.core_fraction,
                q.adc_mean,
                q.heterogeneity,
                q.log_volume_ml,
                *encode_clinical(q.clinical),
            ]
            for q in patients
        ]
    )


def learnable_share(world: World, seed: int = 0) -> dict[str, Any]:
    """What can be learnt from this world's retrospective cohort: the share of
    the oracle's gain a reference estimator reaches on the prospective and
    test cohorts.

    The estimator: one logistic regression per regimen (L2, C = 1) on the
    world's noise-free image readouts and the clinical one-hot, fitted on the
    retrospective patients who received that regimen, with 40 bootstrap
    refits; the advice keeps the guideline (TNT) and switches a patient when
    at least a share ``q`` of the refits say another regimen gives a higher
    pCR (the product's ``switch`` rule, with a bootstrap for a posterior).
    A model that reads the images with noise can approach it, not pass it,
    up to chance.
    """
    train = world.retrospective
    x = _readouts(train)
    centre, scale = x.mean(0), x.std(0) + 1e-9
    xs = (x - centre) / scale
    a = np.array([REGIMENS.index(q.regimen) for q in train])
    y = np.array([q.pcr for q in train])
    rng = np.random.default_rng([seed, 0x1EA2])
    fits: list[list[LogisticRegression | float]] = []
    for _ in range(BOOTSTRAPS):
        boot = rng.integers(0, len(y), size=len(y))
        row: list[LogisticRegression | float] = []
        for j in range(len(REGIMENS)):
            sel = boot[a[boot] == j]
            if len(np.unique(y[sel])) < 2:  # a bootstrap with one outcome
                row.append(float(y[sel].mean()) if len(sel) else 0.0)
            else:
                row.append(
                    LogisticRegression(C=1.0, max_iter=2000).fit(xs[sel], y[sel])
                )
        fits.append(row)
    ref = REGIMENS.index("TNT")
    out: dict[str, Any] = {
        "estimator": "per-regimen logistic regressions on the "
        "noise-free readouts + table, 40 bootstraps, keep TNT",
        "q": list(LEARNABLE_Q),
    }
    for cohort in ("prospective", "test"):
        patients = world.cohorts()[cohort]
        if not patients:
            continue
        xt = (_readouts(patients) - centre) / scale
        pred = np.stack(
            [
                np.stack(
                    [
                        f.predict_proba(xt)[:, 1]
                        if isinstance(f, LogisticRegression)
                        else np.full(len(xt), f)
                        for f in row
                    ],
                    axis=1,
                )
                for row in fits
            ]
        )  # (B, n, 3)
        gain = (pred > pred[:, :, ref : ref + 1]).mean(axis=0)  # (n, 3)
        gain[:, ref] = 0.0
        p = np.stack([q.prob for q in patients])
        rows = np.arange(len(p))
        fixed = p.mean(axis=0)
        best_fixed, oracle = float(fixed.max()), float(p.max(axis=1).mean())
        shares = {}
        for q in LEARNABLE_Q:
            advice = np.where(gain.max(axis=1) >= q, gain.argmax(axis=1), ref)
            share = share_of_oracle_gain(
                float(p[rows, advice].mean()), best_fixed, oracle
            )
            shares[f"{q:g}"] = None if share is None else round(share, 3)
        out[cohort] = shares
    return out


def compute_scoreboard(world: World, margin: float = DEFAULT_MARGIN) -> dict[str, Any]:
    """Scoreboards of every cohort plus the regimen effects and what the
    retrospective cohort lets one learn (:func:`learnable_share`)."""
    return {
        "margin": margin,
        "regimen_effects": regimen_effects(world),
        **{
            c: cohort_scoreboard(ps, world, margin) for c, ps in world.cohorts().items()
        },
        "learnable_share": learnable_share(world),
    }


def format_scoreboard(board: dict[str, Any]) -> str:
    """The scoreboard as a small text table (one line per cohort)."""
    columns = (
        ("observed", "observed"),
        *((f"all_{r}", f"all {r}") for r in REGIMENS),
        ("clinical_optimal", "clinical-only"),
        ("biomarker_optimal", "biomarker"),
        ("oracle_with_margin", "oracle+margin"),
        ("oracle", "oracle"),
    )
    lines = [
        "mean true pCR under each policy [share of the oracle's gain over the best "
        "fixed regimen]",
        f"{'cohort':14s}{'n':>6s} " + " ".join(f"{t:>15s}" for _, t in columns),
    ]
    for cohort in ("retrospective", "prospective", "test"):
        c = board.get(cohort) or {}
        if not c.get("n"):
            continue
        cells = []
        for key, _ in columns:
            share = c["share_of_oracle_gain"][key]
            s = "  n/a" if share is None else f"{share:5.2f}"
            cells.append(f"{c['policy_value'][key]:.3f} [{s}]".rjust(15))
        lines.append(f"{cohort:14s}{c['n']:6d} " + " ".join(cells))
        best = ", ".join(f"{r} {v:.0%}" for r, v in c["best_regimen_share"].items())
        auc = c["auc_ceiling"]
        lines.append(
            f"{'':20s} best regimen: {best}; AUC ceilings: clinical "
            f"{auc['clinical_bayes']}, oracle {auc['oracle']}"
        )
    learnable = board.get("learnable_share") or {}
    for cohort in ("prospective", "test"):
        if learnable.get(cohort):
            shares = ", ".join(f"q {q}: {v}" for q, v in learnable[cohort].items())
            lines.append(
                f"learnable share on the {cohort} cohort (noise-free readouts, "
                f"switch rule): {shares}"
            )
    return "\n".join(lines)
