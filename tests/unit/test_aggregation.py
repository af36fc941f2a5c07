"""Grouped aggregation and count-based metrics against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from shared_model.aggregation import (
    AdamState,
    SiteUpdate,
    fedadam_step,
    grouped_mean,
    verify_update,
)
from shared_model.federated_metrics import (
    AUC_BINS,
    auc_from_histograms,
    score_histograms,
)

GROUPS = {
    "shared": ["enc.w"],
    "expert/nCRT": ["e0.w"],
    "expert/TNT": ["e1.w"],
    "expert/nCT": ["e2.w"],
}
CURRENT = {
    name: np.full((2, 3), float(i), dtype=np.float32)
    for i, name in enumerate(["enc.w", "e0.w", "e1.w", "e2.w"])
}

counts = st.fixed_dictionaries({g: st.integers(0, 50) for g in GROUPS})
site = st.tuples(counts, st.floats(-5, 5))


def _update(name: str, c: dict[str, int], value: float) -> SiteUpdate:
    arrays = {
        k: np.full((2, 3), value, np.float32)
        for g, names in GROUPS.items()
        for k in names
        if c[g] > 0 or g == "shared"
    }
    return SiteUpdate(name, arrays, c)


@settings(max_examples=60, deadline=None)
@given(st.lists(site, min_size=1, max_size=5))
def test_grouped_mean_is_the_count_weighted_mean_of_those_who_trained(sites) -> None:
    updates = [_update(f"s{i}", c, v) for i, (c, v) in enumerate(sites)]
    new, info = grouped_mean(CURRENT, updates, GROUPS)
    for group, names in GROUPS.items():
        trained = [(c[group], v) for c, v in sites if c[group] > 0]
        for name in names:
            if not trained:
                assert np.array_equal(new[name], CURRENT[name])  # kept exactly
                assert not info[group].updated
            else:
                expected = sum(n * v for n, v in trained) / sum(n for n, _ in trained)
                assert np.allclose(new[name], expected, atol=1e-5)
                assert info[group].n == sum(n for n, _ in trained)
            assert new[name].dtype == np.float32


@settings(max_examples=30, deadline=None)
@given(st.lists(site, min_size=2, max_size=5), st.randoms())
def test_result_does_not_depend_on_arrival_order(sites, rnd) -> None:
    updates = [_update(f"s{i}", c, v) for i, (c, v) in enumerate(sites)]
    a, _ = grouped_mean(CURRENT, updates, GROUPS)
    shuffled = list(updates)
    rnd.shuffle(shuffled)
    b, _ = grouped_mean(CURRENT, shuffled, GROUPS)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@settings(max_examples=40, deadline=None)
@given(counts, st.floats(-5, 5), st.integers(1, 4))
def test_a_single_contributor_gives_exactly_its_upload(c, value, others) -> None:
    c = {**c, "expert/nCT": max(c["expert/nCT"], 1)}
    lone = _update("lone", c, value)
    rest = [_update(f"o{i}", {**c, "expert/nCT": 0}, 9.0) for i in range(others)]
    new, info = grouped_mean(CURRENT, [*rest, lone], GROUPS)
    assert np.array_equal(new["e2.w"], lone.arrays["e2.w"])
    assert info["expert/nCT"].sites == ["lone"]


def test_min_sites_per_group_keeps_the_previous_value() -> None:
    c = {"shared": 10, "expert/nCRT": 5, "expert/TNT": 0, "expert/nCT": 3}
    updates = [_update("a", c, 1.0), _update("b", {**c, "expert/nCT": 0}, 2.0)]
    new, info = grouped_mean(
        CURRENT, updates, GROUPS, min_sites={"expert/nCT": 2, "shared": 2}
    )
    assert np.array_equal(new["e2.w"], CURRENT["e2.w"]) and info[
        "expert/nCT"
    ].sites == ["a"]
    assert np.allclose(new["enc.w"], 1.5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda u: u.arrays.update({"bogus": np.zeros(1)}), "unknown array"),
        (lambda u: u.arrays.update({"enc.w": np.zeros((3, 2), np.float32)}), "shape"),
        (
            lambda u: u.arrays.update({"enc.w": np.full((2, 3), np.nan, np.float32)}),
            "NaN",
        ),
        (lambda u: u.counts.update({"expert/TNT": -1}), "whole number"),
        (lambda u: u.counts.update({"expert/TNT": 4}), "arrays are missing"),
        (lambda u: u.counts.update({"expert/other": 4}), "unknown group"),
    ],
)
def test_poisoned_updates_are_named(change, message) -> None:
    u = _update(
        "a", {"shared": 3, "expert/nCRT": 3, "expert/TNT": 0, "expert/nCT": 0}, 1.0
    )
    assert verify_update(u, CURRENT, GROUPS) == []
    u = SiteUpdate(u.site, dict(u.arrays), dict(u.counts))
    change(u)
    problems = verify_update(u, CURRENT, GROUPS)
    assert problems and message in " ".join(problems)


def test_fedadam_moves_only_trained_groups_and_matches_the_formula() -> None:
    mean = {k: v + 1.0 for k, v in CURRENT.items()}
    state = AdamState()
    out = fedadam_step(
        CURRENT, mean, ["enc.w"], state, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3
    )
    m, v = 0.1 * 1.0, 0.01 * 1.0
    assert np.allclose(out["enc.w"], CURRENT["enc.w"] + 0.1 * m / (np.sqrt(v) + 1e-3))
    assert np.array_equal(out["e0.w"], CURRENT["e0.w"]) and state.t == 1


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 1), st.integers(0, 1)), min_size=2, max_size=200),
    st.integers(1, 4),
)
def test_histogram_auc_matches_sklearn_on_pooled_scores(rows, n_sites) -> None:
    scores = np.array([s for s, _ in rows])
    labels = np.array([y for _, y in rows], dtype=float)
    pos_total = np.zeros(AUC_BINS, int)
    neg_total = np.zeros(AUC_BINS, int)
    for part in np.array_split(np.arange(len(rows)), n_sites):  # sites send counts
        pos, neg = score_histograms(scores[part], labels[part])
        pos_total += pos
        neg_total += neg
    auc = auc_from_histograms(pos_total, neg_total)
    if len(set(labels)) < 2:
        assert auc is None
        return
    # exact on binned scores; within one bin width of pairs on raw scores
    binned = np.minimum((scores * AUC_BINS).astype(int), AUC_BINS - 1)
    assert auc == pytest.approx(roc_auc_score(labels, binned), abs=1e-12)


def test_histogram_auc_within_0002_of_raw_scores() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.25).astype(float)
    s = 1 / (1 + np.exp(-(rng.normal(size=400) + 1.2 * y)))
    pos, neg = score_histograms(s, y)
    assert abs(auc_from_histograms(pos, neg) - roc_auc_score(y, s)) < 0.002
    y[:5] = np.nan
    pos, neg = score_histograms(s, y)
    assert sum(pos) + sum(neg) == 395
