"""Tumour features on the input grid: what the pCR heads read.

Every statistic is taken inside the predicted tumour at the network's input
resolution (the plan's grid), never on a downsampled feature map: a tumour a
few voxels wide on a 4x coarser grid is mostly wall and fat. Two regions:

* **tumour**: the voxels whose predicted tumour probability exceeds 0.5 (when
  none does, those above half the patch's highest probability, so a missed
  tumour still gives finite features);
* **core**: the tumour eroded by about 3 mm in-plane (the voxels away from its
  boundary, where partial volume with the wall does not reach).

Channels keep their meaning: ADC stays in its physical unit (10^-3 mm^2/s,
clipped to the plan's range; its absolute level is the biomarker), T2W is the
image z-scored over its non-zero voxels. Per patient, in this order:

* ``adc``: mean, SD, 10/25/50/75/90th percentiles in the tumour, the share of
  tumour voxels in each of six ADC bins of 0.5 from 0 to 3 (the last open
  above), core mean and median;
* ``t2``: mean, SD, 10/50/90th percentiles in the tumour, mean in-plane
  gradient magnitude in the tumour (texture), core mean;
* ``shape``: log tumour volume in ml, the core's share of the tumour, the
  boundary's share (surface to volume), and the last decoder layer's features
  averaged over the tumour (``decoder_channels`` values; what the segmenter
  itself learned about the tumour).

Each value is centred and scaled by fixed constants (ADC around 1.2 per 0.5,
volume around 2.5 per 1), so the heads start from inputs of order one without
a data-dependent standardisation that sites would have to share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

ADC_BINS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
ADC_QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)
T2_QUANTILES = (0.10, 0.50, 0.90)
CORE_EROSION_MM = 3.0

ADC_NAMES = (
    "adc_mean",
    "adc_sd",
    *(f"adc_p{round(q * 100)}" for q in ADC_QUANTILES),
    *(f"adc_bin{i}" for i in range(len(ADC_BINS) - 1)),
    "adc_core_mean",
    "adc_core_p50",
)
T2_NAMES = (
    "t2_mean",
    "t2_sd",
    *(f"t2_p{round(q * 100)}" for q in T2_QUANTILES),
    "t2_gradient",
    "t2_core_mean",
)
GEOMETRY_NAMES = ("log_volume_ml", "core_share", "boundary_share")


def feature_names(decoder_channels: int) -> tuple[str, ...]:
    """All feature names, in the order of :func:`tumour_features`' columns."""
    return (
        *ADC_NAMES,
        *T2_NAMES,
        *GEOMETRY_NAMES,
        *(f"decoder{i}" for i in range(decoder_channels)),
    )


def feature_sizes(decoder_channels: int) -> tuple[int, int, int]:
    """Widths of the ``adc``, ``t2`` and ``shape`` blocks."""
    return len(ADC_NAMES), len(T2_NAMES), len(GEOMETRY_NAMES) + decoder_channels


def _erode(mask: torch.Tensor, radius: Sequence[int]) -> torch.Tensor:
    """Binary erosion of ``(B, 1, D, H, W)`` by a box of the given radii."""
    if not any(radius):
        return mask
    k = tuple(2 * r + 1 for r in radius)
    pad = (radius[2], radius[2], radius[1], radius[1], radius[0], radius[0])
    outside = F.pad(1.0 - mask, pad, value=1.0)
    return 1.0 - F.max_pool3d(outside, kernel_size=k, stride=1)


def tumour_masks(
    prob: torch.Tensor, spacing: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tumour, core, boundary)`` masks ``(B, 1, D, H, W)`` in {0, 1}."""
    peak = prob.amax(dim=(2, 3, 4), keepdim=True)
    hard = (prob > 0.5).float()
    empty = hard.sum(dim=(2, 3, 4), keepdim=True) == 0
    fallback = (prob >= 0.5 * peak).float()
    tumour = torch.where(empty, fallback, hard)
    radius = [0] + [int(round(CORE_EROSION_MM / float(s))) for s in spacing[1:]]
    core = _erode(tumour, radius)
    core = torch.where(core.sum(dim=(2, 3, 4), keepdim=True) == 0, tumour, core)
    inner = _erode(tumour, [0, 1, 1])
    return tumour, core, tumour - inner


def _mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x * w).sum(dim=(1, 2, 3, 4)) / w.sum(dim=(1, 2, 3, 4)).clamp_min(1.0)


def _quantiles(
    x: torch.Tensor, mask: torch.Tensor, qs: Sequence[float]
) -> torch.Tensor:
    """Per-sample quantiles of ``x`` inside ``mask``: ``(B, len(qs))``."""
    q = torch.tensor(qs, dtype=x.dtype, device=x.device)
    rows = []
    for xi, mi in zip(x, mask, strict=True):
        values = xi[mi > 0]
        rows.append(torch.quantile(values, q) if values.numel() else q * 0)
    return torch.stack(rows)


def tumour_features(
    image: torch.Tensor,
    prob: torch.Tensor,
    *,
    spacing: Sequence[float],
    decoder: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-patient tumour features ``(B, F)`` (see the module docstring).

    Args:
        image: ``(B, 2, D, H, W)``, T2W (z-scored) then ADC (10^-3 mm^2/s).
        prob: ``(B, 1, D, H, W)`` predicted tumour probability on the same grid.
        spacing: voxel spacing ``(D, H, W)`` in mm.
        decoder: ``(B, C, D, H, W)`` last decoder features on the same grid, or
            None (no decoder block).
    """
    prob = prob.detach().to(image.dtype)
    tumour, core, boundary = tumour_masks(prob, spacing)
    t2, adc = image[:, 0:1], image[:, 1:2]
    n = tumour.sum(dim=(1, 2, 3, 4)).clamp_min(1.0)
    adc_mean = _mean(adc, tumour)
    adc_sd = _mean((adc - adc_mean.view(-1, 1, 1, 1, 1)) ** 2, tumour).sqrt()
    bins = []
    for i, (lo, hi) in enumerate(zip(ADC_BINS[:-1], ADC_BINS[1:], strict=True)):
        last = i == len(ADC_BINS) - 2
        inside = (adc >= lo) & ((adc < hi) | last)
        bins.append((inside.float() * tumour).sum(dim=(1, 2, 3, 4)) / n)
    adc_block = torch.cat(
        [
            ((adc_mean - 1.2) / 0.5)[:, None],
            (adc_sd / 0.5)[:, None],
            (_quantiles(adc, tumour, ADC_QUANTILES) - 1.2) / 0.5,
            torch.stack(bins, dim=1) * 2.0,
            ((_mean(adc, core) - 1.2) / 0.5)[:, None],
            (_quantiles(adc, core, (0.5,)) - 1.2) / 0.5,
        ],
        dim=1,
    )
    t2_mean = _mean(t2, tumour)
    t2_sd = _mean((t2 - t2_mean.view(-1, 1, 1, 1, 1)) ** 2, tumour).sqrt()
    gy = torch.zeros_like(t2)
    gx = torch.zeros_like(t2)
    gy[..., 1:-1, :] = (t2[..., 2:, :] - t2[..., :-2, :]) / 2
    gx[..., :, 1:-1] = (t2[..., :, 2:] - t2[..., :, :-2]) / 2
    gradient = (gy**2 + gx**2).sqrt()
    t2_block = torch.cat(
        [
            t2_mean[:, None],
            t2_sd[:, None],
            _quantiles(t2, tumour, T2_QUANTILES),
            _mean(gradient, tumour)[:, None],
            _mean(t2, core)[:, None],
        ],
        dim=1,
    )
    voxel_ml = math.prod(float(s) for s in spacing) / 1000.0
    shape = [
        (torch.log1p(prob.sum(dim=(1, 2, 3, 4)) * voxel_ml) - 2.5)[:, None],
        (core.sum(dim=(1, 2, 3, 4)) / n)[:, None] * 2.0,
        (boundary.sum(dim=(1, 2, 3, 4)) / n)[:, None] * 2.0,
    ]
    if decoder is not None:
        w = tumour.to(decoder.dtype)
        pooled = (decoder * w).sum(dim=(2, 3, 4)) / w.sum(dim=(2, 3, 4)).clamp_min(1.0)
        shape.append(pooled.to(image.dtype))
    return torch.cat([adc_block, t2_block, *shape], dim=1)
