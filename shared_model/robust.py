"""Bounded influence: what one site's update can do to the global model.

Three rules, applied in this order to the replies a round accepted:

1. **Update bound** (``update-bound``, a multiple; 0 turns it off). A site's
   update of a group is its arrays minus the current global ones. Its size is
   measured per coordinate, as an RMS step: ``rms(s, g) = ||delta_sg|| /
   sqrt(P_g)`` (``P_g``: the group's parameter count), and a site's own RMS step
   over every coordinate it trained is ``rms(s)``. The round's reference is the
   lower median of ``rms(s)`` over the accepted sites (with one site in two or
   more sending anything, the honest majority sets it), and every update of a
   group is scaled down, when larger, to ``update-bound * reference *
   sqrt(P_g)``. One reference per round, in units every group shares (AdamW,
   the sites' optimiser, moves each coordinate by about its learning rate per
   step), so the bound also covers a group only one site trains (the nCT
   expert).
2. **Fixed clip** (``client-dp-clip`` > 0): each site's whole update is scaled
   to an L2 norm of at most the clip, with or without client-level DP noise
   (:func:`clip_update`, the one clipping function: client-level DP and any
   later norm bound use it).
3. **Weights the coordinator controls**: a group's count-weighted mean gives no
   site more than ``max-site-share`` of the weight while at least two sites
   trained it (the excess goes to the others in proportion to their counts;
   when no split honours the cap, the weights are equal). A group one site
   trains is that site's alone: the bound above is what limits it.

The aggregation rule itself is selectable (``aggregation``), by name from
:data:`AGGREGATION_RULES`: ``mean`` (the count-weighted mean, under the cap
above), ``median`` (coordinate-wise median of the contributing sites,
unweighted) and ``trimmed-mean`` (coordinate-wise, ``trim-fraction`` cut from
each end, unweighted; scipy's ``trim_mean``).
:func:`shared_model.aggregation.grouped_mean` applies the chosen rule to each
parameter of each group.

What a hostile site can still do, with every rule on: move each group it
trains by at most its share times the bound per round, in any direction it
likes (a bounded update can still point the wrong way), and set a group that no
other site trains within the same bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SiteUpdate:
    """One site's reply: the arrays it trained and its counts per group."""

    site: str
    arrays: Mapping[str, np.ndarray]
    counts: Mapping[str, int]  # group -> number of patients that trained it


@dataclass
class BoundReport:
    """What the bounds did in one round (kept in the run record).

    Attributes:
        reference: the round's reference RMS step (None: bound off or no site).
        multiple: ``update-bound``.
        rms: site -> its RMS step over everything it trained.
        norms: site -> group -> L2 norm of its update before any scaling.
        clipped: site -> group -> the factor its update was scaled by (< 1).
        fixed_clip: site -> the factor ``client-dp-clip`` scaled it by (< 1).
        shares: group -> site -> weight share, where the cap changed them.
    """

    reference: float | None = None
    multiple: float = 0.0
    rms: dict[str, float] = field(default_factory=dict)
    norms: dict[str, dict[str, float]] = field(default_factory=dict)
    clipped: dict[str, dict[str, float]] = field(default_factory=dict)
    fixed_clip: dict[str, float] = field(default_factory=dict)
    shares: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_record(self) -> dict[str, object]:
        """The run record's ``bounds`` entry."""
        return {
            "multiple": self.multiple,
            "reference_rms": self.reference,
            "rms": self.rms,
            "norms": self.norms,
            "clipped": self.clipped,
            **({"fixed_clip": self.fixed_clip} if self.fixed_clip else {}),
            **({"capped_shares": self.shares} if self.shares else {}),
        }


def trained_groups(
    update: SiteUpdate, groups: Mapping[str, Sequence[str]]
) -> list[str]:
    """The groups ``update`` trained (a positive count), in ``groups`` order."""
    return [g for g in groups if update.counts.get(g, 0) > 0 and groups[g]]


def deltas(
    current: Mapping[str, np.ndarray],
    update: SiteUpdate,
    groups: Mapping[str, Sequence[str]],
) -> dict[str, dict[str, np.ndarray]]:
    """group -> name -> the update (float64) of every group ``update`` trained."""
    return {
        g: {
            n: np.asarray(update.arrays[n], np.float64)
            - np.asarray(current[n], np.float64)
            for n in groups[g]
        }
        for g in trained_groups(update, groups)
    }


def l2(arrays: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of several arrays taken together."""
    return math.sqrt(sum(float(np.sum(a * a)) for a in arrays.values()))


def lower_median(values: Sequence[float]) -> float:
    """The median, or the lower of the two middle values: with one outlier
    among two or more values it is never the outlier's when that is the
    largest."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


@dataclass(frozen=True)
class ClippedUpdate:
    """A site's update after :func:`clip_update`.

    Attributes:
        delta: group -> name -> the (float64) update, scaled when it was above
            the bound, else the very arrays given.
        norm: the update's L2 norm over all its groups before clipping.
        scale: the factor it was scaled by (1.0: at or under the bound).
    """

    delta: dict[str, dict[str, np.ndarray]]
    norm: float
    scale: float


def clip_update(
    delta: Mapping[str, Mapping[str, np.ndarray]], bound: float
) -> ClippedUpdate:
    """Scale one site's whole update (group -> name -> the update, as
    :func:`deltas` gives it) to an L2 norm of at most ``bound`` (> 0).

    The norm is taken over every group together, so the site moves all the
    groups it trained by at most ``bound`` in total: the L2 sensitivity of a
    sum of clipped updates. An update at or under the bound comes back as it
    is (``scale`` 1.0). The one clipping function of the federation: the fixed
    clip (``client-dp-clip``) and client-level DP use it, as will any other
    norm bound on a site's update.
    """
    if not bound > 0:
        raise ValueError(f"the clipping bound must be > 0, not {bound!r}")
    norm = math.sqrt(sum(l2(d) ** 2 for d in delta.values()))
    parts = {g: dict(group) for g, group in delta.items()}
    if norm <= bound:
        return ClippedUpdate(parts, norm, 1.0)
    scale = bound / norm
    for group in parts.values():
        for n in group:
            group[n] = group[n] * scale
    return ClippedUpdate(parts, norm, scale)


def rebuild_update(
    current: Mapping[str, np.ndarray],
    update: SiteUpdate,
    diffs: Mapping[str, Mapping[str, np.ndarray]],
) -> SiteUpdate:
    """``update`` with the arrays ``current + diffs`` (in ``current``'s dtypes)."""
    arrays = {
        n: (np.asarray(current[n], np.float64) + d).astype(current[n].dtype)
        for parts in diffs.values()
        for n, d in parts.items()
    }
    return SiteUpdate(update.site, arrays, update.counts)


def bound_updates(
    current: Mapping[str, np.ndarray],
    updates: Sequence[SiteUpdate],
    groups: Mapping[str, Sequence[str]],
    *,
    multiple: float,
    fixed_clip: float = 0.0,
) -> tuple[list[SiteUpdate], BoundReport]:
    """Scale every update to the round's bound and to ``fixed_clip`` (rules 1
    and 2 of the module docstring); returns the scaled updates and what was
    done. ``multiple`` 0 and ``fixed_clip`` 0 leave the updates as they are."""
    report = BoundReport(multiple=multiple)
    diffs = {u.site: deltas(current, u, groups) for u in updates}
    sizes = {g: sum(int(np.size(current[n])) for n in groups[g]) for g in groups}
    for u in updates:
        report.norms[u.site] = {g: l2(d) for g, d in diffs[u.site].items()}
        coords = sum(sizes[g] for g in diffs[u.site])
        total = math.sqrt(sum(v * v for v in report.norms[u.site].values()))
        report.rms[u.site] = total / math.sqrt(coords) if coords else 0.0
    trained = [s for s in report.rms if diffs[s]]
    if multiple > 0 and trained:
        report.reference = lower_median([report.rms[s] for s in trained])
        for u in updates:
            for g, group in diffs[u.site].items():
                bound = multiple * report.reference * math.sqrt(sizes[g])
                norm = report.norms[u.site][g]
                if norm > bound:
                    scale = bound / norm
                    report.clipped.setdefault(u.site, {})[g] = scale
                    for n in group:
                        group[n] = group[n] * scale
    if fixed_clip > 0:
        for u in updates:
            clipped = clip_update(diffs[u.site], fixed_clip)
            if clipped.scale < 1.0:
                report.fixed_clip[u.site] = clipped.scale
                diffs[u.site] = clipped.delta
    changed = set(report.clipped) | set(report.fixed_clip)
    out = [
        rebuild_update(current, u, diffs[u.site]) if u.site in changed else u
        for u in updates
    ]
    return out, report


def capped_shares(counts: Mapping[str, float], cap: float) -> dict[str, float]:
    """Each site's share of a group's weight: its count over the total, with no
    share above ``cap`` (the excess goes to the others in proportion to their
    counts; equal shares when ``cap`` times the number of sites is below 1)."""
    total = float(sum(counts.values()))
    shares = {s: float(n) / total for s, n in counts.items()}
    if len(shares) < 2 or cap >= 1.0:
        return shares
    if cap * len(shares) < 1.0:
        return {s: 1.0 / len(shares) for s in shares}
    fixed: dict[str, float] = {}
    while True:
        free = {s: counts[s] for s in shares if s not in fixed}
        left = 1.0 - cap * len(fixed)
        free_total = float(sum(free.values()))
        over = [s for s, n in free.items() if left * n / free_total > cap + 1e-12]
        if not over:
            return {
                s: (cap if s in fixed else left * counts[s] / free_total)
                for s in shares
            }
        fixed.update(dict.fromkeys(over, cap))


AggregationRule = Callable[[Sequence[np.ndarray], Sequence[float], float], np.ndarray]
"""An aggregation rule: ``rule(values, weights, trim_fraction)`` -> one
parameter's new value (float64) from the contributing sites' values of it
(sorted by site name) and their weights (shares summing to 1; rules that are
unweighted ignore them)."""


def weighted_mean(
    values: Sequence[np.ndarray], weights: Sequence[float], trim_fraction: float = 0.0
) -> np.ndarray:
    """``sum_s w_s * v_s``, folded in the order given (float64)."""
    acc = np.zeros(np.shape(values[0]), dtype=np.float64)
    for weight, value in zip(weights, values, strict=True):
        acc += weight * np.asarray(value, np.float64)
    return acc


def _stacked(values: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([np.asarray(v, np.float64) for v in values])


def coordinate_median(
    values: Sequence[np.ndarray], weights: Sequence[float], trim_fraction: float = 0.0
) -> np.ndarray:
    """The coordinate-wise median of ``values`` (unweighted)."""
    return coordinate_rule(_stacked(values), "median", trim_fraction)


def coordinate_trimmed_mean(
    values: Sequence[np.ndarray], weights: Sequence[float], trim_fraction: float = 0.2
) -> np.ndarray:
    """The coordinate-wise mean of ``values`` with ``trim_fraction`` of them cut
    from each end (unweighted)."""
    return coordinate_rule(_stacked(values), "trimmed-mean", trim_fraction)


AGGREGATION_RULES: dict[str, AggregationRule] = {
    "mean": weighted_mean,
    "median": coordinate_median,
    "trimmed-mean": coordinate_trimmed_mean,
}
"""The aggregation rules by their ``aggregation`` run-config name. A new rule
is one entry here; the bounds above, the share cap (which sets the weights)
and :func:`shared_model.aggregation.grouped_mean` stay as they are."""

AGGREGATIONS = tuple(AGGREGATION_RULES)
"""The accepted values of ``aggregation``."""


def aggregation_rule(name: str) -> AggregationRule:
    """The rule called ``name``; ValueError for an unknown one."""
    try:
        return AGGREGATION_RULES[name]
    except KeyError:
        raise ValueError(
            f"unknown aggregation rule {name!r}; known: {', '.join(AGGREGATIONS)}"
        ) from None


def coordinate_rule(stacked: np.ndarray, rule: str, trim_fraction: float) -> np.ndarray:
    """The coordinate-wise ``median`` or ``trimmed-mean`` over axis 0."""
    if rule == "median":
        return np.asarray(np.median(stacked, axis=0))
    if rule == "trimmed-mean":
        from scipy.stats import trim_mean

        return np.asarray(trim_mean(stacked, trim_fraction, axis=0))
    raise ValueError(f"unknown coordinate-wise rule {rule!r}")
