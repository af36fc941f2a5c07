"""Survival from per-site counts equals lifelines on the pooled discretised times."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test, multivariate_logrank_test

import shared_model.survival
from shared_model.survival import (
    DFS_BIN_MONTHS,
    DFS_BINS,
    SurvivalCounts,
    kaplan_meier,
    logrank,
)


def _discretise(times: np.ndarray, events: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The documented rule, written independently: times as bin ends in months,
    events after the grid censored at its last bin."""
    out_t, out_e = [], []
    for t, e in zip(times.tolist(), events.tolist(), strict=True):
        k = max(math.ceil(t / DFS_BIN_MONTHS), 1)
        if k > DFS_BINS:
            k, e = DFS_BINS, 0
        out_t.append(k * DFS_BIN_MONTHS)
        out_e.append(int(e))
    return np.asarray(out_t), np.asarray(out_e)


def _cohort(seed: int, n: int, scale: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """Exponential event times with uniform censoring; some exact ties and a few
    times past the grid."""
    rng = np.random.default_rng(seed)
    event_t = rng.exponential(scale, n)
    censor_t = rng.uniform(0, 140, n)
    times = np.minimum(event_t, censor_t)
    events = (event_t <= censor_t).astype(int)
    times[: n // 10] = np.round(times[: n // 10])  # integer months: ties at bin ends
    return times, events


def _lifelines_km(times: np.ndarray, events: np.ndarray) -> KaplanMeierFitter:
    dt, de = _discretise(times, events)
    return KaplanMeierFitter().fit(dt, de)


def _assert_km_matches(
    counts: SurvivalCounts, times: np.ndarray, events: np.ndarray
) -> None:
    km = kaplan_meier(counts)
    ref = _lifelines_km(times, events)
    dt, de = _discretise(times, events)
    event_times = np.unique(dt[de == 1])
    assert km["times"] == pytest.approx(event_times.tolist(), abs=0)
    assert km["n"] == len(times) and km["events"] == int(de.sum())
    sf = ref.survival_function_["KM_estimate"]
    ci = ref.confidence_interval_survival_function_
    for i, t in enumerate(km["times"]):
        assert km["survival"][i] == pytest.approx(sf.loc[t], abs=1e-10)
        if km["survival"][i] == 0.0:  # lifelines fills the undefined interval
            assert km["ci_lower"][i] is None and km["ci_upper"][i] is None
            continue
        assert km["ci_lower"][i] == pytest.approx(ci.iloc[:, 0].loc[t], abs=1e-10)
        assert km["ci_upper"][i] == pytest.approx(ci.iloc[:, 1].loc[t], abs=1e-10)
        # Greenwood: lifelines keeps the cumulative sum; SE = S * sqrt(sum).
        se = sf.loc[t] * np.sqrt(ref._cumulative_sq_.loc[t])
        assert km["se"][i] == pytest.approx(se, abs=1e-10)
    median = ref.median_survival_time_
    assert km["median"] == (None if np.isinf(median) else pytest.approx(median))
    if (dt >= 36).any():
        assert km["dfs_3y"] == pytest.approx(sf.loc[:36].iloc[-1], abs=1e-10)
        lower, upper = ci.loc[:36].iloc[-1]
        if 0.0 < km["dfs_3y"] < 1.0:
            assert km["dfs_3y_ci"] == pytest.approx([lower, upper], abs=1e-10)
        else:  # undefined on the log(-log) scale; lifelines fills in 1.0
            assert km["dfs_3y_ci"] is None
    else:
        assert km["dfs_3y"] is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kaplan_meier_matches_lifelines_on_pooled_sites(seed: int) -> None:
    sites = [_cohort(seed * 10 + s, n) for s, n in enumerate((60, 25, 140))]
    pooled_t = np.concatenate([t for t, _ in sites])
    pooled_e = np.concatenate([e for _, e in sites])
    summed = SurvivalCounts.empty()
    for t, e in sites:
        summed = summed + SurvivalCounts.from_times(t, e)
    pooled = SurvivalCounts.from_times(pooled_t, pooled_e)
    np.testing.assert_array_equal(summed.at_risk, pooled.at_risk)
    np.testing.assert_array_equal(summed.events, pooled.events)
    _assert_km_matches(summed, pooled_t, pooled_e)


def test_hand_worked_example() -> None:
    # bins 1..4: n = 5, 4, 2, 1; d = 1, 1, 1, 0 (one censored at 2, one at 4).
    counts = SurvivalCounts.from_times([0.4, 1.2, 2.0, 2.7, 3.5], [1, 1, 0, 1, 0])
    assert counts.at_risk[:5].tolist() == [5, 4, 2, 1, 0]
    assert counts.events[:5].tolist() == [1, 1, 1, 0, 0]
    assert counts.censored[:5].tolist() == [0, 1, 0, 1, 0]
    km = kaplan_meier(counts)
    assert km["times"] == [1.0, 2.0, 3.0]
    assert km["at_risk"] == [5, 4, 2] and km["n_events"] == [1, 1, 1]
    assert km["survival"] == pytest.approx([0.8, 0.6, 0.3])
    var = [1 / 20, 1 / 20 + 1 / 12, 1 / 20 + 1 / 12 + 1 / 2]
    expect_se = [s * math.sqrt(v) for s, v in zip([0.8, 0.6, 0.3], var, strict=True)]
    assert km["se"] == pytest.approx(expect_se)
    assert km["median"] == 3.0
    assert km["dfs_3y"] is None and km["dfs_3y_ci"] is None  # nobody followed 36 m


def test_ties_of_events_and_censorings_in_one_bin() -> None:
    # Bin 3 holds two events and two censorings (2.1, 2.5, 3.0, 2.9); the censored
    # patients count as at risk at bin 3, as in lifelines.
    times = np.array([2.1, 2.5, 3.0, 2.9, 0.0, 5.0, 7.5, 7.2])
    events = np.array([1, 0, 1, 0, 1, 1, 0, 1])
    counts = SurvivalCounts.from_times(times, events)
    assert counts.at_risk[2] == 7 and counts.events[2] == 2
    assert counts.censored[2] == 2
    assert counts.at_risk[0] == 8 and counts.events[0] == 1  # t = 0 is bin 1
    _assert_km_matches(counts, times, events)


def test_times_beyond_the_last_bin_are_censored_there() -> None:
    last = DFS_BINS * DFS_BIN_MONTHS
    times = np.array([last, last + 1e-6, last + 30.0, 50.0, 60.0])
    events = np.array([1, 1, 1, 1, 0])
    counts = SurvivalCounts.from_times(times, events)
    assert counts.n == 5
    assert counts.at_risk[-1] == 3  # all three end in the last bin
    assert counts.events[-1] == 1  # only the event at exactly 120 months counts
    assert counts.n_events == 2
    _assert_km_matches(counts, times, events)


def test_all_at_risk_fail_gives_zero_survival_without_interval() -> None:
    km = kaplan_meier(SurvivalCounts.from_times([1.0, 2.0, 2.0], [1, 1, 1]))
    assert km["survival"] == pytest.approx([2 / 3, 0.0])
    assert km["se"][1] is None and km["ci_lower"][1] is None
    assert km["median"] == 2.0


def test_empty_counts() -> None:
    km = kaplan_meier(SurvivalCounts.empty())
    assert km["n"] == 0 and km["times"] == [] and km["median"] is None
    assert km["dfs_3y"] is None


def _groups(seed: int, sizes: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        _cohort(seed * 100 + g, n, scale=25.0 + 15.0 * g) for g, n in enumerate(sizes)
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logrank_two_groups_matches_lifelines(seed: int) -> None:
    (ta, ea), (tb, eb) = _groups(seed, (70, 90))
    res = logrank(
        {
            "nCRT": SurvivalCounts.from_times(ta, ea),
            "TNT": SurvivalCounts.from_times(tb, eb),
        }
    )
    assert res is not None
    dta, dea = _discretise(ta, ea)
    dtb, deb = _discretise(tb, eb)
    ref = logrank_test(dta, dtb, event_observed_A=dea, event_observed_B=deb)
    assert res["chi2"] == pytest.approx(ref.test_statistic, abs=1e-8)
    assert res["p_value"] == pytest.approx(ref.p_value, abs=1e-8)
    assert res["df"] == 1
    g = res["groups"]
    assert g["nCRT"]["observed"] == int(dea.sum()) and g["TNT"]["n"] == 90
    total_o = g["nCRT"]["observed"] + g["TNT"]["observed"]
    assert g["nCRT"]["expected"] + g["TNT"]["expected"] == pytest.approx(total_o)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logrank_three_groups_matches_lifelines(seed: int) -> None:
    cohorts = _groups(seed, (40, 55, 30))
    names = ("nCRT", "TNT", "nCT")
    res = logrank(
        {
            n: SurvivalCounts.from_times(t, e)
            for n, (t, e) in zip(names, cohorts, strict=True)
        }
    )
    assert res is not None and res["df"] == 2
    disc = [_discretise(t, e) for t, e in cohorts]
    ref = multivariate_logrank_test(
        np.concatenate([t for t, _ in disc]),
        np.concatenate([[n] * len(t) for n, (t, _) in zip(names, disc, strict=True)]),
        np.concatenate([e for _, e in disc]),
    )
    assert res["chi2"] == pytest.approx(ref.test_statistic, abs=1e-8)
    assert res["p_value"] == pytest.approx(ref.p_value, abs=1e-8)


def test_logrank_leaves_out_empty_groups() -> None:
    a = SurvivalCounts.from_times([1.0, 5.0, 9.0], [1, 0, 1])
    assert logrank({"a": a}) is None
    assert logrank({"a": a, "b": SurvivalCounts.empty()}) is None
    b = SurvivalCounts.from_times([2.0, 3.0], [1, 1])
    res = logrank({"a": a, "b": b, "c": SurvivalCounts.empty()})
    assert res is not None and set(res["groups"]) == {"a", "b"} and res["df"] == 1


def test_logrank_without_events_is_null() -> None:
    res = logrank(
        {
            "a": SurvivalCounts.from_times([3.0, 4.0], [0, 0]),
            "b": SurvivalCounts.from_times([5.0], [0]),
        }
    )
    assert res is not None and res["chi2"] == 0.0 and res["p_value"] == 1.0


# --- records ---------------------------------------------------------------------


def test_values_round_trip() -> None:
    counts = SurvivalCounts.from_times(*_cohort(3, 50))
    values = counts.to_values("dfs-nCRT-")
    assert set(values) == {"dfs-nCRT-at-risk", "dfs-nCRT-events"}
    assert all(len(v) == DFS_BINS for v in values.values())
    back = SurvivalCounts.from_values(values, "dfs-nCRT-")
    np.testing.assert_array_equal(back.at_risk, counts.at_risk)
    np.testing.assert_array_equal(back.events, counts.events)
    assert back.at_risk.dtype == np.int64


def _valid() -> dict[str, list[int]]:
    return SurvivalCounts.from_times([1.0, 2.0, 4.0, 4.5], [1, 0, 1, 0]).to_values("x-")


def _with(key: str, index: int, value: float) -> dict[str, list]:
    values: dict[str, list] = {k: list(v) for k, v in _valid().items()}
    values[key][index] = value
    return values


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({**_valid(), "x-events": [0] * (DFS_BINS - 1)}, r"`x-events` has shape"),
        ({"x-at-risk": _valid()["x-at-risk"]}, r"lacks `x-events`"),
        (_with("x-events", 5, -1), r"`x-events` holds -1 at month bin 6"),
        (_with("x-at-risk", 7, 1.5), r"holds 1.5 at month bin 8"),
        (_with("x-at-risk", 10, 3), r"rises from 0 at month bin 10 to 3"),
        (_with("x-events", 0, 5), r"5 events at month bin 1 but only 1 of the 4"),
        # events <= at_risk but more than the patients leaving the bin
        (_with("x-events", 2, 1), r"1 events at month bin 3 but only 0 of the 2"),
    ],
    ids=["length", "missing", "negative", "fraction", "increasing", "over", "leaving"],
)
def test_from_values_rejects_malformed_records(values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SurvivalCounts.from_values(values, "x-")


@pytest.mark.parametrize(
    ("times", "events", "match"),
    [
        ([1.0, -0.5], [0, 1], r"time #1 is -0.5"),
        ([float("nan")], [1], r"time #0 is nan"),
        ([float("inf")], [0], r"time #0 is inf"),
        ([1.0, 2.0], [1, 2], r"event indicator #1 is 2;"),
        ([1.0, 2.0], [1], r"2 survival times but 1 event"),
    ],
)
def test_from_times_rejects_bad_input(times: list, events: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SurvivalCounts.from_times(times, events)


patients = st.lists(
    st.tuples(
        st.floats(0.0, 150.0, allow_nan=False, allow_infinity=False),
        st.sampled_from([0, 1]),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(patients, patients)
def test_adding_counts_equals_counting_the_union(
    a: list[tuple[float, int]], b: list[tuple[float, int]]
) -> None:
    def count(ps: list[tuple[float, int]]) -> SurvivalCounts:
        return SurvivalCounts.from_times([t for t, _ in ps], [e for _, e in ps])

    summed, union = count(a) + count(b), count(a + b)
    np.testing.assert_array_equal(summed.at_risk, union.at_risk)
    np.testing.assert_array_equal(summed.events, union.events)
    assert union.n == len(a) + len(b)
    # every real record passes the server-side validation
    back = SurvivalCounts.from_values(summed.to_values("p-"), "p-")
    np.testing.assert_array_equal(back.events, union.events)


def test_module_imports_only_numpy_scipy_and_stdlib() -> None:
    tree = ast.parse(Path(shared_model.survival.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert roots <= {
        "__future__",
        "collections",
        "dataclasses",
        "typing",
        "numpy",
        "scipy",
    }
