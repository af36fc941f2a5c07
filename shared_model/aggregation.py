"""Grouped aggregation maths, written as sums (no Flower here).

Each site uploads the parameter groups it trained: always ``shared``, and the
expert of each regimen present in its training data, with a count per group
(``n-shared``, ``n-nCRT``, ...). For every group the new global value is

    w_g = sum_s n_{s,g} * w_{s,g} / sum_s n_{s,g}

over the sites that uploaded it with a positive count; a group nobody trained
keeps its previous value exactly. Because only the two sums are needed, the
same rule can run under secure summation. Updates are folded in a fixed order
(by site name), so the floating-point result does not depend on arrival order.

An optional server optimiser (FedAdam) is applied to the grouped mean per
group: ``delta = mean - current``, Adam moments per parameter, and only the
groups that were trained this round move.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from shared_model.reply_values import MAX_SITE_PATIENTS
from shared_model.robust import (
    SiteUpdate,
    aggregation_rule,
    capped_shares,
    clip_update,
    deltas,
    l2,
    rebuild_update,
)


def verify_update(
    update: SiteUpdate,
    reference: Mapping[str, np.ndarray],
    groups: Mapping[str, Sequence[str]],
) -> list[str]:
    """Problems that make an update unusable (empty list: usable).

    Checks: every array name is known and has the reference shape and dtype,
    values are finite, counts are whole numbers from 0 to
    :data:`MAX_SITE_PATIENTS` for known groups, and a group with a positive
    count is uploaded whole.
    """
    problems = []
    for name, value in update.arrays.items():
        if name not in reference:
            problems.append(f"unknown array `{name}`")
        elif not isinstance(value, np.ndarray) or value.dtype != reference[name].dtype:
            dtype = getattr(value, "dtype", type(value).__name__)
            problems.append(
                f"`{name}` has dtype {dtype}, expected {reference[name].dtype}"
            )
        elif tuple(value.shape) != tuple(reference[name].shape):
            problems.append(
                f"`{name}` has shape {tuple(value.shape)}, expected "
                f"{tuple(reference[name].shape)}"
            )
        elif not np.isfinite(value).all():
            problems.append(f"`{name}` holds NaN or infinite values")
    for group, n in update.counts.items():
        if group not in groups:
            problems.append(f"unknown group `{group}`")
        elif (
            not isinstance(n, (int, np.integer))
            or isinstance(n, bool)
            or not 0 <= n <= MAX_SITE_PATIENTS
        ):
            problems.append(
                f"count of `{group}` is {n!r}; expected a whole number from 0 to "
                f"{MAX_SITE_PATIENTS}"
            )
        elif n > 0:
            missing = [k for k in groups[group] if k not in update.arrays]
            if missing:
                problems.append(
                    f"group `{group}` has count {n} but {len(missing)} of its "
                    f"arrays are missing (e.g. `{missing[0]}`)"
                )
    return problems


@dataclass
class GroupResult:
    """Which sites updated a group, with how many patients."""

    sites: list[str] = field(default_factory=list)
    n: int = 0
    updated: bool = False


def grouped_mean(
    current: Mapping[str, np.ndarray],
    updates: Sequence[SiteUpdate],
    groups: Mapping[str, Sequence[str]],
    *,
    min_sites: Mapping[str, int] | None = None,
    rule: str = "mean",
    max_share: float = 1.0,
    trim_fraction: float = 0.2,
    shares_out: dict[str, dict[str, float]] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, GroupResult]]:
    """Aggregate each group over the sites that trained it.

    Args:
        current: the global arrays before the round.
        updates: verified site updates (any order; folded sorted by site).
        groups: group -> parameter names.
        min_sites: group -> minimum number of sites that must have trained it
            for it to change this round (default 1).
        rule: a name of :data:`shared_model.robust.AGGREGATION_RULES`:
            ``mean`` (count-weighted), ``median`` or ``trimmed-mean``
            (coordinate-wise over the contributing sites, unweighted).
        max_share: ``mean``: no site's share of a group's weight above this
            while two or more sites trained it
            (:func:`shared_model.robust.capped_shares`).
        trim_fraction: ``trimmed-mean``: the share cut from each end.
        shares_out: filled with group -> site -> share where the cap changed
            the count-weighted shares.

    Returns:
        The new arrays (unchanged groups are the exact previous values) and,
        per group, the contributing sites and patient count.
    """
    combine = aggregation_rule(rule)
    out = {k: v for k, v in current.items()}
    info: dict[str, GroupResult] = {}
    ordered = sorted(updates, key=lambda u: u.site)
    for group, names in groups.items():
        contributors = [u for u in ordered if u.counts.get(group, 0) > 0]
        res = GroupResult(
            sites=[u.site for u in contributors],
            n=int(sum(u.counts[group] for u in contributors)),
        )
        info[group] = res
        need = (min_sites or {}).get(group, 1)
        if not contributors or len(contributors) < need:
            continue
        counts = {u.site: u.counts[group] for u in contributors}
        shares = capped_shares(counts, max_share)
        natural = {s: n / float(res.n) for s, n in counts.items()}
        if shares_out is not None and any(
            abs(shares[s] - natural[s]) > 1e-12 for s in shares
        ):
            shares_out[group] = shares
        weights = [shares[u.site] for u in contributors]
        for name in names:
            values = [u.arrays[name] for u in contributors]
            acc = combine(values, weights, trim_fraction)
            out[name] = acc.astype(current[name].dtype)
        res.updated = True
    return out, info


@dataclass
class AdamState:
    """Server-side Adam moments (FedAdam), per parameter, plus the step count."""

    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)
    t: int = 0


def fedadam_step(
    current: Mapping[str, np.ndarray],
    mean: Mapping[str, np.ndarray],
    updated_names: Sequence[str],
    state: AdamState,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> dict[str, np.ndarray]:
    """Apply FedAdam (Reddi et al. 2021) to the grouped mean, in place on ``state``.

    Only ``updated_names`` move; others keep their exact previous value.
    """
    out = dict(current)
    state.t += 1
    for name in updated_names:
        delta = np.asarray(mean[name], np.float64) - np.asarray(
            current[name], np.float64
        )
        m = state.m.get(name, np.zeros_like(delta))
        v = state.v.get(name, np.zeros_like(delta))
        m = beta1 * m + (1 - beta1) * delta
        v = beta2 * v + (1 - beta2) * delta**2
        state.m[name], state.v[name] = m, v
        step = lr * m / (np.sqrt(v) + tau)
        out[name] = (np.asarray(current[name], np.float64) + step).astype(
            current[name].dtype
        )
    return out


@dataclass
class CentralDPResult:
    """What client-level DP did in one round."""

    norms: dict[str, float] = field(default_factory=dict)  # before clipping
    clipped: list[str] = field(default_factory=list)
    noise_std: dict[str, float] = field(default_factory=dict)  # per updated group


def central_dp_mean(
    current: Mapping[str, np.ndarray],
    updates: Sequence[SiteUpdate],
    groups: Mapping[str, Sequence[str]],
    *,
    clip: float,
    noise_multiplier: float,
    rng: np.random.Generator,
    min_sites: Mapping[str, int] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, GroupResult], CentralDPResult]:
    """Client-level DP aggregation (DP-FedAvg with fixed clipping).

    Each site's whole update (all the groups it trained) is scaled to an L2
    norm of at most ``clip``; every group is the *unweighted* mean of the
    clipped updates of the sites that trained it, plus Gaussian noise of
    standard deviation ``noise_multiplier * clip / k_g`` (``k_g``: those
    sites). Equivalently, the per-group sums of clipped updates (one site
    moves all of them together by at most ``clip``) get noise
    ``noise_multiplier * clip``: the Gaussian mechanism on a sum with L2
    sensitivity ``clip``; dividing by the public ``k_g`` is post-processing.
    Patient counts are not used as weights: they would change the
    sensitivity.
    """
    result = CentralDPResult()
    clipped: list[SiteUpdate] = []
    for u in sorted(updates, key=lambda u: u.site):
        delta = deltas(current, u, groups)
        result.norms[u.site] = math.sqrt(sum(n * n for n in map(l2, delta.values())))
        cut = clip_update(delta, clip)
        if cut.scale < 1.0:
            result.clipped.append(u.site)
            u = rebuild_update(current, u, cut.delta)
        ones = {g: int(n_g > 0) for g, n_g in u.counts.items()}
        clipped.append(SiteUpdate(u.site, u.arrays, ones))
    mean, info = grouped_mean(current, clipped, groups, min_sites=min_sites)
    by_site = {u.site: u for u in updates}
    for group, res in info.items():
        res.n = int(sum(by_site[s].counts[group] for s in res.sites))
        if not res.updated:
            continue
        std = noise_multiplier * clip / len(res.sites)
        result.noise_std[group] = std
        for name in groups[group]:
            noisy = np.asarray(mean[name], np.float64) + rng.normal(
                0.0, std, size=current[name].shape
            )
            mean[name] = noisy.astype(current[name].dtype)
    return mean, info, result
