"""Centralised fitting for ``moefl train``: epoch by epoch on one poly schedule
(:func:`fit`, joint training) or staged, the backbone on segmentation and then
the heads over cached tumour features (:func:`fit_staged`); each epoch's record
goes into the run's training record."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import ConcatDataset

from client.data.dataset import SiteDataset
from client.data.site_config import SiteConfig
from client.training.engine import EvalResult, TrainConfig, evaluate, train_local
from client.training.heads import HeadConfig, train_heads
from multisite.local_advice import site_features
from shared_model.loss import LossConfig
from shared_model.model import UNetMoECli
from shared_model.parameter_groups import is_head_parameter
from shared_model.plan import Plan

Echo = Callable[[str], None]


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
