"""What a synthetic cohort holds, summarised for cohort.json: pCR rates by
regimen, the signal a clinical-only model finds (cross-validated AUC) against
the oracle's, and disease-free survival."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from shared_model.clinical import REGIMENS, encode_clinical
from simulations.cohort import Patient, World


def _clinical_features(patients: list[Patient]) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack(
        [
            np.concatenate(
                [encode_clinical(p.clinical), np.eye(3)[REGIMENS.index(p.regimen)]]
            )
            for p in patients
        ]
    )
    y = np.array([p.pcr for p in patients])
    return x, y


def compute_signal_aucs(
    retro: list[Patient], prosp: list[Patient], seed: int
) -> dict[str, float | None]:
    """AUCs that show how much signal the clinical table and the truth carry.

    * ``clinical_logreg_auc_cv``: 5-fold cross-validated AUC of a logistic
      regression on the clinical one-hot plus the received regimen
      (retrospective cohort).
    * ``clinical_logreg_auc_prospective``: the same model fitted on the whole
      retrospective cohort, scored on the prospective one.
    * ``oracle_auc`` / ``oracle_auc_prospective``: AUC of the true pCR
      probability under the received regimen: the ceiling any model can reach.
    """
    x, y = _clinical_features(retro)
    out: dict[str, float | None] = {}
    folds = min(5, int(min(y.sum(), len(y) - y.sum())))
    if folds >= 2:
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        scores = cross_val_predict(
            LogisticRegression(max_iter=2000), x, y, cv=cv, method="predict_proba"
        )[:, 1]
        out["clinical_logreg_auc_cv"] = round(float(roc_auc_score(y, scores)), 4)
    else:
        out["clinical_logreg_auc_cv"] = None
    oracle = np.array([p.prob[REGIMENS.index(p.regimen)] for p in retro])
    out["oracle_auc"] = (
        round(float(roc_auc_score(y, oracle)), 4) if 0 < y.sum() < len(y) else None
    )
    xp, yp = _clinical_features(prosp)
    if 0 < yp.sum() < len(yp) and 0 < y.sum() < len(y):
        model = LogisticRegression(max_iter=2000).fit(x, y)
        out["clinical_logreg_auc_prospective"] = round(
            float(roc_auc_score(yp, model.predict_proba(xp)[:, 1])), 4
        )
        oracle_p = np.array([p.prob[REGIMENS.index(p.regimen)] for p in prosp])
        out["oracle_auc_prospective"] = round(float(roc_auc_score(yp, oracle_p)), 4)
    else:
        out["clinical_logreg_auc_prospective"] = None
        out["oracle_auc_prospective"] = None
    return out


def regimen_rates(patients: list[Patient]) -> dict[str, dict[str, float | int]]:
    out: dict[str, dict[str, float | int]] = {}
    for r in REGIMENS:
        group = [p.pcr for p in patients if p.regimen == r]
        if group:
            out[r] = {
                "n": len(group),
                "pcr": int(sum(group)),
                "pcr_rate": round(float(np.mean(group)), 4),
            }
    return out


def dfs_summary(world: World) -> dict[str, Any]:
    """Observed DFS per cohort: events, median follow-up, and the 3-year DFS
    (Kaplan-Meier) after pCR and without, on the received regimens."""
    from shared_model.survival import SurvivalCounts, kaplan_meier

    out: dict[str, Any] = {}
    for cohort, patients in world.cohorts().items():
        if not patients:
            continue
        obs = [p.observed_dfs() for p in patients]
        entry: dict[str, Any] = {
            "events": int(sum(e for _, e in obs)),
            "median_follow_up_months": round(
                float(np.median([p.follow_up_months for p in patients])), 1
            ),
        }
        for label, y in (("after_pcr", 1), ("without_pcr", 0)):
            group = [o for o, p in zip(obs, patients, strict=True) if p.pcr == y]
            if not group:
                continue
            km = kaplan_meier(
                SurvivalCounts.from_times([t for t, _ in group], [e for _, e in group])
            )
            ci = km["dfs_3y_ci"]
            entry[f"dfs_3y_{label}"] = {
                "value": None if km["dfs_3y"] is None else round(km["dfs_3y"], 3),
                "ci": None if ci is None else [round(v, 3) for v in ci],
                "n": len(group),
            }
        out[cohort] = entry
    return out
