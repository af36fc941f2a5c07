"""The optimiser steps of one local training call
(:func:`client.training.engine.train_local`), with their running losses.

Each step sets the poly learning rate, runs the network on a batch of patients
(mixed precision on CUDA without DP), adds a data-free loss when given, and
steps the optimiser: clipping the gradient norm without DP, or through opacus
(:class:`client.privacy.dp_sgd.PrivateTraining`) per-patient clipping and
noise under DP, where a step on an empty Poisson batch is noise only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from shared_model.loss import LossConfig, MoELoss
from shared_model.model import UNetMoECli

if TYPE_CHECKING:
    from client.privacy.dp_sgd import PrivateTraining


def collate(batch: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Patients' samples stacked into a batch; None for an empty Poisson batch."""
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


class LocalSteps:
    """The steps of one training call over a model and its optimiser.

    Args:
        model: the network, on ``device``, in training mode.
        optimizer: its optimiser (opacus's under DP).
        device: where it trains.
        params: the trained parameters (gradient-norm clipping).
        lr, poly_power: base learning rate and poly exponent.
        grad_clip: gradient-norm clip without DP (0 disables).
        amp: mixed precision when on CUDA (never under DP).
        loss: the loss weights.
        private: opacus around the model under DP, else None.
        extra_loss: added to each step's loss (None under DP: opacus adds it).
    """

    def __init__(
        self,
        model: UNetMoECli,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        params: list[torch.nn.Parameter],
        lr: float,
        poly_power: float,
        grad_clip: float,
        amp: bool,
        loss: LossConfig,
        private: PrivateTraining | None = None,
        extra_loss: Callable[[UNetMoECli], torch.Tensor] | None = None,
    ) -> None:
        self.model, self.optimizer, self.device = model, optimizer, device
        self.params, self.private, self.extra_loss = params, private, extra_loss
        self.base_lr, self.poly_power, self.grad_clip = lr, poly_power, grad_clip
        self.loss_fn = MoELoss(loss)
        self.use_amp = amp and device.type == "cuda" and private is None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.step = 0
        self.n_loss = 0  # steps with patients (an empty DP batch has no loss)
        self.sums: dict[str, float] = {"loss": 0.0, "seg": 0.0, "pcr": 0.0}
        self.lr = lr

    def run(
        self,
        loader: DataLoader[Any],
        n_steps: int,
        schedule: tuple[int, int],
        on_step: Callable[[int, float], None] | None = None,
    ) -> None:
        """``n_steps`` steps over ``loader`` (passing over it again as needed),
        the learning rate at ``schedule = (start_step, total_steps)`` of the
        poly schedule; ``on_step(step, loss)`` after each (NaN: no patient)."""
        start, total = schedule
        while self.step < n_steps:
            for batch in loader:
                if self.step >= n_steps:
                    break
                self.lr = poly_lr(
                    self.base_lr, start + self.step, total, self.poly_power
                )
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr
                self.step += 1
                if batch is None:
                    assert self.private is not None
                    self.optimizer.zero_grad(set_to_none=True)
                    self.private.empty_step()
                loss = math.nan if batch is None else self._step(batch)
                if on_step is not None:
                    on_step(self.step, loss)

    def mean(self, key: str) -> float:
        """The mean of a loss (``loss``, ``seg``, ``pcr``) over the steps with
        patients."""
        return self.sums[key] / max(self.n_loss, 1)

    def _step(self, batch: dict[str, Any]) -> float:
        """One optimiser step on a batch of patients; its loss."""
        device, model = self.device, self.model
        image = batch["image"].to(device)
        with torch.autocast(device.type, enabled=self.use_amp):
            out = model(
                image, batch["clinical"].to(device), batch["regimen"].to(device)
            )
            loss, parts = self.loss_fn(
                out, batch["label"].to(device), batch["pcr"].to(device)
            )
            if self.extra_loss is not None:
                loss = loss + self.extra_loss(model)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0 and self.private is None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        value = float(loss.detach())
        self.n_loss += 1
        self.sums["loss"] += value
        self.sums["seg"] += parts["seg"]
        self.sums["pcr"] += parts["pcr"]
        return value
