"""Scoring a patient as the clinic does: one path for ``moefl predict``, its
batch form and ``moefl evaluate``.

The whole preprocessed volume is segmented with a sliding window, and the pCR
experts read a patch centred on the *predicted* tumour, never on a
ground-truth mask (a new patient has none). Where a mask exists it is used
only to measure: Dice over the whole volume, and the loss on the same patch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice

from client.data.dataset import SiteDataset
from client.data.site_data import CaseFiles
from client.data.volume_store import SegmentationStore
from shared_model.backbone import backbone_digest
from shared_model.loss import LossConfig, MoELoss
from shared_model.model import ModelOutput, UNetMoECli
from shared_model.plan import Plan


@dataclass(frozen=True)
class CaseScore:
    """One patient's scores (stays on the site)."""

    case_id: str
    regimen: int  # received or planned, index into REGIMENS
    pcr: float  # NaN when unknown
    probs: list[float]  # pCR probability under nCRT, TNT, nCT
    volume_ml: float  # predicted tumour volume
    mask: np.ndarray  # predicted mask on the plan's grid, (D, H, W) uint8
    dice: float | None  # against the site's mask over the whole volume
    loss: float  # on the scored patch, against the site's mask; NaN without one
    design: list[float] | None = None  # the experts' input z (tumour features)


def centred_box(
    mask: torch.Tensor, patch: tuple[int, ...], shape: tuple[int, ...]
) -> list[int]:
    """The patch's start per axis, centred on ``mask``'s bounding box (the
    volume's centre when the mask is empty) and kept inside the volume."""
    idx = torch.nonzero(mask)
    if len(idx) == 0:
        centre = [n // 2 for n in shape]
    else:
        centre = [int((idx[:, i].min() + idx[:, i].max()) // 2) for i in range(3)]
    return [
        min(max(c - p // 2, 0), max(n - p, 0))
        for c, p, n in zip(centre, patch, shape, strict=True)
    ]


def crop_padded(
    volume: torch.Tensor, lo: list[int], patch: tuple[int, ...]
) -> torch.Tensor:
    """``volume[..., lo:lo+patch]`` over the last three axes, zero-padded to
    ``patch`` where the volume is smaller."""
    crop = volume[
        ...,
        lo[0] : lo[0] + patch[0],
        lo[1] : lo[1] + patch[1],
        lo[2] : lo[2] + patch[2],
    ]
    pad: list[int] = []
    for n, p in zip(reversed(crop.shape[-3:]), reversed(patch), strict=True):
        pad += [0, p - n]
    return torch.nn.functional.pad(crop, pad)


@torch.no_grad()
def segment(
    model: UNetMoECli, image: torch.Tensor, plan: Plan, device: torch.device
) -> torch.Tensor:
    """The predicted tumour mask ``(D, H, W)`` of ``image`` ``(C, D, H, W)``:
    a Gaussian-weighted sliding window of the patch, half-overlapping."""
    model.to(device).eval()
    logits = sliding_window_inference(
        image[None].to(device),
        roi_size=plan.patch_size,
        sw_batch_size=4,
        predictor=model.backbone,
        overlap=0.5,
        mode="gaussian",
    )
    assert isinstance(logits, torch.Tensor)  # a tensor predictor gives a tensor
    return logits.argmax(dim=1)[0].cpu()


@torch.no_grad()
def score_patch(
    model: UNetMoECli,
    image: torch.Tensor,
    clinical: torch.Tensor,
    regimen: int,
    mask: torch.Tensor,
    plan: Plan,
    device: torch.device,
) -> tuple[list[float], list[int], ModelOutput]:
    """pCR under every regimen from the patch around ``mask``'s tumour.
    Returns the probabilities, the patch's start and the model's output."""
    model.to(device).eval()
    lo = centred_box(mask, plan.patch_size, tuple(image.shape[1:]))
    patch = crop_padded(image, lo, plan.patch_size)
    out = model(
        patch[None].to(device),
        clinical[None].to(device),
        torch.tensor([regimen], dtype=torch.long, device=device),
    )
    return torch.sigmoid(out.pcr_logits[0].float()).cpu().tolist(), lo, out


def score_volume(
    model: UNetMoECli,
    image: torch.Tensor,
    clinical: torch.Tensor,
    regimen: int,
    plan: Plan,
    device: torch.device,
) -> tuple[list[float], torch.Tensor]:
    """Segment ``image`` and score pCR around the predicted tumour: the
    probabilities and the predicted mask."""
    mask = segment(model, image, plan, device)
    probs, _, _ = score_patch(model, image, clinical, regimen, mask, plan, device)
    return probs, mask


_SEGMENTED: dict[str, dict[tuple[str, str], tuple[torch.Tensor, float | None]]] = {}
"""Backbone digest -> (image files, plan) -> the predicted mask and its Dice.
A frozen backbone (head rounds, repeated evaluation) segments each patient
once per process; only the latest backbone is kept. A dataset with a volume
store also keeps them on the site's disk
(:class:`client.data.volume_store.SegmentationStore`), for the next process."""


def score_dataset(
    model: UNetMoECli,
    dataset: SiteDataset,
    plan: Plan,
    *,
    device: torch.device,
    loss_cfg: LossConfig | None = None,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> list[CaseScore]:
    """Score every patient of ``dataset`` (built with ``whole=True``): each
    segmented alone, the patches read ``batch_size`` at a time."""
    model.to(device).eval()
    loss_fn = MoELoss(loss_cfg)
    voxel_ml = math.prod(plan.spacing) / 1000.0
    digest = backbone_digest(model.state_dict())
    if digest not in _SEGMENTED:
        _SEGMENTED.clear()
    memo = _SEGMENTED.setdefault(digest, {})
    plan_key = json.dumps(plan.to_dict(), sort_keys=True)
    disk = None if dataset.store is None else SegmentationStore(dataset.store, digest)
    scores: list[CaseScore] = []
    n = len(dataset)
    for start in range(0, n, batch_size):
        samples, masks, dices, starts = [], [], [], []
        for i in range(start, min(start + batch_size, n)):
            s = dataset[i]
            files = json.dumps([dataset.adc_scale, dataset.cases[i].file_stats()])
            key = (files, plan_key)
            if key not in memo:
                memo[key] = _segment_case(
                    model, dataset.cases[i], s, plan, device, disk
                )
            mask, dice = memo[key]
            samples.append(s)
            masks.append(mask)
            dices.append(dice)
            starts.append(
                centred_box(mask, plan.patch_size, tuple(s["image"].shape[1:]))
            )
        with torch.no_grad():
            out = model(
                torch.stack(
                    [
                        crop_padded(s["image"], lo, plan.patch_size)
                        for s, lo in zip(samples, starts, strict=True)
                    ]
                ).to(device),
                torch.stack([s["clinical"] for s in samples]).to(device),
                torch.stack([s["regimen"] for s in samples]).to(device),
            )
        probs = torch.sigmoid(out.pcr_logits.float()).cpu()
        design = None if out.head_input is None else out.head_input.double().cpu()
        for j, s in enumerate(samples):
            loss = float("nan")
            if "label" in s:
                loss = _case_loss(out, j, s, starts[j], plan, loss_fn, device)
            scores.append(
                CaseScore(
                    case_id=s["case_id"],
                    regimen=int(s["regimen"]),
                    pcr=float(s["pcr"]),
                    probs=probs[j].tolist(),
                    volume_ml=float(masks[j].sum()) * voxel_ml,
                    mask=masks[j].numpy().astype(np.uint8),
                    dice=dices[j],
                    loss=loss,
                    design=None if design is None else design[j].tolist(),
                )
            )
        if progress is not None:
            progress(len(scores), n)
    return scores


def _segment_case(
    model: UNetMoECli,
    case: CaseFiles,
    sample: dict[str, Any],
    plan: Plan,
    device: torch.device,
    disk: SegmentationStore | None,
) -> tuple[torch.Tensor, float | None]:
    """The case's predicted mask and its Dice: from the site's segmentation
    store when it holds them, else segmented now (and stored)."""
    found = None if disk is None else disk.load(case)
    if found is None:
        mask = segment(model, sample["image"], plan, device)
        found = (mask, _dice(mask, sample.get("label")))
        if disk is not None:
            disk.save(case, *found)
    return found


def _case_loss(
    out: ModelOutput,
    j: int,
    sample: dict[str, Any],
    start: Any,
    plan: Plan,
    loss_fn: MoELoss,
    device: torch.device,
) -> float:
    """The training loss of the batch's ``j``-th case on its patch."""
    one = out._replace(
        seg_logits=out.seg_logits[j : j + 1],
        pcr_logits=out.pcr_logits[j : j + 1],
        gated_logit=out.gated_logit[j : j + 1],
    )
    label = crop_padded(sample["label"], start, plan.patch_size)[None]
    with torch.no_grad():
        return float(loss_fn(one, label.to(device), sample["pcr"][None].to(device))[0])


def _dice(mask: torch.Tensor, label: torch.Tensor | None) -> float | None:
    """Dice of the predicted ``mask`` against the site's ``label`` ``(1, D, H,
    W)`` over the whole volume (None without a label, or when both are empty)."""
    if label is None:
        return None
    pred_1h = torch.stack([mask == 0, mask == 1])[None].float()
    lab_1h = torch.cat([label == 0, label == 1])[None].float()
    d = compute_dice(pred_1h, lab_1h, include_background=False, ignore_empty=True)
    return None if torch.isnan(d[0, 0]) else float(d[0, 0])
