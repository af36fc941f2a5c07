"""``moefl pretrain``: a segmentation backbone from public data.

Differential privacy covers what is trained on a site's patients. Tumour
features computed with a backbone that was trained on those patients without DP
would carry them past the budget, so a DP federation uses a backbone trained on
public data only, frozen, and trains the small pCR heads under DP over it.

The public data is either a public synthetic cohort (``moefl synth --preset
public``: its own random stream, no site holds its patients) or a public
dataset in the site layout, e.g. the Medical Segmentation Decathlon's prostate
task (T2W and ADC) after :func:`client.data.public_data.import_msd`. Training is
segmentation alone (Dice + CE) on every case's training split, with the
validation split's Dice reported; the artifact (:mod:`shared_model.backbone`)
records the source, the cases and that Dice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from client.data.dataset import build_site_datasets, pooled_datasets
from client.data.site_config import SiteConfig, load_site_config
from client.training.engine import TrainConfig, evaluate, resolve_device, train_local
from client.training.feature_cache import compute_features, eval_view
from shared_model.backbone import save_backbone
from shared_model.errors import ConfigError
from shared_model.loss import LossConfig
from shared_model.model import UNetMoECli, build_model
from shared_model.model_config import ModelConfig
from shared_model.parameter_groups import is_head_parameter
from shared_model.plan import Plan

Echo = Callable[[str], None]


def public_feature_stats(
    model: UNetMoECli, configs: Sequence[SiteConfig], plan: Plan, device: torch.device
) -> tuple[list[float], list[float]]:
    """Mean and standard deviation (at least 1e-3) of the tumour features over
    the public sites' training cases, from ``model``'s backbone."""
    parts = []
    for c in configs:
        train, _, _ = build_site_datasets(c, plan, cache=True)
        view = eval_view(train, plan, c.adc_scale)
        parts.append(compute_features(model, view, device=device).features)
    features = torch.cat(parts)
    return (
        features.mean(0).tolist(),
        features.std(0).clamp_min(1e-3).tolist(),
    )


@dataclass(frozen=True)
class Pretrained:
    """What :func:`pretrain` wrote."""

    path: Path
    sha256: str
    dice: float | None
    n_train: int
    n_val: int
    seconds: float


def pretrain(
    site_yamls: Sequence[Path],
    out: Path,
    *,
    cfg: TrainConfig,
    plan: Plan,
    source: str,
    model_overrides: dict[str, Any] | None = None,
    device: str | None = None,
    echo: Echo = lambda s: None,
) -> Pretrained:
    """Train the backbone on the public sites' training splits; write ``out``.

    Args:
        site_yamls: the public data's site YAMLs (``role: train``).
        out: the backbone artifact (``.safetensors``).
        cfg: optimisation (epochs, batch size, learning rate, seed).
        plan: the federation's plan (the backbone only fits networks built
            for it).
        source: what the data is, recorded in the artifact (e.g. "synthetic
            public cohort, seed 0" or "MSD Task05_Prostate").
        model_overrides: network widths (``base_filters``, ``max_filters``),
            as the federation will use them.
        device: overrides the first site's ``device``.
        echo: progress lines.
    """
    configs = [load_site_config(Path(p)) for p in site_yamls]
    if not configs:
        raise ConfigError("pretraining needs at least one public site YAML")
    if any(c.role not in ("train", "public") for c in configs):
        raise ConfigError("every public site YAML needs role: public (or train)")
    torch.manual_seed(cfg.seed)
    dev = resolve_device(device or configs[0].device)
    _, _, train, val = pooled_datasets(
        configs, plan, seed=cfg.seed, augment=cfg.augment
    )
    model = build_model(ModelConfig.from_plan(plan, **(model_overrides or {})))
    backbone = {n for n, _ in model.named_parameters() if not is_head_parameter(n)}
    seg = TrainConfig(**{**cfg.__dict__, "loss": LossConfig(pcr_weight=0.0)})
    echo(
        f"pretraining the backbone on {len(train)} public cases ({len(val)} for "
        f"validation), {cfg.epochs} epochs, device {dev}"
    )
    t0 = time.perf_counter()
    dice = _train_backbone(model, train, val, cfg, seg, dev, backbone, echo)
    seconds = time.perf_counter() - t0
    stats = public_feature_stats(model, configs, plan, dev)
    digest = save_backbone(
        model,
        Path(out),
        plan=plan,
        trained_on={
            "source": source,
            "public": True,
            "sites": [c.site_name for c in configs],
            "n_train": len(train),
            "n_val": len(val),
            "epochs": cfg.epochs,
            "seed": cfg.seed,
            "val_dice": dice,
        },
        feature_stats=stats,
    )
    return Pretrained(Path(out), digest, dice, len(train), len(val), seconds)


def _train_backbone(
    model: Any,
    train: Any,
    val: Any,
    cfg: TrainConfig,
    seg: TrainConfig,
    dev: torch.device,
    backbone: set[str],
    echo: Echo,
) -> float | None:
    """Train the ``backbone`` parameters for ``cfg.epochs`` one epoch at a
    time on the segmentation loss ``seg``; the last epoch's validation Dice."""
    steps_per_epoch = max(1, -(-len(train) // cfg.batch_size))
    dice: float | None = None
    for epoch in range(1, cfg.epochs + 1):
        res = train_local(
            model,
            train,
            TrainConfig(
                **{
                    **seg.__dict__,
                    "epochs": 1,
                    "max_steps": None,
                    "seed": cfg.seed + epoch,
                }
            ),
            device=dev,
            trainable=backbone,
            schedule=((epoch - 1) * steps_per_epoch, cfg.epochs * steps_per_epoch),
        )
        dice = evaluate(model, val, device=dev, loss_cfg=seg.loss).metrics["dice"]
        echo(
            f"[pretrain] epoch {epoch}/{cfg.epochs}: seg loss {res.seg_loss:.3f}, "
            f"val Dice {'n/a' if dice is None else f'{dice:.3f}'}"
        )
    return dice
