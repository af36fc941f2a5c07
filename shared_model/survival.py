"""Disease-free survival from counts: what sites send instead of per-patient times.

Kaplan-Meier curves and the log-rank test need, at each distinct time, only the
number of patients still at risk and the number of events. A site therefore
sends those two counts on a fixed grid of month bins (:class:`SurvivalCounts`);
the server adds the counts of all sites and computes the curve and the test
from the sums. No per-patient time leaves a site.

Discretisation (the one rule every site applies in :meth:`SurvivalCounts.from_times`):

* The grid has :data:`DFS_BINS` bins of :data:`DFS_BIN_MONTHS` months; bin ``k``
  (1-based) covers the times ``((k - 1) * width, k * width]``.
* A time ``t`` maps to ``k = ceil(t / width)``, clipped to ``[1, DFS_BINS]``;
  ``t = 0`` maps to bin 1.
* A time beyond the last bin (``t > DFS_BINS * width``) is censored at the last
  bin: the patient counts as at risk in every bin, and an event after the grid
  no longer counts as an event (administrative censoring at 120 months).
* Within a bin, events come before censorings (the usual convention, and
  lifelines' one): a patient censored in bin ``k`` is at risk at bin ``k``.

The results are therefore exactly those of the Kaplan-Meier estimator and the
log-rank test on the pooled times rounded up to the grid (``k * width``), which
the tests check against lifelines. With 1-month bins, rounding moves a
recurrence by less than a month, well below the follow-up interval of rectal
cancer surveillance (3 to 6 months).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import chi2 as chi2_dist
from scipy.stats import norm

DFS_BIN_MONTHS = 1.0
"""Width of one time bin, in months."""

DFS_BINS = 120
"""Number of bins: follow-up is counted up to 10 years, later times are censored."""

DFS_3Y_MONTHS = 36.0
"""The time point reported as 3-year disease-free survival."""


def _month_bins(times: np.ndarray) -> np.ndarray:
    """1-based bin index of each time; ``DFS_BINS + 1`` for times past the grid."""
    return np.clip(np.ceil(times / DFS_BIN_MONTHS), 1, DFS_BINS + 1).astype(np.int64)


@dataclass
class SurvivalCounts:
    """Numbers at risk and events per month bin for one group of patients.

    Counts from several sites add up (``+``); the sum equals the counts of the
    pooled patients, so the server never needs a patient's time.

    Attributes:
        at_risk: ``(DFS_BINS,)`` int64; ``at_risk[k - 1]`` is the number of
            patients whose discretised time is ``>= k`` (at risk at bin ``k``).
        events: ``(DFS_BINS,)`` int64; ``events[k - 1]`` is the number of events
            (recurrence or death) in bin ``k``.
    """

    at_risk: np.ndarray
    events: np.ndarray

    @classmethod
    def empty(cls) -> SurvivalCounts:
        """Counts of no patients (the neutral element of ``+``)."""
        return cls(np.zeros(DFS_BINS, np.int64), np.zeros(DFS_BINS, np.int64))

    @classmethod
    def from_times(
        cls, times: Sequence[float] | np.ndarray, events: Sequence[int] | np.ndarray
    ) -> SurvivalCounts:
        """Site side: count the patients of one group on the bin grid.

        Args:
            times: disease-free survival time of each patient, in months (time to
                recurrence or death, or to the last follow-up when censored).
            events: 1 when the time ends in an event, 0 when censored.

        Raises:
            ValueError: the lengths differ, a time is negative or not finite, or
                an event indicator is not 0 or 1.
        """
        try:
            t = np.asarray(times, dtype=np.float64).reshape(-1)
            e = np.asarray(events, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"survival times and events must be numbers ({err}); "
                "pass months as floats and events as 0/1"
            ) from err
        if t.shape != e.shape:
            raise ValueError(
                f"{t.size} survival times but {e.size} event indicators; "
                "pass one of each per patient"
            )
        bad_t = ~np.isfinite(t) | (t < 0)
        if bad_t.any():
            i = int(np.flatnonzero(bad_t)[0])
            raise ValueError(
                f"survival time #{i} is {float(t[i])!r} months; expected a finite number "
                ">= 0 (months from the start of treatment)"
            )
        bad_e = ~np.isin(e, (0.0, 1.0))
        if bad_e.any():
            i = int(np.flatnonzero(bad_e)[0])
            raise ValueError(
                f"event indicator #{i} is {e[i]:g}; expected 0 (censored) or 1 "
                "(recurrence or death)"
            )
        raw = _month_bins(t)
        counted = (e == 1.0) & (raw <= DFS_BINS)  # events after the grid: censored
        k = np.minimum(raw, DFS_BINS)
        per_bin = np.bincount(k - 1, minlength=DFS_BINS)
        at_risk = np.cumsum(per_bin[::-1])[::-1]
        ev = np.bincount(k[counted] - 1, minlength=DFS_BINS)
        return cls(at_risk.astype(np.int64), ev.astype(np.int64))

    def __add__(self, other: SurvivalCounts) -> SurvivalCounts:
        return SurvivalCounts(self.at_risk + other.at_risk, self.events + other.events)

    @property
    def n(self) -> int:
        """Number of patients (all are at risk at bin 1)."""
        return int(self.at_risk[0])

    @property
    def n_events(self) -> int:
        """Number of events counted on the grid."""
        return int(self.events.sum())

    @property
    def censored(self) -> np.ndarray:
        """``(DFS_BINS,)`` patients censored in each bin (leaving without an event)."""
        leaving = self.at_risk - np.append(self.at_risk[1:], 0)
        return leaving - self.events

    def to_values(self, prefix: str) -> dict[str, list[int]]:
        """Flat values for a Flower MetricRecord (two lists of ``DFS_BINS`` ints)."""
        return {
            f"{prefix}at-risk": self.at_risk.astype(int).tolist(),
            f"{prefix}events": self.events.astype(int).tolist(),
        }

    @classmethod
    def from_values(cls, values: Mapping[str, Any], prefix: str) -> SurvivalCounts:
        """Server side: rebuild the counts a site sent and check they are possible.

        Raises:
            ValueError: a key is missing, a list does not have ``DFS_BINS``
                whole non-negative numbers, or the counts could not come from
                real patients (at risk increasing, or more events in a bin than
                patients leaving it). The message names the key and the bin.
        """
        arrays = {}
        for name in ("at-risk", "events"):
            key = f"{prefix}{name}"
            if key not in values:
                raise ValueError(
                    f"survival record lacks `{key}`; the site must send both "
                    f"`{prefix}at-risk` and `{prefix}events` (same moefl version "
                    "on every site)"
                )
            arrays[name] = _whole_counts(values[key], key)
        at_risk, events = arrays["at-risk"], arrays["events"]
        rising = np.flatnonzero(np.diff(at_risk) > 0)
        if rising.size:
            k = int(rising[0]) + 1
            raise ValueError(
                f"`{prefix}at-risk` rises from {at_risk[k - 1]} at month bin {k} to "
                f"{at_risk[k]} at bin {k + 1}; numbers at risk can only fall. The "
                "record is corrupt; recompute it with SurvivalCounts.from_times"
            )
        leaving = at_risk - np.append(at_risk[1:], 0)
        excess = np.flatnonzero(events > leaving)
        if excess.size:
            k = int(excess[0]) + 1
            raise ValueError(
                f"`{prefix}events` has {events[k - 1]} events at month bin {k} but "
                f"only {leaving[k - 1]} of the {at_risk[k - 1]} patients at risk "
                "leave that bin; events cannot exceed them. The record is corrupt; "
                "recompute it with SurvivalCounts.from_times"
            )
        return cls(at_risk, events)


def _whole_counts(raw: Any, key: str) -> np.ndarray:
    """``raw`` as a ``(DFS_BINS,)`` int64 array of whole numbers >= 0."""
    try:
        arr = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{key}` must be a list of whole numbers ({err})") from err
    if arr.shape != (DFS_BINS,):
        raise ValueError(
            f"`{key}` has shape {arr.shape}; expected a list of {DFS_BINS} counts "
            f"(one per {DFS_BIN_MONTHS:g}-month bin, same moefl version on every site)"
        )
    bad = ~np.isfinite(arr) | (arr < 0) | (arr != np.round(arr))
    if bad.any():
        k = int(np.flatnonzero(bad)[0]) + 1
        raise ValueError(
            f"`{key}` holds {arr[k - 1]:g} at month bin {k}; expected whole "
            "numbers >= 0 (patient counts)"
        )
    return arr.astype(np.int64)


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level is {level!r}; expected a probability in (0, 1)")
    return float(norm.ppf(0.5 + level / 2))


def _loglog_interval(
    s: float, greenwood: float, z: float
) -> tuple[float, float] | None:
    """Interval of ``S`` on the log(-log) scale; None where that scale is
    undefined (``S`` of 0 or 1, where lifelines fills in 1.0 instead)."""
    if not 0.0 < s < 1.0 or not np.isfinite(greenwood):
        return None
    log_s = np.log(s)
    half = z * np.sqrt(greenwood) / log_s  # negative: log S < 0
    lower = float(np.exp(-np.exp(np.log(-log_s) - half)))
    upper = float(np.exp(-np.exp(np.log(-log_s) + half)))
    return lower, upper


def kaplan_meier(counts: SurvivalCounts, *, level: float = 0.95) -> dict[str, Any]:
    """Kaplan-Meier estimate of disease-free survival from (summed) counts.

    The curve is reported at the bins with at least one event, where it steps
    down; it is constant in between. Times are the bin ends, ``k * width``
    months, so they equal lifelines' times on the discretised data.

    Args:
        counts: counts of one group, usually summed over sites.
        level: confidence level of the intervals.

    Returns:
        A JSON-ready dict with

        * ``times``: months of the event bins; ``at_risk`` and ``n_events``
          (lists): patients at risk and events at those times;
        * ``survival``: the estimate after each time;
        * ``se``: Greenwood standard error ``S * sqrt(sum d / (n (n - d)))``;
        * ``ci_lower``, ``ci_upper``: the interval on the log(-log) scale
          (lifelines' default), ``exp(-exp(log(-log S) -/+ z * sqrt(V) / log S))``;
        * ``n``, ``events``: patients and events in total;
        * ``median``: first time at which ``S <= 0.5`` (None if not reached);
        * ``dfs_3y`` and ``dfs_3y_ci``: survival at :data:`DFS_3Y_MONTHS` and its
          interval (None when nobody was followed that long);
        * ``level``, ``bin_months``; ``max_follow_up``: the end of the last bin
          anyone reaches (the curve is flat from the last event to there).

        ``se`` and the intervals are None where undefined: once ``S`` reaches 0
        (every patient at risk had an event), and intervals also where ``S`` is 1.
    """
    z = _z(level)
    n_at = counts.at_risk.astype(np.float64)
    d = counts.events.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        step = np.where(n_at > 0, 1.0 - d / n_at, 1.0)
        term = np.where(d > 0, d / (n_at * (n_at - d)), 0.0)  # inf when d == n
    surv = np.cumprod(step)
    greenwood = np.cumsum(term)
    event_bins = np.flatnonzero(d > 0)

    se: list[float | None] = []
    lower: list[float | None] = []
    upper: list[float | None] = []
    for i in event_bins:
        ok = bool(np.isfinite(greenwood[i]))
        se.append(float(surv[i] * np.sqrt(greenwood[i])) if ok else None)
        ci = _loglog_interval(float(surv[i]), float(greenwood[i]), z)
        lower.append(None if ci is None else ci[0])
        upper.append(None if ci is None else ci[1])

    below = event_bins[surv[event_bins] <= 0.5]
    median = float((below[0] + 1) * DFS_BIN_MONTHS) if below.size else None

    k3 = min(max(int(np.ceil(DFS_3Y_MONTHS / DFS_BIN_MONTHS)), 1), DFS_BINS)
    dfs_3y: float | None = None
    dfs_3y_ci: list[float] | None = None
    if counts.at_risk[k3 - 1] > 0:
        dfs_3y = float(surv[k3 - 1])
        ci3 = _loglog_interval(dfs_3y, float(greenwood[k3 - 1]), z)
        dfs_3y_ci = None if ci3 is None else [ci3[0], ci3[1]]

    return {
        "n": counts.n,
        "events": counts.n_events,
        "times": [float((i + 1) * DFS_BIN_MONTHS) for i in event_bins],
        "at_risk": [int(counts.at_risk[i]) for i in event_bins],
        "n_events": [int(counts.events[i]) for i in event_bins],
        "survival": [float(surv[i]) for i in event_bins],
        "se": se,
        "ci_lower": lower,
        "ci_upper": upper,
        "median": median,
        "dfs_3y": dfs_3y,
        "dfs_3y_ci": dfs_3y_ci,
        "level": level,
        "bin_months": DFS_BIN_MONTHS,
        "max_follow_up": float(np.count_nonzero(counts.at_risk) * DFS_BIN_MONTHS),
    }


def logrank(groups: Mapping[str, SurvivalCounts]) -> dict[str, Any] | None:
    """Log-rank test that all groups share one survival curve, from counts.

    The multi-group test (Mantel-Haenszel): per bin, the expected events of a
    group are its share of the patients at risk times all events; the statistic
    is ``(O - E)' V^- (O - E)`` over the first ``G - 1`` groups with the
    hypergeometric covariance ``V``, chi-squared with ``G - 1`` degrees of
    freedom. With two groups this is the usual two-sample log-rank test. Equal
    to lifelines' ``multivariate_logrank_test`` on the discretised times.

    Args:
        groups: group name (e.g. a regimen) -> its counts, summed over sites.
            Groups without patients are left out.

    Returns:
        ``chi2``, ``df``, ``p_value`` and ``groups`` (name -> ``n``,
        ``observed`` and ``expected`` events), or None with fewer than two
        non-empty groups. Without any event the statistic is 0 and p is 1.
    """
    kept = {name: c for name, c in groups.items() if c.n > 0}
    if len(kept) < 2:
        return None
    n_gk = np.stack([c.at_risk for c in kept.values()]).astype(np.float64)  # (G, K)
    d_gk = np.stack([c.events for c in kept.values()]).astype(np.float64)
    n_k, d_k = n_gk.sum(0), d_gk.sum(0)
    live = n_k > 0
    n_gk, d_gk, n_k, d_k = n_gk[:, live], d_gk[:, live], n_k[live], d_k[live]
    share = n_gk / n_k  # (G, K)
    observed = d_gk.sum(1)
    expected = (share * d_k).sum(1)
    # Hypergeometric factor d (n - d) / (n - 1); with n = 1 the shares are 0/1
    # and the covariance term vanishes whatever the factor, so use 0.
    factor = np.where(n_k > 1, d_k * (n_k - d_k) / np.maximum(n_k - 1, 1), 0.0)
    cov = np.einsum("k,gk,hk->gh", factor, share, share)
    var = np.diag((factor * share).sum(1)) - cov  # (G, G)
    diff = (observed - expected)[:-1]
    stat = float(diff @ np.linalg.pinv(var[:-1, :-1]) @ diff)
    df = len(kept) - 1
    return {
        "chi2": stat,
        "df": df,
        "p_value": float(chi2_dist.sf(stat, df)),
        "groups": {
            name: {
                "n": c.n,
                "observed": int(observed[i]),
                "expected": float(expected[i]),
            }
            for i, (name, c) in enumerate(kept.items())
        },
    }
