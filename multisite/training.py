"""``moefl train``: local-only and pooled (centralised) training with comparators.

One site YAML trains that site alone (the local-only baseline); several pool
their training splits into one (the centralised upper bound a federation is
measured against). Each site keeps its own persistent split, so the pooled
validation set is the union of the sites' validation splits.

A run folder holds ``model.safetensors``, ``plan.json``, ``config.json`` and
``training.json`` (:data:`TRAINING_RECORD`, read with :func:`read_training_record`:
per epoch: losses, Dice, AUC overall and per regimen; plus
the comparators trained on the same split: clinical-only logistic regression
and gradient boosting (:mod:`multisite.comparators`), and the image-only
network). The fitting itself, joint or staged, is :mod:`multisite.fitting`'s.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.data.dataset import SiteDataset, pooled_datasets
from client.data.site_config import SiteConfig, load_site_config
from client.training.engine import (
    CasePrediction,
    EvalResult,
    TrainConfig,
    resolve_device,
)
from client.training.heads import HeadConfig
from multisite.comparators import clinical_comparators, image_only_comparator
from multisite.fitting import Echo, fit, fit_staged
from multisite.local_advice import choose_rule_locally, fit_head_locally
from shared_model.checkpoint import save_checkpoint
from shared_model.clinical import REGIMENS
from shared_model.durable import json_bytes, read_record, write_atomic
from shared_model.errors import ConfigError
from shared_model.layout import cohort_of
from shared_model.model import UNetMoECli, build_model
from shared_model.model_config import ModelConfig
from shared_model.plan import PLAN_FILE, Plan, plan_file
from shared_model.policy import RecommendationRule

log = logging.getLogger(__name__)


TRAINING_RECORD = "training.json"
"""Local and pooled training's record in its run folder (per epoch, the final
scores, the comparators)."""


def read_training_record(folder: Path) -> dict[str, Any]:
    """The training record in ``folder``; ConfigError names the file when it is
    missing or unreadable."""
    return read_record(Path(folder) / TRAINING_RECORD, "a training record")


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
            heads over cached features, :func:`multisite.fitting.fit_staged`) or ``joint`` (the
            study's multi-task training for ``cfg.epochs`` epochs).
        head: head optimisation when staged (``epochs`` is the total).
        head_fit: ``newton`` (staged, linear head): after the backbone, the
            head is the pooled Bayesian logistic regression with its posterior
            and the advice rule chosen on the validation splits, as a Newton
            federation fits it (:mod:`multisite.local_advice`); ``rounds``: the
            head trained by AdamW alone.
        echo: progress lines.
    """
    pool, dev = _load_pool(site_yamls, cfg, plan, device, echo)
    model = _new_model(plan, model_overrides, training=training, head_fit=head_fit)
    t0 = time.perf_counter()
    head = head or HeadConfig(epochs=200, seed=cfg.seed)
    history, final = _fit_network(
        model, pool, cfg, head, plan=plan, training=training, device=dev, echo=echo
    )
    rule = None
    if training == "staged" and head_fit == "newton":
        model, rule = _newton_head(
            model, pool.configs, pool.trains, pool.vals, plan, dev, echo
        )
    seconds = time.perf_counter() - t0
    out = Path(out)
    save_checkpoint(
        model,
        out,
        plan=plan,
        rule=rule,
        extra_config=_run_config(pool, cfg, training, head),
    )
    comparators = clinical_comparators(pool.train, pool.val, seed=cfg.seed)
    if image_only:
        comparators["image_only"] = image_only_comparator(
            model,
            pool.configs,
            pool.trains,
            pool.train,
            pool.val,
            cfg,
            head,
            plan=plan,
            model_overrides=model_overrides,
            training=training,
            device=dev,
            echo=echo,
        )
    metrics = _training_metrics(pool, model, dev, seconds, history, final, comparators)
    write_atomic(out / TRAINING_RECORD, json_bytes(metrics))
    _write_predictions(out / "val_predictions.csv", final.cases)
    return TrainRun(out=out, metrics=metrics, model=model)


@dataclass
class _Pool:
    """The training sites and their splits: each site's and the pooled ones."""

    configs: list[SiteConfig]
    names: list[str]
    trains: list[SiteDataset]
    vals: list[SiteDataset]
    train: Any
    val: Any

    @property
    def mode(self) -> str:
        """``local`` (one site) or ``pooled`` (several)."""
        return "local" if len(self.configs) == 1 else "pooled"


def _load_pool(
    site_yamls: Sequence[Path],
    cfg: TrainConfig,
    plan: Plan,
    device: str | None,
    echo: Echo,
) -> tuple[_Pool, torch.device]:
    """The sites' datasets (torch seeded first) and the device, announced."""
    configs, names = _training_sites(site_yamls)
    torch.manual_seed(cfg.seed)
    dev = resolve_device(device or configs[0].device)
    trains, vals, train, val = pooled_datasets(
        configs, plan, seed=cfg.seed, augment=cfg.augment
    )
    pool = _Pool(configs, names, trains, vals, train, val)
    echo(
        f"{pool.mode} training on {', '.join(names)}: {len(train)} train / "
        f"{len(val)} validation patients, device {dev}"
    )
    return pool, dev


def _new_model(
    plan: Plan,
    model_overrides: dict[str, Any] | None,
    *,
    training: str,
    head_fit: str,
) -> UNetMoECli:
    """The network to train, once ``training`` and ``head_fit`` are checked
    (``newton``: a logistic regression, the linear residual head)."""
    if training not in ("staged", "joint"):
        raise ConfigError(f"training {training!r}: expected staged or joint")
    if head_fit not in ("rounds", "newton"):
        raise ConfigError(f"head fit {head_fit!r}: expected rounds or newton")
    overrides = dict(model_overrides or {})
    if head_fit == "newton":  # a logistic regression: the linear residual head
        overrides |= {"head": "linear", "expert_hidden": 0, "experts": "residual"}
    return build_model(ModelConfig.from_plan(plan, **overrides))


def _fit_network(
    model: UNetMoECli,
    pool: _Pool,
    cfg: TrainConfig,
    head: HeadConfig,
    *,
    plan: Plan,
    training: str,
    device: torch.device,
    echo: Echo,
) -> tuple[list[dict[str, Any]], EvalResult]:
    """Staged (:func:`fit_staged`) or joint (:func:`fit`) training on the pool."""
    if training == "staged":
        return fit_staged(
            model,
            pool.configs,
            pool.trains,
            pool.val,
            cfg,
            head,
            plan=plan,
            device=device,
            echo=echo,
        )
    return fit(
        model, pool.train, pool.val, cfg, device=device, echo=echo, label=pool.mode
    )


def _run_config(
    pool: _Pool, cfg: TrainConfig, training: str, head: HeadConfig
) -> dict[str, Any]:
    """What the checkpoint's ``config.json`` records of the run beside the model:
    the settings, the sites and each expert's training support."""
    support = Counter(REGIMENS[r] for t in pool.trains for r in t.regimen_indices())
    return {
        "train": cfg.to_dict(),
        "training": training,
        "head": asdict(head) if training == "staged" else None,
        "sites": pool.names,
        "mode": pool.mode,
        "expert_support": {r: support.get(r, 0) for r in REGIMENS},
    }


def _training_metrics(
    pool: _Pool,
    model: UNetMoECli,
    device: torch.device,
    seconds: float,
    history: list[dict[str, Any]],
    final: EvalResult,
    comparators: dict[str, Any],
) -> dict[str, Any]:
    """The training record (:data:`TRAINING_RECORD`): the run, each epoch, the
    final scores and the comparators'."""
    return {
        "mode": pool.mode,
        "sites": pool.names,
        "n_train": len(pool.train),
        "n_val": len(pool.val),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "train_seconds": round(seconds, 1),
        "epochs": history,
        "final": final.metrics,
        "comparators": comparators,
    }


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
