"""Training the pCR heads over cached tumour features (staged training, stage 2).

The backbone is frozen; the modality embeddings, the prognosis head and the
experts of the regimens a site has train with AdamW on the gated BCE, many
epochs in seconds (a few thousand numbers per patient instead of a 3-D crop).
The loss is joint training's gated BCE (:func:`shared_model.loss.gated_bce`).

Under DP (:func:`train_heads_private`) the same heads train with DP-SGD:
Poisson batches of patients over the cached features, per-patient clipping and
Gaussian noise by opacus, on the head parameters only. The features must come
from a backbone that never saw the site's patients (a public one): the head
is then the only thing trained on them, and its updates are what the budget
covers.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from client.privacy.dp_sgd import PrivateRound
from client.training.engine import TrainResult
from client.training.feature_cache import FeatureSet
from shared_model.clinical import REGIMENS
from shared_model.errors import ConfigError
from shared_model.federation_config import FederationConfig
from shared_model.loss import gated_bce
from shared_model.model import UNetMoECli
from shared_model.parameter_groups import is_head_parameter


@dataclass(frozen=True)
class HeadConfig:
    """Optimisation of the heads over cached features."""

    epochs: int = FederationConfig.head_epochs
    lr: float = FederationConfig.head_lr
    batch_size: int = FederationConfig.head_batch_size
    weight_decay: float = 0.01
    pos_weight: float = 1.0
    seed: int = 0
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError("head `epochs`, `batch_size` >= 1 and `lr` > 0")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError("head optimizer: adamw or sgd")

    def build(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay
            )
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


def train_heads(
    model: UNetMoECli,
    data: FeatureSet,
    cfg: HeadConfig,
    *,
    trainable: set[str] | None = None,
) -> TrainResult:
    """Train the heads of ``model`` in place on ``data`` (on the CPU: the
    heads are small). ``trainable``: the head parameters to train (default:
    all of them); the backbone never trains here."""
    model.cpu().train()
    names = {
        name
        for name, _ in model.named_parameters()
        if is_head_parameter(name) and (trainable is None or name in trainable)
    }
    params = [p for name, p in model.named_parameters() if name in names]
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    optimizer = cfg.build(params)
    generator = torch.Generator().manual_seed(cfg.seed)
    n = len(data)
    t0 = time.perf_counter()
    steps, total = 0, 0.0
    try:
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                logits = model.head(data.features[idx], data.clinical[idx])
                gated = model.gate(logits, data.regimen[idx])
                loss = gated_bce(gated, data.pcr[idx], cfg.pos_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                total += float(loss.detach())
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return _result(
        data, cfg, steps, total / max(steps, 1), float(cfg.epochs) if n else 0.0, t0
    )


class GatedHead(nn.Module):
    """The pCR heads of a model as a module of their own: ``(features,
    clinical, regimen) -> gated logit``. Holds the model's head submodules
    (the same parameters, so training this trains the model); the backbone is
    not part of it, so opacus sees, clips and noises the head alone."""

    def __init__(self, model: UNetMoECli) -> None:
        super().__init__()
        self.encode_t2 = model.encode_t2
        self.encode_adc = model.encode_adc
        self.experts = model.experts
        if hasattr(model, "prognosis"):
            self.prognosis = model.prognosis
        self._model = [model]  # not a submodule: its backbone stays outside

    def forward(
        self, features: torch.Tensor, clinical: torch.Tensor, regimen: torch.Tensor
    ) -> torch.Tensor:
        model = self._model[0]
        return model.gate(model.head(features, clinical), regimen)


def train_heads_private(
    model: UNetMoECli,
    data: FeatureSet,
    cfg: HeadConfig,
    private_round: PrivateRound,
    *,
    trainable: set[str] | None = None,
) -> TrainResult:
    """DP-SGD on the heads of ``model`` over ``data`` (on the CPU).

    ``private_round`` (from the site's privacy,
    :meth:`client.privacy.site_privacy.SitePrivacy.private_round`) holds the
    round: ``dp.steps`` steps on Poisson batches (each patient joins with
    ``dp.sample_rate``), each patient's gradient clipped to
    ``dp.max_grad_norm``, Gaussian noise of ``dp.noise_multiplier`` times the
    clip, drawn by its generator (in its ``secure_mode``); ``cfg``'s optimiser
    (a DP site uses SGD with momentum, run config ``dp-head-lr``) on the
    noised mean. ``trainable``: the head parameters to train (model names);
    the backbone never trains and is not even in the graph.
    """
    dp = private_round.dp
    if len(data) != dp.n_patients:
        raise ValueError(f"{len(data)} patients' features, the DP plan {dp.n_patients}")
    model.cpu().train()
    head = GatedHead(model)
    own = {id(p): n for n, p in model.named_parameters()}
    params = []
    for p in head.parameters():
        name = own[id(p)]
        train = is_head_parameter(name) and (trainable is None or name in trainable)
        p.requires_grad_(train)
        if train:
            params.append(p)
    for name, p in model.named_parameters():
        if not is_head_parameter(name):
            p.requires_grad_(False)
    optimizer = cfg.build(params)
    private = private_round.wrap(head, optimizer)
    t0 = time.perf_counter()
    steps, total, n_loss = 0, 0.0, 0
    try:
        for idx in private.batch_sampler(len(data)):
            steps += 1
            private.optimizer.zero_grad(set_to_none=True)
            if len(idx) == 0:
                private.empty_step()
                continue
            rows = torch.as_tensor(idx, dtype=torch.long)
            gated = private.module(
                data.features[rows], data.clinical[rows], data.regimen[rows]
            )
            loss = gated_bce(gated, data.pcr[rows], cfg.pos_weight)
            loss.backward()
            private.optimizer.step()
            total += float(loss.detach())
            n_loss += 1
    finally:
        private.optimizer.zero_grad(set_to_none=True)
        private.close()
        for p in model.parameters():
            p.requires_grad_(True)
    return _result(data, cfg, steps, total / max(n_loss, 1), steps * dp.sample_rate, t0)


def _result(
    data: FeatureSet,
    cfg: HeadConfig,
    steps: int,
    mean_loss: float,
    epochs_done: float,
    t0: float,
) -> TrainResult:
    regimens = Counter(REGIMENS[int(r)] for r in data.regimen)
    return TrainResult(
        steps=steps,
        epochs_done=epochs_done,
        seconds=time.perf_counter() - t0,
        loss=mean_loss,
        seg_loss=math.nan,
        pcr_loss=mean_loss,
        n_cases=len(data),
        n_by_regimen={r: regimens.get(r, 0) for r in REGIMENS},
        final_lr=cfg.lr,
    )
