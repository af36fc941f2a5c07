"""Training loss of UNet-MoE-Cli: deep-supervised DiceCE plus gated BCE.

Both parts are means over the batch of per-sample losses (Dice with
``batch=False``), which is what per-sample gradient clipping under opacus
(``loss_reduction="mean"``) assumes: a batch-level Dice would mix patients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from shared_model.errors import ConfigError
from shared_model.model import ModelOutput


@dataclass(frozen=True)
class LossConfig:
    """Loss weights.

    Attributes:
        seg_weight: weight of the segmentation loss.
        pcr_weight: weight of the pCR loss.
        pos_weight: BCE weight of pCR = 1 cases; > 1 trades specificity for
            sensitivity (the study's model missed half of the responders).
        ds_decay: weight ratio between successive deep-supervision heads
            (nnU-Net: 1, 1/2, 1/4, ... normalised to sum 1).
    """

    seg_weight: float = 1.0
    pcr_weight: float = 1.0
    pos_weight: float = 1.0
    ds_decay: float = 0.5

    def __post_init__(self) -> None:
        for name in ("seg_weight", "pcr_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss `{name}` must be >= 0")
        if self.pos_weight <= 0:
            raise ConfigError("loss `pos_weight` must be > 0")
        if not 0 < self.ds_decay <= 1:
            raise ConfigError("loss `ds_decay` must be in (0, 1]")


def gated_bce(
    gated_logit: torch.Tensor, pcr: torch.Tensor, pos_weight: float = 1.0
) -> torch.Tensor:
    """BCE of the received regimen's logit, summed over the patients with a known
    outcome and divided by the batch size (NaN outcomes add nothing; each
    patient's share does not depend on who else is in the batch)."""
    known = ~torch.isnan(pcr)
    target = torch.where(known, pcr, torch.zeros_like(pcr))
    bce = F.binary_cross_entropy_with_logits(
        gated_logit,
        target,
        reduction="none",
        pos_weight=torch.tensor(
            pos_weight, dtype=gated_logit.dtype, device=gated_logit.device
        ),
    )
    return (bce * known).sum() / max(pcr.numel(), 1)


class MoELoss(nn.Module):
    """``total = seg_weight * DiceCE(heads) + pcr_weight * BCE(gated_logit)``.

    Cases with unknown pCR (NaN) add nothing to the BCE term; the mean is still
    over the whole batch, so each patient's share of the loss does not depend
    on who else is in the batch.
    """

    def __init__(self, cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or LossConfig()
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)

    def forward(
        self, out: ModelOutput, label: torch.Tensor, pcr: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        seg = out.seg_logits
        heads = seg.unbind(dim=1) if seg.ndim == 6 else (seg,)
        weights = torch.tensor([self.cfg.ds_decay**i for i in range(len(heads))])
        weights = weights / weights.sum()
        seg_loss = sum(
            w * self.dice_ce(h, label) for w, h in zip(weights, heads, strict=True)
        )
        pcr_loss = gated_bce(out.gated_logit, pcr, self.cfg.pos_weight)
        total = self.cfg.seg_weight * seg_loss + self.cfg.pcr_weight * pcr_loss
        return total, {"seg": float(seg_loss.detach()), "pcr": float(pcr_loss.detach())}
