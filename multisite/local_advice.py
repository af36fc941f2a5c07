"""The Newton-fitted head, its posterior and the advice rule for a model
trained in one place (``moefl train``: local-only or pooled), by the same
functions a federation uses (:mod:`shared_model.posterior`,
:mod:`shared_model.rule_choice`): the pooled comparator of a Newton
federation differs from it only in how its backbone was trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from client.data.dataset import SiteDataset
from client.data.site_config import SiteConfig
from client.scoring.evaluation import evaluate_dataset
from client.training.feature_cache import FeatureSet, eval_view, load_or_build
from shared_model.clinical import REGIMENS
from shared_model.layout import FEATURE_CACHE
from shared_model.model import UNetMoECli, build_model
from shared_model.plan import Plan
from shared_model.policy import GUIDELINE, RecommendationRule
from shared_model.posterior import (
    Posterior,
    fit_pooled,
    glm_sums,
    recalibrate,
    recalibration_step,
)
from shared_model.rule_choice import CandidateSums, candidate_rules, choose

PRIORS = (0.3, 1.0, 3.0, 10.0, 30.0)


def site_features(
    model: UNetMoECli,
    configs: Sequence[SiteConfig],
    datasets: Sequence[SiteDataset],
    plan: Plan,
    name: str,
    device: torch.device,
) -> FeatureSet:
    """The sites' cached tumour features (``name``: the cache's split) as one set."""
    return FeatureSet.concat(
        [
            load_or_build(
                c.run_dir / FEATURE_CACHE,
                name,
                model,
                plan,
                eval_view(d, plan, c.adc_scale),
                device=device,
            )[0]
            for c, d in zip(configs, datasets, strict=True)
        ]
    )


def fit_head_locally(
    model: UNetMoECli,
    configs: Sequence[SiteConfig],
    trains: Sequence[SiteDataset],
    vals: Sequence[SiteDataset],
    plan: Plan,
    *,
    device: torch.device,
    priors: Sequence[float] = PRIORS,
) -> tuple[UNetMoECli, Posterior, dict[str, Any]]:
    """Standardise, fit every prior, keep the one with the lowest validation
    log-loss, recalibrate on validation; the model with the fitted head."""
    train = site_features(model, configs, trains, plan, "train-local", device)
    val = site_features(model, configs, vals, plan, "val-local", device)
    raw = train.features.double().numpy()
    mean, sd = raw.mean(axis=0), raw.std(axis=0)
    sd = np.where(sd > 1e-6 * (np.abs(mean) + 1.0), sd, 1.0)
    cfg = dataclasses.replace(
        model.config,
        feature_centre=tuple(float(x) for x in mean),
        feature_scale=tuple(float(x) for x in sd),
    )
    fitted = build_model(cfg)
    fitted.load_state_dict(model.state_dict())
    with torch.no_grad():
        zt = fitted.head_input(train.features, train.clinical).double().numpy()
        zv = fitted.head_input(val.features, val.clinical).double().numpy()
    at, yt = train.regimen.numpy(), train.pcr.numpy()
    av, yv = val.regimen.numpy(), val.pcr.numpy()
    nv = int((~np.isnan(yv)).sum())
    fits = [fit_pooled(zt, at, yt, lam)[0] for lam in priors]
    losses = [-glm_sums(zv, av, yv, p.mean).loglik / max(nv, 1) for p in fits]
    best = int(np.argmin(losses))
    posterior = fits[best]
    theta = np.array([1.0, 0.0])
    for _ in range(25):
        s = glm_sums(zv, av, yv, recalibrate(posterior.mean, *theta))
        new = recalibration_step(posterior.mean, theta, s.grad, s.hess)
        done = float(np.max(np.abs(new - theta))) < 1e-6
        theta = new
        if done:
            break
    posterior = posterior.recalibrated(float(theta[0]), float(theta[1]))
    fitted.set_glm_coefficients(posterior.mean)
    record = {
        "lam": priors[best],
        "priors": [
            {"lam": lam, "validation_log_loss": v}
            for lam, v in zip(priors, losses, strict=True)
        ],
        "recalibration": {"slope": float(theta[0]), "shift": float(theta[1])},
        "expert_support": {
            r: int(((at == j) & ~np.isnan(yt)).sum()) for j, r in enumerate(REGIMENS)
        },
    }
    return fitted, posterior, record


def choose_rule_locally(
    model: UNetMoECli,
    configs: Sequence[SiteConfig],
    trains: Sequence[SiteDataset],
    vals: Sequence[SiteDataset],
    posterior: Posterior,
    *,
    device: torch.device,
    fixed_q: float | None = None,
) -> tuple[RecommendationRule, list[dict[str, Any]]]:
    """The switch rule chosen on the validation patients, as a federation
    chooses it (every regimen with training patients allowed)."""
    allowed = tuple(
        r
        for j, r in enumerate(REGIMENS)
        if any(j in t.regimen_indices() for t in trains)
    )
    guideline = GUIDELINE if GUIDELINE in allowed else allowed[-1]
    candidates = candidate_rules(allowed, guideline, posterior)
    total: list[CandidateSums] | None = None
    for config, train, val in zip(configs, trains, vals, strict=True):
        ev = evaluate_dataset(
            model,
            config.site_name,
            val,
            train.cases,
            cohort="validation",
            device=device,
            rule=candidates[0],
            candidates=candidates,
        )
        sums = ev.candidates or [CandidateSums() for _ in candidates]
        total = (
            sums if total is None else [a + b for a, b in zip(total, sums, strict=True)]
        )
    values = [c.value() for c in total or []]
    return choose(candidates, values, fixed_q=fixed_q, posterior=posterior)
