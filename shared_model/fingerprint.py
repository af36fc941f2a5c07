"""A site's dataset fingerprint as aggregate histograms, and the plan the
federation derives from the sites' fingerprints.

A fingerprint holds histograms over fixed bins, three rows each, and two case
counts: nothing per patient, and its size does not grow with the number of
cases. Fingerprints add up (:meth:`Fingerprint.merge`), so the server sees the
federation's, never a site's cases.

* ``spacing``, ``size``, ``extent``: per axis ``(D, H, W)`` of the images
  reoriented to RAS, the voxel spacing (mm), the image size (voxels) and the
  image extent (mm) of every case (rows sum to ``n_cases``);
* ``t2w``, ``adc``: inside the tumour mask of every labelled case, its 0.5th,
  50th and 99.5th intensity percentiles: T2W z-scored over the image's
  non-zero voxels (the network's normalisation), ADC in 10^-3 mm^2/s (rows sum
  to ``n_labelled``);
* ``adc_range``: the same percentiles of ADC over each image's non-zero
  voxels (rows sum to ``n_cases``).

A site under differential privacy releases :meth:`Fingerprint.noised`: its
histograms in coarser blocks (:data:`DP_BLOCKS`), Gaussian noise on every
count (the Gaussian mechanism; one case changes at most
:data:`SENSITIVITY_ROWS` counts by one), then rounded, and counts under
:data:`NOISE_FLOOR` standard deviations set to 0 (post-processing). Its rows
then need not sum to its counts, and ``noise_std`` says so.

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
  while a plain U-Net's feature maps exceed nnU-Net's reference budget
  (8 GB; ``budget_gb`` scales it);
* ADC clip: from 0 to the median of the cases' 99.5th ADC percentile, rounded
  up to 0.5 (ADC is physical, so it is clipped, not z-scored).

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
T2W_EDGES = np.round(np.arange(-8.025, 8.0, 0.05), 4)  # z-scores
ADC_EDGES = np.round(np.arange(-0.01, 10.0, 0.02), 4)  # 10^-3 mm^2/s
HISTOGRAMS = {
    "spacing": SPACING_EDGES,
    "size": SIZE_EDGES,
    "extent": EXTENT_EDGES,
    "t2w": T2W_EDGES,
    "adc": ADC_EDGES,
    "adc_range": ADC_EDGES,
}
LABELLED = ("t2w", "adc")
"""Histograms over the labelled cases only (their rows sum to ``n_labelled``)."""
PERCENTILES = (0.5, 50.0, 99.5)
"""The rows of the intensity histograms: each case's percentiles."""
SENSITIVITY_ROWS = 3 * len(HISTOGRAMS) + 2
"""Counts one case changes, by one each: a bin per histogram row, and the two
case counts. The Gaussian mechanism's L2 sensitivity is its square root."""
NOISE_FLOOR = 4.0
"""A noised count under this many standard deviations is set to 0 (so a site's
few thousand empty bins add about one spurious count in 30 000)."""
DP_BLOCKS = {"spacing": 1, "size": 15, "extent": 31, "t2w": 9, "adc": 9, "adc_range": 9}
"""Under DP, each histogram's bins are summed in blocks of this many (15 voxels,
15.5 mm extent, 0.45 z, 0.18 x 10^-3 mm^2/s) before the noise, each block's
count placed at its middle bin (odd blocks: the middle is the block's centre,
so no bias): fewer, fuller bins survive the noise floor. Spacing keeps its
0.05 mm bins: a scanner protocol fixes it, so its counts are already full, and
a coarser bin would move an in-plane target by up to 10 %."""

ANISOTROPY = 3.0
MIN_FEATURE_MAP = 4
REFERENCE_VOXELS = 560e6  # nnU-Net's feature-map budget for 8 GB
BASE_FEATURES, MAX_FEATURES = 32, 320


def _histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per row of ``values`` ``(n, 3)`` over ``edges`` (clipped in)."""
    values = np.asarray(values, np.float64).reshape(-1, 3)
    return np.stack(
        [
            np.histogram(np.clip(values[:, a], edges[0], edges[-1] - 1e-9), edges)[0]
            for a in range(3)
        ]
    ).astype(np.int64)


@dataclass(frozen=True)
class Fingerprint:
    """Aggregate histograms of a dataset (see the module docstring).

    Attributes:
        n_cases: the cases counted.
        histograms: each of :data:`HISTOGRAMS`: ``(3, bins)`` counts.
        n_labelled: the cases with a tumour mask (the ``t2w`` and ``adc`` rows).
        noise_std: the Gaussian noise's standard deviation on every count (0:
            exact counts).
    """

    n_cases: int
    histograms: Mapping[str, np.ndarray]
    n_labelled: int = 0
    noise_std: float = 0.0

    @classmethod
    def of(
        cls,
        spacings: np.ndarray,
        sizes: np.ndarray,
        intensities: Mapping[str, np.ndarray] | None = None,
    ) -> Fingerprint:
        """From per-case values (this is where a site's cases end; only the
        counts leave): spacings and sizes ``(n, 3)`` in ``(D, H, W)``, and
        ``intensities``: ``t2w`` and ``adc`` ``(n_labelled, 3)``, ``adc_range``
        ``(n, 3)``, each case's :data:`PERCENTILES` (none: empty rows)."""
        spacings = np.asarray(spacings, np.float64).reshape(-1, 3)
        sizes = np.asarray(sizes, np.float64).reshape(-1, 3)
        values = {
            "spacing": spacings,
            "size": sizes,
            "extent": spacings * sizes,
            **{k: np.zeros((0, 3)) for k in ("t2w", "adc", "adc_range")},
            **dict(intensities or {}),
        }
        hist = {name: _histogram(values[name], e) for name, e in HISTOGRAMS.items()}
        labelled = len(np.asarray(values["t2w"]).reshape(-1, 3))
        return cls(len(spacings), hist, labelled)

    def merge(self, other: Fingerprint) -> Fingerprint:
        """The pooled fingerprint of two datasets."""
        return Fingerprint(
            self.n_cases + other.n_cases,
            {k: self.histograms[k] + other.histograms[k] for k in HISTOGRAMS},
            self.n_labelled + other.n_labelled,
            math.hypot(self.noise_std, other.noise_std),
        )

    def coarsened(self) -> Fingerprint:
        """The histograms summed in blocks of :data:`DP_BLOCKS` bins, each
        block's count at its middle bin (same shapes, same counts)."""
        hist = {}
        for name, h in self.histograms.items():
            out = np.zeros_like(h)
            step = DP_BLOCKS[name]
            for start in range(0, h.shape[1], step):
                end = min(h.shape[1], start + step)
                out[:, (start + end - 1) // 2] = h[:, start:end].sum(1)
            hist[name] = out
        return Fingerprint(self.n_cases, hist, self.n_labelled, self.noise_std)

    def noised(self, std: float, rng: np.random.Generator) -> Fingerprint:
        """This fingerprint, :meth:`coarsened`, through the Gaussian mechanism
        (module docstring): ``std`` is the noise multiplier times
        ``sqrt(SENSITIVITY_ROWS)``."""
        coarse = self.coarsened()

        def noisy(x: np.ndarray | int) -> Any:
            out = np.round(np.asarray(x, np.float64) + rng.normal(0, std, np.shape(x)))
            out[out < NOISE_FLOOR * std] = 0
            return out.astype(np.int64)

        return Fingerprint(
            int(noisy(np.array([coarse.n_cases]))[0]),
            {k: noisy(coarse.histograms[k]) for k in HISTOGRAMS},
            int(noisy(np.array([coarse.n_labelled]))[0]),
            float(std),
        )

    def to_values(self) -> dict[str, Any]:
        """JSON-ready counts."""
        return {
            "n_cases": self.n_cases,
            "n_labelled": self.n_labelled,
            "noise_std": self.noise_std,
            **{k: self.histograms[k].tolist() for k in HISTOGRAMS},
        }

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Fingerprint:
        """Read an untrusted fingerprint; ValueError says what is wrong."""
        if not isinstance(values, Mapping):
            raise ValueError("a fingerprint is a mapping of counts")
        std = values.get("noise_std", 0.0)
        if isinstance(std, bool) or not isinstance(std, int | float):
            raise ValueError(f"`noise_std` is {std!r}; expected a number")
        if not (math.isfinite(std) and 0 <= std <= 1e4):
            raise ValueError(f"`noise_std` is {std!r}; expected 0-10000")
        counts = {}
        for key in ("n_cases", "n_labelled"):
            n = values.get(key, 0 if key == "n_labelled" else None)
            low = 0 if std or key == "n_labelled" else 1
            if isinstance(n, bool) or not isinstance(n, int) or not low <= n <= 100_000:
                raise ValueError(
                    f"`{key}` is {n!r}; expected a whole number {low}-100000"
                )
            counts[key] = n
        if counts["n_labelled"] > counts["n_cases"] and not std:
            raise ValueError("`n_labelled` exceeds `n_cases`")
        hist = {}
        for name, edges in HISTOGRAMS.items():
            h = np.asarray(values.get(name, []), dtype=np.float64)
            if h.shape != (3, len(edges) - 1) or not np.isfinite(h).all():
                raise ValueError(f"`{name}` must be 3 x {len(edges) - 1} counts")
            n = counts["n_labelled" if name in LABELLED else "n_cases"]
            if (h < 0).any() or (h != np.round(h)).any() or h.max() > 100_000:
                raise ValueError(f"`{name}` must hold whole counts 0-100000")
            if not std and (h.sum(1) != n).any():
                raise ValueError(f"`{name}` must hold {n} whole counts per row")
            hist[name] = h.astype(np.int64)
        return cls(counts["n_cases"], hist, counts["n_labelled"], float(std))

    def quantile(self, name: str, q: float) -> np.ndarray:
        """Per row, the ``q`` quantile (0-1) of a histogram (bin centres,
        interpolated between neighbouring ranks as numpy's default does).
        ValueError when a row holds no count."""
        return np.array([self.row_quantile(name, row, q) for row in range(3)])

    def row_quantile(self, name: str, row: int, q: float) -> float:
        """The ``q`` quantile of one row of a histogram (see :meth:`quantile`)."""
        edges = HISTOGRAMS[name]
        counts = self.histograms[name][row]
        if counts.sum() <= 0:
            raise ValueError(f"the fingerprint's `{name}` histogram is empty")
        centres = (edges[:-1] + edges[1:]) / 2
        return float(np.quantile(np.repeat(centres, counts), q))

    def summary(self) -> dict[str, Any]:
        """What a record shows of it: counts and quantiles, no bins."""
        out: dict[str, Any] = {
            "n_cases": self.n_cases,
            "n_labelled": self.n_labelled,
            "noise_std": round(self.noise_std, 3),
        }
        for name in HISTOGRAMS:
            if self.histograms[name].sum(1).min() > 0:
                out[f"{name}_median"] = [
                    round(float(v), 3) for v in self.quantile(name, 0.5)
                ]
        return out


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
        adc_clip=adc_clip(fp),
    )


def adc_clip(fp: Fingerprint) -> tuple[float, float]:
    """From 0 to the median case's 99.5th ADC percentile, rounded up to 0.5
    (within 1-10); the default clip when the fingerprint has no ADC range."""
    if fp.histograms["adc_range"][2].sum() <= 0:
        return Plan().adc_clip
    high = fp.row_quantile("adc_range", 2, 0.5)
    return (0.0, float(min(10.0, max(1.0, math.ceil(high * 2) / 2))))
