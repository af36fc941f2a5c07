"""The oracle's scoreboard: what every policy is worth in a synthetic world.

For each cohort, the mean true pCR probability (the policy value) under the
regimens actually received, under each fixed regimen, under the oracle's best
regimen per patient (with and without the product's recommendation margin),
under the Bayes-optimal policy from the clinical table alone, and under the
Bayes-optimal policy from the clinical table plus a perfect read of the
predictive biomarker (hypoxia); each as its share of the oracle's gain over
the best fixed regimen (:func:`shared_model.policy.share_of_oracle_gain`).
Also the AUC ceilings on the received regimen and the trial-scale effects the
response model implies. Written into ``cohort.json`` by ``moefl synth``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from shared_model.clinical import REGIMENS
from shared_model.policy import RecommendationRule, recommend, share_of_oracle_gain
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
    patients: list[Patient], world: World, margin: float = 0.05
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


def compute_scoreboard(world: World, margin: float = 0.05) -> dict[str, Any]:
    """Scoreboards of every cohort plus the regimen effects."""
    return {
        "margin": margin,
        "regimen_effects": regimen_effects(world),
        **{
            c: cohort_scoreboard(ps, world, margin) for c, ps in world.cohorts().items()
        },
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
    return "\n".join(lines)
