"""Local training and evaluation engine (site side, no Flower).

Plain functions that the federation later calls unchanged: train a model for a
number of local epochs or steps from given weights, evaluate it, and return
typed results. Optimisation follows nnU-Net: SGD with Nesterov momentum 0.99,
weight decay 3e-5, poly learning-rate decay (power 0.9) and gradient-norm
clipping at 12; AdamW is an option. Mixed precision runs on CUDA only.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.metrics import compute_dice
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Dataset

from client.training.local_steps import LocalSteps, collate
from shared_model.clinical import REGIMENS
from shared_model.errors import ConfigError
from shared_model.loss import LossConfig, MoELoss
from shared_model.model import UNetMoECli

if TYPE_CHECKING:
    from client.privacy.dp_sgd import PrivateRound, PrivateTraining

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation settings.

    Attributes:
        optimizer: "sgd" (nnU-Net: Nesterov, momentum 0.99) or "adamw".
        lr: initial learning rate.
        momentum: SGD momentum.
        weight_decay: L2 (SGD) or decoupled (AdamW) weight decay.
        poly_power: exponent of the poly learning-rate decay.
        batch_size: patients per step.
        epochs: passes over the training patients (ignored when ``max_steps``).
        max_steps: train for exactly this many steps instead of epochs.
        grad_clip: gradient-norm clip (0 disables).
        amp: mixed precision when training on CUDA.
        augment: MONAI spatial and intensity augmentation.
        seed: seeds shuffling, cropping and augmentation.
        loss: loss weights.
    """

    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_power: float = 0.9
    batch_size: int = 4
    epochs: int = 1
    max_steps: int | None = None
    grad_clip: float = 12.0
    amp: bool = True
    augment: bool = True
    seed: int = 0
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"`optimizer` is {self.optimizer!r}; expected one of {OPTIMIZERS}"
            )
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 1:
            raise ConfigError("`lr` must be > 0, `batch_size` and `epochs` >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("`max_steps` must be >= 1 when given")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here")
    return torch.device(name)


@dataclass
class TrainResult:
    """What one local training call did."""

    steps: int
    epochs_done: float
    seconds: float
    loss: float
    seg_loss: float
    pcr_loss: float
    n_cases: int
    n_by_regimen: dict[str, int]
    final_lr: float


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: TrainConfig
) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
        weight_decay=cfg.weight_decay,
    )


def train_local(
    model: UNetMoECli,
    dataset: Any,
    cfg: TrainConfig,
    *,
    device: torch.device,
    trainable: set[str] | None = None,
    schedule: tuple[int, int] | None = None,
    extra_loss: Callable[[UNetMoECli], torch.Tensor] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    dp: PrivateRound | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``dataset``.

    Args:
        model: the network (moved to ``device``).
        dataset: one sample per patient (:class:`client.data.dataset.SiteDataset`).
        cfg: optimisation settings.
        device: where to train.
        trainable: names of the parameters to train; the others are frozen
            (``requires_grad`` off, not in the optimiser). ``None``: all.
        schedule: ``(start_step, total_steps)`` of a poly schedule that spans
            several calls (federated rounds); default: this call alone.
        extra_loss: added to the loss each step (e.g. FedProx's proximal term).
            Under DP it depends on no patient, so its gradient is added after
            clipping and noise.
        on_step: called as ``on_step(step, loss)`` after each step.
        dp: train with DP-SGD (a :class:`client.privacy.dp_sgd.PrivateRound`
            from the site's privacy): ``dp.dp.steps`` steps on Poisson batches,
            per-patient clipping and noise, fp32 (opacus's per-sample gradients
            do not run under autocast); ``cfg``'s steps and clip are unused.
    """
    model.to(device).train()
    for name, p in model.named_parameters():
        p.requires_grad_(trainable is None or name in trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    private = None if dp is None else dp.wrap(model, optimizer)
    if private is not None:
        optimizer = private.optimizer
        if extra_loss is not None:  # added after clipping and noise
            data_free = extra_loss
            private.add_data_free_loss(lambda: data_free(model), params)
            extra_loss = None
    loader, n_steps = _loader(dataset, cfg, private)
    steps = LocalSteps(
        model,
        optimizer,
        device=device,
        params=params,
        lr=cfg.lr,
        poly_power=cfg.poly_power,
        grad_clip=cfg.grad_clip,
        amp=cfg.amp,
        loss=cfg.loss,
        private=private,
        extra_loss=extra_loss,
    )
    t0 = time.perf_counter()
    try:
        steps.run(loader, n_steps, schedule or (0, n_steps), on_step)
    finally:
        if private is not None:
            optimizer.zero_grad(set_to_none=True)
            private.close()
        for p in model.parameters():
            p.requires_grad_(True)
    regimens = Counter(REGIMENS[int(r)] for r in _regimens_of(dataset))
    return TrainResult(
        steps=steps.step,
        epochs_done=steps.step / _steps_per_epoch(dataset, cfg),
        seconds=time.perf_counter() - t0,
        loss=steps.mean("loss"),
        seg_loss=steps.mean("seg"),
        pcr_loss=steps.mean("pcr"),
        n_cases=len(dataset),
        n_by_regimen={r: regimens.get(r, 0) for r in REGIMENS},
        final_lr=steps.lr,
    )


def _steps_per_epoch(dataset: Any, cfg: TrainConfig) -> int:
    return max(1, math.ceil(len(dataset) / cfg.batch_size))


def _loader(
    dataset: Any, cfg: TrainConfig, private: PrivateTraining | None
) -> tuple[DataLoader[Any], int]:
    """Batches of patients and the number of steps: shuffled batches of
    ``cfg.batch_size`` for the epochs or ``max_steps``, or under DP the
    round's Poisson batches for its steps."""
    if private is not None:
        batches = private.batch_sampler(len(dataset))
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate)
        return loader, private.dp.steps
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
        collate_fn=collate,
        drop_last=False,
    )
    return loader, cfg.max_steps or cfg.epochs * _steps_per_epoch(dataset, cfg)


def _regimens_of(dataset: Any) -> list[int]:
    """Regimen indices of a dataset's patients, without loading images."""
    if hasattr(dataset, "regimen_indices"):
        return list(dataset.regimen_indices())
    if hasattr(dataset, "datasets"):  # ConcatDataset
        return [r for d in dataset.datasets for r in _regimens_of(d)]
    return [int(dataset[i]["regimen"]) for i in range(len(dataset))]


@dataclass
class CasePrediction:
    """One patient's evaluation output. Stays on the site."""

    case_id: str
    regimen: int
    pcr: float
    probs: list[float]  # pCR probability under nCRT, TNT, nCT
    dice: float | None
    loss: float


@dataclass
class EvalResult:
    """Aggregate metrics plus per-case predictions (local use only)."""

    metrics: dict[str, Any]
    cases: list[CasePrediction]


def safe_auc(y: Iterable[float], score: Iterable[float]) -> float | None:
    """ROC AUC, or None when only one class is present."""
    y_arr, s_arr = (
        np.asarray(list(y), dtype=float),
        np.asarray(list(score), dtype=float),
    )
    if len(y_arr) == 0 or len(np.unique(y_arr)) < 2:
        return None
    return float(roc_auc_score(y_arr, s_arr))


def summarise_predictions(cases: list[CasePrediction]) -> dict[str, Any]:
    """AUC overall and per regimen (received regimen's probability), Dice, loss."""
    known = [c for c in cases if not math.isnan(c.pcr)]
    received = [c.probs[c.regimen] for c in known]
    out: dict[str, Any] = {
        "n": len(cases),
        "auc": safe_auc([c.pcr for c in known], received),
        "auc_by_regimen": {},
        "loss": float(np.mean([c.loss for c in cases])) if cases else None,
    }
    for j, r in enumerate(REGIMENS):
        group = [c for c in known if c.regimen == j]
        if group:
            out["auc_by_regimen"][r] = safe_auc(
                [c.pcr for c in group], [c.probs[j] for c in group]
            )
    dice = [c.dice for c in cases if c.dice is not None]
    out["dice"] = float(np.mean(dice)) if dice else None
    return out


@torch.no_grad()
def evaluate(
    model: UNetMoECli,
    dataset: Dataset[dict[str, Any]],
    *,
    device: torch.device,
    batch_size: int = 4,
    loss_cfg: LossConfig | None = None,
) -> EvalResult:
    """Evaluate on tumour-centred validation crops.

    Returns:
        Metrics (AUC overall and per regimen, mean Dice, loss) and the
        per-case predictions, which never leave the site.
    """
    model.to(device).eval()
    loss_fn = MoELoss(loss_cfg)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate
    )
    cases: list[CasePrediction] = []
    for batch in loader:
        image = batch["image"].to(device)
        out = model(image, batch["clinical"].to(device), batch["regimen"].to(device))
        probs = torch.sigmoid(out.pcr_logits.float()).cpu()
        has_label = "label" in batch
        if has_label:
            label = batch["label"].to(device)
            pred = out.seg_logits.argmax(dim=1, keepdim=True)
            pred_1h = torch.cat([pred == 0, pred == 1], dim=1).float()
            lab_1h = torch.cat([label == 0, label == 1], dim=1).float()
            dice = compute_dice(
                pred_1h, lab_1h, include_background=False, ignore_empty=True
            )[:, 0].cpu()
        for i, case_id in enumerate(batch["case_id"]):
            per_loss = float("nan")
            if has_label:
                single = out._replace(
                    seg_logits=out.seg_logits[i : i + 1],
                    pcr_logits=out.pcr_logits[i : i + 1],
                    gated_logit=out.gated_logit[i : i + 1],
                )
                per_loss = float(
                    loss_fn(
                        single, label[i : i + 1], batch["pcr"][i : i + 1].to(device)
                    )[0]
                )
            d = float(dice[i]) if has_label and not torch.isnan(dice[i]) else None
            cases.append(
                CasePrediction(
                    case_id=case_id,
                    regimen=int(batch["regimen"][i]),
                    pcr=float(batch["pcr"][i]),
                    probs=probs[i].tolist(),
                    dice=d,
                    loss=per_loss,
                )
            )
    return EvalResult(metrics=summarise_predictions(cases), cases=cases)
