"""The comparators ``moefl train`` fits on the same split as the network: the
clinical-only logistic regression and gradient boosting
(:func:`clinical_comparators`) and the image-only network
(:func:`image_only_comparator`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from torch.utils.data import ConcatDataset

from client.data.dataset import SiteDataset
from client.data.site_config import SiteConfig
from client.training.engine import TrainConfig, safe_auc
from client.training.heads import HeadConfig
from multisite.fitting import Echo, fit, fit_staged
from shared_model.clinical import REGIMENS, encode_clinical
from shared_model.model import UNetMoECli, build_model
from shared_model.model_config import ModelConfig
from shared_model.plan import Plan


def _clinical_features(
    ds: SiteDataset | ConcatDataset[Any],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    parts: list[Any] = [ds] if isinstance(ds, SiteDataset) else list(ds.datasets)
    cases = [c for d in parts for c in d.cases]
    x = np.stack(
        [
            np.concatenate(
                [
                    encode_clinical(c.clinical.features),
                    np.eye(3)[c.clinical.regimen_index],
                ]
            )
            for c in cases
        ]
    )
    y = np.array([c.clinical.pcr for c in cases], dtype=float)
    reg = np.array([c.clinical.regimen_index for c in cases])
    return x, y, reg


def clinical_comparators(train: Any, val: Any, *, seed: int) -> dict[str, Any]:
    """Clinical-only logistic regression and gradient boosting on the same split.

    Features: the 15-value clinical one-hot plus the received regimen.
    """
    x_tr, y_tr, _ = _clinical_features(train)
    x_va, y_va, r_va = _clinical_features(val)
    out: dict[str, Any] = {}
    models = {
        "clinical_logreg": LogisticRegression(max_iter=2000),
        "clinical_gbm": HistGradientBoostingClassifier(
            max_iter=100, learning_rate=0.05, max_depth=3, random_state=seed
        ),
    }
    for name, model in models.items():
        if len(np.unique(y_tr)) < 2:
            out[name] = {"auc": None, "auc_by_regimen": {}}
            continue
        score = model.fit(x_tr, y_tr).predict_proba(x_va)[:, 1]
        out[name] = {
            "auc": safe_auc(y_va, score),
            "auc_by_regimen": {
                r: safe_auc(y_va[r_va == j], score[r_va == j])
                for j, r in enumerate(REGIMENS)
                if (r_va == j).any()
            },
        }
    return out


def image_only_comparator(
    model: UNetMoECli,
    configs: list[SiteConfig],
    trains: list[SiteDataset],
    train: Any,
    val: Any,
    cfg: TrainConfig,
    head: HeadConfig,
    *,
    plan: Plan,
    model_overrides: dict[str, Any] | None,
    training: str,
    device: torch.device,
    echo: Echo,
) -> dict[str, Any]:
    """Train the image-only comparator (no clinical input; staged: on
    ``model``'s backbone) and return its final AUCs and Dice."""
    torch.manual_seed(cfg.seed)
    img_model = build_model(
        ModelConfig.from_plan(
            plan, **{**(model_overrides or {}), "use_clinical": False}
        )
    )
    if training == "staged":
        _, img_final = fit_staged(
            img_model,
            configs,
            trains,
            val,
            cfg,
            head,
            plan=plan,
            device=device,
            echo=echo,
            backbone_of=model,
        )
    else:
        _, img_final = fit(
            img_model, train, val, cfg, device=device, echo=echo, label="image-only"
        )
    return {k: img_final.metrics[k] for k in ("auc", "auc_by_regimen", "dice")}
