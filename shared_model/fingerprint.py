"""A site's dataset fingerprint as aggregate histograms, and the plan the
federation derives from the sites' fingerprints.

A fingerprint holds, per axis ``(D, H, W)`` of the images reoriented to RAS
(superior, anterior, right), histograms over fixed bins of the voxel spacing,
the image size in voxels and the image extent in millimetres, and the case
count: nothing per patient, and its size does not grow with the number of
cases. Fingerprints add up (:meth:`Fingerprint.merge`), so the server sees the
federation's, never a site's cases.

:func:`plan_from_fingerprint` applies nnU-Net v2's rules for a 3-D full
resolution configuration to the pooled histograms:

* target spacing: the median spacing per axis; when the coarsest axis is more
  than three times coarser than the others and has under a third of their
  voxels, that axis takes the 10th percentile of its spacings instead (never
  finer than the others' largest);
* median size: the median extent divided by the target spacing;
* patch: 256^3 voxels isotropic in millimetres, clipped to the median size, then
  the U-Net topology (an axis is halved while it has at least 8 voxels and its
  spacing is within twice the finest) and the patch padded to a multiple of
  its total stride; the patch shrinks, largest ratio to the median first,
  while a plain U-Net's feature maps exceed nnU-Net's reference budget.

Histograms are binned (spacing 0.05 mm, extent 0.5 mm, size 1 voxel), so the
plan equals one from the raw list up to a bin; the median size is the median
extent over the target spacing, rounded (nnU-Net rounds each case first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared_model.plan import Plan

# bins centred on round values (3.0 mm, 38 voxels, 91.5 mm)
SPACING_EDGES = np.round(np.arange(-0.025, 10.0, 0.05), 4)
SIZE_EDGES = np.arange(-0.5, 1024.0, 1.0)
EXTENT_EDGES = np.arange(-0.25, 1000.0, 0.5)
HISTOGRAMS = {"spacing": SPACING_EDGES, "size": SIZE_EDGES, "extent": EXTENT_EDGES}

ANISOTROPY = 3.0
MIN_FEATURE_MAP = 4
REFERENCE_VOXELS = 560e6  # nnU-Net's feature-map budget for 8 GB
BASE_FEATURES, MAX_FEATURES = 32, 320


@dataclass(frozen=True)
class Fingerprint:
    """Aggregate histograms of a dataset (see the module docstring).

    Attributes:
        n_cases: the cases counted.
        histograms: ``spacing``, ``size``, ``extent``: each ``(3, bins)`` counts
            per axis ``(D, H, W)`` over the bins of :data:`HISTOGRAMS`.
    """

    n_cases: int
    histograms: Mapping[str, np.ndarray]

    @classmethod
    def of(cls, spacings: np.ndarray, sizes: np.ndarray) -> Fingerprint:
        """From per-case spacings and sizes ``(n, 3)``, ``(D, H, W)`` (this is
        where a site's cases end; only the counts leave)."""
        spacings = np.asarray(spacings, np.float64).reshape(-1, 3)
        sizes = np.asarray(sizes, np.float64).reshape(-1, 3)
        values = {"spacing": spacings, "size": sizes, "extent": spacings * sizes}
        hist = {
            name: np.stack(
                [
                    np.histogram(
                        np.clip(values[name][:, a], edges[0], edges[-1] - 1e-9), edges
                    )[0]
                    for a in range(3)
                ]
            ).astype(np.int64)
            for name, edges in HISTOGRAMS.items()
        }
        return cls(len(spacings), hist)

    def merge(self, other: Fingerprint) -> Fingerprint:
        """The pooled fingerprint of two datasets."""
        return Fingerprint(
            self.n_cases + other.n_cases,
            {k: self.histograms[k] + other.histograms[k] for k in HISTOGRAMS},
        )

    def to_values(self) -> dict[str, Any]:
        """JSON-ready counts."""
        return {
            "n_cases": self.n_cases,
            **{k: self.histograms[k].tolist() for k in HISTOGRAMS},
        }

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Fingerprint:
        """Read an untrusted fingerprint; ValueError says what is wrong."""
        n = values.get("n_cases")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= 100_000:
            raise ValueError(f"`n_cases` is {n!r}; expected a whole number 1-100000")
        hist = {}
        for name, edges in HISTOGRAMS.items():
            h = np.asarray(values.get(name, []), dtype=np.float64)
            if h.shape != (3, len(edges) - 1) or not np.isfinite(h).all():
                raise ValueError(f"`{name}` must be 3 x {len(edges) - 1} counts")
            if (h < 0).any() or (h != np.round(h)).any() or (h.sum(1) != n).any():
                raise ValueError(f"`{name}` must hold {n} whole counts per axis")
            hist[name] = h.astype(np.int64)
        return cls(n, hist)

    def quantile(self, name: str, q: float) -> np.ndarray:
        """Per axis, the ``q`` quantile (0-1) of a histogram (bin centres,
        interpolated between neighbouring ranks as numpy's default does)."""
        edges = HISTOGRAMS[name]
        centres = (edges[:-1] + edges[1:]) / 2
        out = []
        for counts in self.histograms[name]:
            sorted_values = np.repeat(centres, counts)
            out.append(float(np.quantile(sorted_values, q)))
        return np.array(out)


def target_spacing(fp: Fingerprint) -> np.ndarray:
    """nnU-Net's target spacing ``(D, H, W)`` from the pooled histograms."""
    target = fp.quantile("spacing", 0.5)
    sizes = fp.quantile("size", 0.5)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    if target[worst] > ANISOTROPY * max(target[others]) and sizes[
        worst
    ] * ANISOTROPY < min(sizes[others]):
        target[worst] = max(
            fp.quantile("spacing", 0.1)[worst], max(target[others]) + 1e-5
        )
    return target


def topology(
    spacing: np.ndarray, patch: list[int]
) -> tuple[list[list[int]], list[int]]:
    """The U-Net's strides for ``patch`` at ``spacing`` (nnU-Net's rule) and the
    patch padded to a multiple of each axis's total stride."""
    spacing_now = [float(s) for s in spacing]
    size_now = [float(p) for p in patch]
    strides: list[list[int]] = [[1, 1, 1]]
    pools = [0, 0, 0]
    while True:
        axes = [a for a in range(3) if size_now[a] >= 2 * MIN_FEATURE_MAP]
        if not axes:
            break
        finest = min(spacing_now[a] for a in axes)
        axes = [a for a in axes if spacing_now[a] / finest < 2]
        if not axes or (len(axes) == 1 and size_now[axes[0]] < 3 * MIN_FEATURE_MAP):
            break
        stride = [2 if a in axes else 1 for a in range(3)]
        for a in axes:
            pools[a] += 1
            spacing_now[a] *= 2
            size_now[a] = math.ceil(size_now[a] / 2)
        strides.append(stride)
    padded = [
        int(math.ceil(p / 2**n) * 2**n) for p, n in zip(patch, pools, strict=True)
    ]
    return strides, padded


def feature_map_voxels(
    patch: list[int], strides: list[list[int]], classes: int = 2
) -> int:
    """Output voxels x channels of a plain U-Net's convolutions on ``patch``
    (two convolutions per stage, nnU-Net's widths): its memory proxy."""
    features = [min(MAX_FEATURES, BASE_FEATURES * 2**s) for s in range(len(strides))]
    size = list(patch)
    skips = []
    total = 0
    for s, stride in enumerate(strides):
        size = [n // st for n, st in zip(size, stride, strict=True)]
        total += 2 * features[s] * math.prod(size)
        skips.append(list(size))
    for d in range(len(strides) - 1):
        skip, width = skips[-(d + 2)], features[-(d + 2)]
        total += 3 * width * math.prod(skip)  # two convolutions and the upsampling
        if d == len(strides) - 2:
            total += classes * math.prod(skip)
    return total


def plan_from_fingerprint(fp: Fingerprint, *, budget_gb: float = 8.0) -> Plan:
    """The federation's plan from the pooled fingerprint (nnU-Net's rules)."""
    spacing = target_spacing(fp)
    median = np.round(fp.quantile("extent", 0.5) / spacing)
    inverse = 1.0 / spacing
    start = inverse * (256**3 / float(np.prod(inverse))) ** (1 / 3)
    patch = [int(min(round(x), m)) for x, m in zip(start, median, strict=True)]
    strides, padded = topology(spacing, patch)
    budget = REFERENCE_VOXELS * budget_gb / 8.0
    while feature_map_voxels(padded, strides) > budget:
        axis = int(np.argmax([p / m for p, m in zip(padded, median, strict=True)]))
        step = 2 ** sum(s[axis] == 2 for s in strides)
        shrunk = list(padded)
        shrunk[axis] -= step
        strides, padded = topology(spacing, shrunk)
    return Plan(
        patch_size=(int(padded[0]), int(padded[1]), int(padded[2])),
        spacing=(
            round(float(spacing[0]), 4),
            round(float(spacing[1]), 4),
            round(float(spacing[2]), 4),
        ),
    )
