"""A site's grouped update as the one vector secure aggregation sums.

Per parameter group, in a fixed order (:class:`Layout`): the site's
count-weighted update of every array of the group, then its patient count, then
1 if it trained the group (0 otherwise). A site without a group sends zeros for
it. The unmasked sum therefore gives the coordinator, per group, the summed
count-weighted update, the total count and the number of sites that trained it,
and nothing per site: :func:`secure_group_means` turns it into the count-weighted
mean per group, as :func:`shared_model.aggregation.grouped_mean` with the
``mean`` rule computes it from the sites' updates in the clear.

What the coordinator can no longer check under secure aggregation, because it
sees no site's update or counts: the reply checks on values and shapes of one
site's arrays, the update bound against the honest majority's step, the cap on a
site's share of a group's weight, and the robust rules (median, trimmed mean).
The site clips its own update (:func:`shared_model.robust.clip_update`) before
packing it; app pinning is what makes that clip the approved code's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """Group -> its arrays' names and shapes, in the federation's order."""

    groups: tuple[tuple[str, tuple[tuple[str, tuple[int, ...]], ...]], ...]

    @classmethod
    def of(
        cls, current: Mapping[str, np.ndarray], groups: Mapping[str, Sequence[str]]
    ) -> Layout:
        return cls(
            tuple(
                (g, tuple((n, tuple(np.shape(current[n]))) for n in names))
                for g, names in groups.items()
            )
        )

    @property
    def size(self) -> int:
        return sum(
            sum(int(np.prod(shape)) for _, shape in arrays) + 2
            for _, arrays in self.groups
        )


def clip_range(bound: float, max_count: int) -> float:
    """The largest magnitude in a packed vector of a site whose update has L2
    norm at most ``bound`` and whose counts are at most ``max_count``."""
    return float(max(max_count * bound, max_count, 1))


def pack(
    layout: Layout,
    delta: Mapping[str, Mapping[str, np.ndarray]],
    counts: Mapping[str, int],
    weights: Mapping[str, float] | None = None,
) -> np.ndarray:
    """One site's vector: per group the weighted update, the count and the 0/1
    of having trained it (``delta``: group -> name -> update). The weight is
    the count unless ``weights`` says otherwise (1 for an unweighted mean)."""
    parts = []
    for group, arrays in layout.groups:
        n = int(counts.get(group, 0))
        w = float(n if weights is None else weights.get(group, 0.0))
        for name, shape in arrays:
            if n > 0:
                value = np.asarray(delta[group][name], dtype=np.float64)
                if value.shape != shape:
                    raise ValueError(f"`{name}` has shape {value.shape}, not {shape}")
                parts.append(w * value.ravel())
            else:
                parts.append(np.zeros(int(np.prod(shape))))
        parts.append(np.array([float(n), 1.0 if n > 0 else 0.0]))
    return np.concatenate(parts)


@dataclass(frozen=True)
class GroupSum:
    """What the unmasked sum says of one group."""

    weighted: dict[str, np.ndarray]
    patients: float
    sites: int

    def mean(self, *, unweighted: bool = False) -> dict[str, np.ndarray] | None:
        """The mean update: the weighted sum over the patients, or (
        ``unweighted``: each site weighed 1) over the sites; None when no site
        (or no patient) is in the sum."""
        over = self.sites if unweighted else self.patients
        if self.sites < 1 or over < 0.5:
            return None
        return {name: w / over for name, w in self.weighted.items()}


def unpack(layout: Layout, total: np.ndarray) -> dict[str, GroupSum]:
    """The summed vector read back per group."""
    out, at = {}, 0
    for group, arrays in layout.groups:
        weighted = {}
        for name, shape in arrays:
            size = int(np.prod(shape))
            weighted[name] = np.asarray(total[at : at + size]).reshape(shape)
            at += size
        patients, sites = float(total[at]), int(round(float(total[at + 1])))
        at += 2
        out[group] = GroupSum(weighted, patients, sites)
    return out


def secure_group_means(
    current: Mapping[str, np.ndarray],
    sums: Mapping[str, GroupSum],
    *,
    min_sites: int = 1,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The new arrays from the unmasked sums: per group the current value plus
    the count-weighted mean update, where at least ``min_sites`` sites trained
    it (other groups keep their values). Returns the arrays and, per group, the
    number of sites that trained it."""
    out = {k: np.array(v, copy=True) for k, v in current.items()}
    trained = {}
    for group, s in sums.items():
        trained[group] = s.sites
        mean = s.mean()
        if s.sites < min_sites or mean is None:
            continue
        for name, m in mean.items():
            out[name] = (current[name] + m).astype(current[name].dtype)
    return out, trained


NOISE_SPAN = 6.0
"""Distributed DP: the quantization range covers an update coordinate plus this
many standard deviations of the site's noise share (a coordinate beyond it is
clipped to the range, about 2 in a billion)."""


def quantization_range(
    clip: float, max_patients: int, noise_multiplier: float
) -> float:
    """The range ``[-r, r]`` a site's packed vector is quantized over: weights
    up to ``max_patients`` times an update of L2 norm ``clip`` (plain), or an
    unweighted update and its noise share (``noise_multiplier`` > 0); counts
    up to ``max_patients`` either way."""
    if noise_multiplier > 0:
        return float(max(clip * (1.0 + NOISE_SPAN * noise_multiplier), max_patients))
    return clip_range(clip, max_patients)
