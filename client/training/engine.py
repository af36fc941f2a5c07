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

from shared_model.clinical import REGIMENS
from shared_model.errors import ConfigError
from shared_model.loss import LossConfig, MoELoss
from shared_model.model import UNetMoECli

if TYPE_CHECKING:
    from client.privacy.rounds import DPRound

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


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not batch:  # an empty Poisson batch under DP-SGD
        return None
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        out[key] = (
            torch.stack(values) if isinstance(values[0], torch.Tensor) else values
        )
    return out


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    """nnU-Net's poly schedule: ``base * (1 - step / total) ** power``."""
    return base * max(0.0, 1.0 - step / max(total, 1)) ** power


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
    dp: DPRound | None = None,
    dp_generator: torch.Generator | None = None,
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
        dp: train with DP-SGD (:mod:`client.privacy.rounds`): ``dp.steps`` steps on
            Poisson batches of patients, per-patient clipping and noise, fp32
            (opacus's per-sample gradients do not run under autocast);
            ``cfg.max_steps``, ``cfg.epochs`` and ``cfg.grad_clip`` are unused.
        dp_generator: randomness of the noise and the sampling
            (:func:`client.privacy.rounds.dp_generator`); required with ``dp``.
    """
    model.to(device).train()
    for name, p in model.named_parameters():
        p.requires_grad_(trainable is None or name in trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    loss_fn = MoELoss(cfg.loss)
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = max(1, math.ceil(len(dataset) / cfg.batch_size))
    private = None
    if dp is None:
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=_collate,
            drop_last=False,
        )
        n_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    else:
        from client.privacy.rounds import PrivateTraining

        if dp_generator is None:
            raise ValueError("DP training needs `dp_generator`")
        private = PrivateTraining(model, optimizer, dp, generator=dp_generator)
        optimizer = private.optimizer
        loader = DataLoader(
            dataset,
            batch_sampler=private.batch_sampler(len(dataset)),
            collate_fn=_collate,
        )
        n_steps = dp.steps
        if extra_loss is not None:
            data_free = extra_loss

            def add_data_free_gradient(opt: Any) -> None:
                with torch.enable_grad():
                    grads = torch.autograd.grad(data_free(model), params)
                for p, g in zip(params, grads, strict=True):
                    p.grad = g if p.grad is None else p.grad + g

            private.optimizer.attach_step_hook(add_data_free_gradient)
            extra_loss = None
    start, total = schedule or (0, n_steps)
    use_amp = cfg.amp and device.type == "cuda" and dp is None
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    t0 = time.perf_counter()
    step = 0
    sums: dict[str, float] = {"loss": 0.0, "seg": 0.0, "pcr": 0.0}
    n_loss = 0  # steps with patients (an empty DP batch has no loss)
    lr = cfg.lr
    try:
        while step < n_steps:
            for batch in loader:
                if step >= n_steps:
                    break
                lr = poly_lr(cfg.lr, start + step, total, cfg.poly_power)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step += 1
                if batch is None:
                    assert private is not None
                    optimizer.zero_grad(set_to_none=True)
                    private.empty_step()
                    if on_step is not None:
                        on_step(step, math.nan)
                    continue
                image = batch["image"].to(device)
                with torch.autocast(device.type, enabled=use_amp):
                    out = model(
                        image, batch["clinical"].to(device), batch["regimen"].to(device)
                    )
                    loss, parts = loss_fn(
                        out, batch["label"].to(device), batch["pcr"].to(device)
                    )
                    if extra_loss is not None:
                        loss = loss + extra_loss(model)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip > 0 and private is None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                n_loss += 1
                sums["loss"] += float(loss.detach())
                sums["seg"] += parts["seg"]
                sums["pcr"] += parts["pcr"]
                if on_step is not None:
                    on_step(step, float(loss.detach()))
    finally:
        if private is not None:
            optimizer.zero_grad(set_to_none=True)
            private.close()
        for p in model.parameters():
            p.requires_grad_(True)
    n_cases = len(dataset)
    regimens = Counter(REGIMENS[int(r)] for r in _regimens_of(dataset))
    n_batches = max(n_loss, 1)
    return TrainResult(
        steps=step,
        epochs_done=step / steps_per_epoch,
        seconds=time.perf_counter() - t0,
        loss=sums["loss"] / n_batches,
        seg_loss=sums["seg"] / n_batches,
        pcr_loss=sums["pcr"] / n_batches,
        n_cases=n_cases,
        n_by_regimen={r: regimens.get(r, 0) for r in REGIMENS},
        final_lr=lr,
    )


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
        dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate
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
