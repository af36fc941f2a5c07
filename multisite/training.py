"""``moefl train``: local-only and pooled (centralised) training with comparators.

One site YAML trains that site alone (the local-only baseline); several pool
their training splits into one (the centralised upper bound a federation is
measured against). Each site keeps its own persistent split, so the pooled
validation set is the union of the sites' validation splits.

A run folder holds ``model.safetensors``, ``plan.json``, ``config.json`` and
``training.json`` (:data:`TRAINING_RECORD`, read with :func:`read_training_record`:
per epoch: losses, Dice, AUC overall and per regimen; plus
the comparators trained on the same split: clinical-only logistic regression
and gradient boosting, and the image-only network).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from torch.utils.data import ConcatDataset

from client.data.dataset import SiteDataset, pooled_datasets
from client.data.site_config import SiteConfig, load_site_config
from client.training.engine import (
    CasePrediction,
    EvalResult,
    TrainConfig,
    evaluate,
    resolve_device,
    safe_auc,
    train_local,
)
from client.training.heads import HeadConfig, train_heads
from multisite.local_advice import choose_rule_locally, fit_head_locally, site_features
from shared_model.checkpoint import save_checkpoint
from shared_model.clinical import REGIMENS, encode_clinical
from shared_model.durable import json_bytes, write_atomic
from shared_model.errors import ConfigError
from shared_model.layout import cohort_of
from shared_model.loss import LossConfig
from shared_model.model import ModelConfig, UNetMoECli, build_model, is_head_parameter
from shared_model.plan import PLAN_FILE, Plan, plan_file
from shared_model.policy import RecommendationRule

log = logging.getLogger(__name__)

Echo = Callable[[str], None]


TRAINING_RECORD = "training.json"
"""Local and pooled training's record in its run folder (per epoch, the final
scores, the comparators)."""


def read_training_record(folder: Path) -> dict[str, Any]:
    """The training record in ``folder``; ConfigError names the file when it is
    missing or unreadable."""
    path = Path(folder) / TRAINING_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from e
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: not a training record")
    return record


@dataclass
class TrainRun:
    """What :func:`run_training` wrote."""

    out: Path
    metrics: dict[str, Any]
    model: UNetMoECli


def find_plan(site_yamls: Sequence[Path], plan_path: Path | None) -> Plan:
    """The plan to use: ``plan_path`` if given, else the plan of the synthetic
    cohort whose ``site_configs/`` holds the first YAML, else the default (demo)
    plan (:func:`shared_model.plan.plan_file`)."""
    found = plan_file(plan_path, cohort_of(site_yamls[0]))
    if found is not None:
        return Plan.load(found)
    log.warning(
        "no --plan given and no %s beside the site configs; using the default plan %s",
        PLAN_FILE,
        Plan(),
    )
    return Plan()


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


def _epoch_record(
    epoch: int, train_res: Any, ev: EvalResult, seconds: float
) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "train_loss": round(train_res.loss, 5),
        "seg_loss": round(train_res.seg_loss, 5),
        "pcr_loss": round(train_res.pcr_loss, 5),
        "val_loss": ev.metrics["loss"],
        "dice": ev.metrics["dice"],
        "auc": ev.metrics["auc"],
        "auc_by_regimen": ev.metrics["auc_by_regimen"],
        "lr": train_res.final_lr,
        "seconds": round(seconds, 2),
    }


def fit(
    model: UNetMoECli,
    train: Any,
    val: Any,
    cfg: TrainConfig,
    *,
    device: torch.device,
    echo: Echo,
    label: str,
    trainable: set[str] | None = None,
) -> tuple[list[dict[str, Any]], EvalResult]:
    """Train epoch by epoch on one poly schedule, evaluating after each epoch
    (``trainable``: the parameters to train, default all)."""
    steps_per_epoch = max(1, -(-len(train) // cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    history: list[dict[str, Any]] = []
    ev = evaluate(model, val, device=device, loss_cfg=cfg.loss)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        epoch_cfg = TrainConfig(
            **{**cfg.__dict__, "epochs": 1, "max_steps": None, "seed": cfg.seed + epoch}
        )
        res = train_local(
            model,
            train,
            epoch_cfg,
            device=device,
            trainable=trainable,
            schedule=((epoch - 1) * steps_per_epoch, total),
        )
        ev = evaluate(model, val, device=device, loss_cfg=cfg.loss)
        rec = _epoch_record(epoch, res, ev, time.perf_counter() - t0)
        history.append(rec)
        auc = "n/a" if rec["auc"] is None else f"{rec['auc']:.3f}"
        dice = "n/a" if rec["dice"] is None else f"{rec['dice']:.3f}"
        echo(
            f"[{label}] epoch {epoch}/{cfg.epochs}: loss {rec['train_loss']:.3f} "
            f"(seg {rec['seg_loss']:.3f}, pcr {rec['pcr_loss']:.3f}), val Dice {dice}, "
            f"val AUC {auc}, {rec['seconds']:.0f} s"
        )
    return history, ev


def fit_staged(
    model: UNetMoECli,
    configs: Sequence[SiteConfig],
    trains: Sequence[SiteDataset],
    val: Any,
    cfg: TrainConfig,
    head: HeadConfig,
    *,
    plan: Plan,
    device: torch.device,
    echo: Echo,
    backbone_of: UNetMoECli | None = None,
) -> tuple[list[dict[str, Any]], EvalResult]:
    """Staged training: the backbone on segmentation alone for ``cfg.epochs``
    epochs (or copied from ``backbone_of``), then the heads over each site's
    cached tumour features for ``head.epochs`` epochs (the centralised
    counterpart of a staged federation)."""
    seg_cfg = TrainConfig(**{**cfg.__dict__, "loss": LossConfig(pcr_weight=0.0)})
    backbone = {n for n, _ in model.named_parameters() if not is_head_parameter(n)}
    train: Any = trains[0] if len(trains) == 1 else ConcatDataset(list(trains))
    history: list[dict[str, Any]] = []
    if backbone_of is None:
        history, _ = fit(
            model,
            train,
            val,
            seg_cfg,
            device=device,
            echo=echo,
            label="segmentation",
            trainable=backbone,
        )
    else:
        state = backbone_of.state_dict()
        model.load_state_dict(
            {k: v for k, v in state.items() if k in backbone}, strict=False
        )
    t0 = time.perf_counter()
    features = site_features(model, configs, trains, plan, "train-local", device)
    res = train_heads(model, features, head)
    ev = evaluate(model, val, device=device, loss_cfg=cfg.loss)
    rec = _epoch_record(len(history) + 1, res, ev, time.perf_counter() - t0)
    rec["stage"] = "heads"
    history.append(rec)
    auc = "n/a" if rec["auc"] is None else f"{rec['auc']:.3f}"
    echo(
        f"[heads] {head.epochs} epochs over {len(features)} patients' cached "
        f"features: loss {res.loss:.3f}, val AUC {auc}, {rec['seconds']:.0f} s"
    )
    return history, ev


def run_training(
    site_yamls: Sequence[Path],
    out: Path,
    *,
    cfg: TrainConfig,
    plan: Plan,
    model_overrides: dict[str, Any] | None = None,
    image_only: bool = True,
    device: str | None = None,
    training: str = "staged",
    head: HeadConfig | None = None,
    head_fit: str = "rounds",
    echo: Echo = lambda s: None,
) -> TrainRun:
    """Train on one site (local-only) or several pooled (centralised).

    Args:
        site_yamls: one or more site YAMLs (checked with ``moefl check``).
        out: run folder (created; an existing model there is replaced).
        cfg: optimisation settings (epochs, batch size, ...).
        plan: spacing and patch.
        model_overrides: :class:`ModelConfig` fields to change (filters, ...).
        image_only: also train the image-only comparator (no clinical input).
        device: overrides the first site's ``device``.
        training: ``staged`` (segmentation for ``cfg.epochs`` epochs, then the
            heads over cached features, :func:`fit_staged`) or ``joint`` (the
            study's multi-task training for ``cfg.epochs`` epochs).
        head: head optimisation when staged (``epochs`` is the total).
        head_fit: ``newton`` (staged, linear head): after the backbone, the
            head is the pooled Bayesian logistic regression with its posterior
            and the advice rule chosen on the validation splits, as a Newton
            federation fits it (:mod:`multisite.local_advice`); ``rounds``: the
            head trained by AdamW alone.
        echo: progress lines.
    """
    configs, names = _training_sites(site_yamls)
    torch.manual_seed(cfg.seed)
    dev = resolve_device(device or configs[0].device)
    trains, vals, train, val = pooled_datasets(
        configs, plan, seed=cfg.seed, augment=cfg.augment
    )
    mode = "local" if len(configs) == 1 else "pooled"
    echo(
        f"{mode} training on {', '.join(names)}: {len(train)} train / {len(val)} "
        f"validation patients, device {dev}"
    )

    if training not in ("staged", "joint"):
        raise ConfigError(f"training {training!r}: expected staged or joint")
    if head_fit not in ("rounds", "newton"):
        raise ConfigError(f"head fit {head_fit!r}: expected rounds or newton")
    overrides = dict(model_overrides or {})
    if head_fit == "newton":  # a logistic regression: the linear residual head
        overrides |= {"head": "linear", "expert_hidden": 0, "experts": "residual"}
    model_cfg = ModelConfig.from_plan(plan, **overrides)
    model = build_model(model_cfg)
    t0 = time.perf_counter()
    head = head or HeadConfig(epochs=200, seed=cfg.seed)
    if training == "staged":
        history, final = fit_staged(
            model, configs, trains, val, cfg, head, plan=plan, device=dev, echo=echo
        )
    else:
        history, final = fit(model, train, val, cfg, device=dev, echo=echo, label=mode)
    rule = None
    if training == "staged" and head_fit == "newton":
        model, rule = _newton_head(model, configs, trains, vals, plan, dev, echo)
    seconds = time.perf_counter() - t0
    out = Path(out)
    support = Counter(REGIMENS[r] for t in trains for r in t.regimen_indices())
    save_checkpoint(
        model,
        out,
        plan=plan,
        rule=rule,
        extra_config={
            "train": cfg.to_dict(),
            "training": training,
            "head": asdict(head) if training == "staged" else None,
            "sites": names,
            "mode": mode,
            "expert_support": {r: support.get(r, 0) for r in REGIMENS},
        },
    )

    comparators = clinical_comparators(train, val, seed=cfg.seed)
    if image_only:
        comparators["image_only"] = _image_only(
            model,
            configs,
            trains,
            train,
            val,
            cfg,
            head,
            plan=plan,
            model_overrides=model_overrides,
            training=training,
            device=dev,
            echo=echo,
        )
    n_params = sum(p.numel() for p in model.parameters())
    metrics = {
        "mode": mode,
        "sites": names,
        "n_train": len(train),
        "n_val": len(val),
        "n_parameters": n_params,
        "device": str(dev),
        "train_seconds": round(seconds, 1),
        "epochs": history,
        "final": final.metrics,
        "comparators": comparators,
    }
    write_atomic(out / TRAINING_RECORD, json_bytes(metrics))
    _write_predictions(out / "val_predictions.csv", final.cases)
    return TrainRun(out=out, metrics=metrics, model=model)


def _training_sites(
    site_yamls: Sequence[Path],
) -> tuple[list[SiteConfig], list[str]]:
    """The site configs (each of role train) and their distinct names."""
    configs: list[SiteConfig] = [load_site_config(Path(p)) for p in site_yamls]
    if any(c.role != "train" for c in configs):
        raise ConfigError("every site passed to `moefl train` needs role: train")
    names = [c.site_name for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"site names repeat: {names}")
    return configs, names


def _newton_head(
    model: UNetMoECli,
    configs: list[SiteConfig],
    trains: list[SiteDataset],
    vals: list[SiteDataset],
    plan: Plan,
    dev: torch.device,
    echo: Echo,
) -> tuple[UNetMoECli, RecommendationRule]:
    """The pooled Newton head fit and the advice rule chosen on the
    validation splits (:mod:`multisite.local_advice`)."""
    model, posterior, fit_record = fit_head_locally(
        model, configs, trains, vals, plan, device=dev
    )
    rule, _ = choose_rule_locally(model, configs, trains, vals, posterior, device=dev)
    echo(
        f"[heads] Newton fit (prior {fit_record['lam']:g}, recalibrated "
        f"slope {fit_record['recalibration']['slope']:.2f}); advice: "
        f"{rule.describe()}"
    )
    return model, rule


def _image_only(
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


def _write_predictions(path: Path, cases: list[CasePrediction]) -> None:
    """Per-case validation predictions: local runs only (never sent anywhere)."""
    lines = ["case_id,regimen,pCR,p_nCRT,p_TNT,p_nCT,dice"]
    for c in cases:
        pcr = "" if np.isnan(c.pcr) else str(int(c.pcr))
        dice = "" if c.dice is None else f"{c.dice:.4f}"
        lines.append(
            f"{c.case_id},{REGIMENS[c.regimen]},{pcr},"
            + ",".join(f"{p:.5f}" for p in c.probs)
            + f",{dice}"
        )
    path.write_text("\n".join(lines) + "\n")
