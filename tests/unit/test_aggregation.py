"""Grouped aggregation and count-based metrics against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from shared_model.aggregation import (
    AdamState,
    fedadam_step,
    grouped_mean,
    verify_update,
)
from shared_model.federated_metrics import (
    AUC_BINS,
    auc_from_histograms,
    score_histograms,
)
from shared_model.robust import SiteUpdate

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


def test_the_rule_registry_names_the_run_configs_rules() -> None:
    from scipy.stats import trim_mean

    from shared_model.robust import AGGREGATION_RULES, AGGREGATIONS, aggregation_rule

    assert (
        tuple(AGGREGATION_RULES) == AGGREGATIONS == ("mean", "median", "trimmed-mean")
    )
    rng = np.random.default_rng(0)
    values = [rng.normal(size=(2, 3)).astype(np.float32) for _ in range(5)]
    weights = [0.1, 0.2, 0.3, 0.15, 0.25]
    stacked = np.stack([v.astype(np.float64) for v in values])
    expected = {
        "mean": np.tensordot(weights, stacked, axes=1),
        "median": np.median(stacked, axis=0),
        "trimmed-mean": trim_mean(stacked, 0.2, axis=0),
    }
    for name, rule in AGGREGATION_RULES.items():
        assert aggregation_rule(name) is rule
        assert np.allclose(rule(values, weights, 0.2), expected[name], atol=1e-12)
    with pytest.raises(ValueError, match="krum"):
        aggregation_rule("krum")


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed-mean"])
def test_grouped_mean_applies_the_registrys_rule(rule: str) -> None:
    """Each parameter of a group is the rule over the sites that trained it."""
    from shared_model.robust import AGGREGATION_RULES, capped_shares

    c = {"shared": 10, "expert/nCRT": 5, "expert/TNT": 0, "expert/nCT": 0}
    updates = [
        _update(name, {**c, "shared": n}, v)
        for name, n, v in (("a", 10, 1.0), ("b", 30, 2.0), ("c", 20, 9.0))
    ]
    new, _ = grouped_mean(CURRENT, updates, GROUPS, rule=rule, max_share=0.5)
    shares = capped_shares({"a": 10, "b": 30, "c": 20}, 0.5)
    direct = AGGREGATION_RULES[rule](
        [u.arrays["enc.w"] for u in updates], [shares[s] for s in "abc"], 0.2
    )
    assert np.array_equal(new["enc.w"], direct.astype(np.float32))


def _delta(rng: np.random.Generator, scale: float) -> dict[str, dict[str, np.ndarray]]:
    return {
        "shared": {"a": rng.normal(0, scale, (3, 4)), "b": rng.normal(0, scale, 5)},
        "expert/nCT": {"c": rng.normal(0, scale, 2)},
    }


def _norm(delta: dict[str, dict[str, np.ndarray]]) -> float:
    return float(
        np.sqrt(sum(np.sum(a * a) for group in delta.values() for a in group.values()))
    )


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(1e-4, 1e3), st.floats(1e-3, 1e2))
def test_a_clipped_update_has_norm_at_most_the_bound(seed, scale, bound) -> None:
    from shared_model.robust import clip_update

    delta = _delta(np.random.default_rng(seed), scale)
    before = _norm(delta)
    cut = clip_update(delta, bound)
    assert cut.norm == pytest.approx(before, rel=1e-12)
    assert _norm(cut.delta) <= bound * (1 + 1e-12)
    if before > bound:
        assert cut.scale == pytest.approx(bound / before, rel=1e-12)
        assert _norm(cut.delta) == pytest.approx(bound, rel=1e-12)
        for g, group in delta.items():  # the direction is kept
            for n, a in group.items():
                assert np.allclose(cut.delta[g][n], a * cut.scale, rtol=1e-15, atol=0)
    else:
        assert cut.scale == 1.0


def test_an_update_under_the_bound_is_unchanged() -> None:
    from shared_model.robust import clip_update

    delta = _delta(np.random.default_rng(1), 0.01)
    cut = clip_update(delta, 10.0)
    assert cut.scale == 1.0 and cut.norm == pytest.approx(_norm(delta))
    for g, group in delta.items():
        for n, a in group.items():
            assert cut.delta[g][n] is a  # the very arrays, not copies
    cut = clip_update(delta, _norm(delta))  # exactly at the bound: unchanged too
    assert cut.scale == 1.0
    with pytest.raises(ValueError, match="> 0"):
        clip_update(delta, 0.0)


# Client-level DP on fixed inputs and noise seed, as computed before the
# clipping moved into shared_model.robust.clip_update (float32 values, exact).
DP_GROUPS = {
    "shared": ["enc"],
    "expert/nCRT": ["e0"],
    "expert/TNT": ["e1"],
    "expert/nCT": ["e2"],
}
DP_BEFORE = {
    "enc": [-0.2326197326183319, 0.444184809923172, -0.6027237176895142, -1.3303329944610596],
    "e0": [-0.13323496282100677, -0.8882079124450684, 0.3151795268058777, 1.4189627170562744],
    "e1": [0.9536595344543457, 0.21113842725753784, 0.8824504017829895, 0.5965575575828552],
    "e2": [0.011351273395121098, -1.3289672136306763, -0.29298290610313416, 0.027928005903959274],
}  # fmt: skip
DP_BEFORE_STRATEGY = {
    "enc": [-0.3328671157360077, 0.5500494837760925, -0.3781306743621826, -1.2424917221069336],
    "e0": [-0.7359758615493774, -0.4312257766723633, -0.47985753417015076, 1.146018147468567],
    "e1": [-1.0062682628631592, 0.07365760207176208, 0.697742760181427, -0.48983484506607056],
    "e2": [0.5943864583969116, -0.42622408270835876, -0.3868676424026489, -0.012573322281241417],
}  # fmt: skip
"""The same through the strategy (update bound 4, ``dp-reproducible``, seed 5,
round 3), whose noise seed comes from the run's seed and the round."""


def _dp_inputs() -> tuple[dict[str, np.ndarray], list[SiteUpdate]]:
    rng = np.random.default_rng(7)
    current = {
        k: rng.normal(size=4).astype(np.float32) for k in ("enc", "e0", "e1", "e2")
    }

    def upd(site: str, scale: float, counts: dict[str, int]) -> SiteUpdate:
        arrays = {
            n: (current[n] + scale * rng.normal(size=4)).astype(np.float32)
            for g, names in DP_GROUPS.items()
            if counts.get(g, 0) > 0
            for n in names
        }
        return SiteUpdate(site, arrays, counts)

    return current, [
        upd("a", 0.1, {"shared": 10, "expert/nCRT": 4}),
        upd("b", 3.0, {"shared": 20, "expert/nCT": 5}),
        upd("c", 0.5, {"shared": 7, "expert/nCRT": 2, "expert/TNT": 3}),
    ]


def test_client_level_dp_gives_the_same_weights_as_before_for_a_fixed_seed() -> None:
    from server.strategy import GroupedStrategy
    from shared_model.aggregation import central_dp_mean
    from shared_model.federation_config import FederationConfig
    from shared_model.messages import SiteTrainReply, TrainReply

    current, updates = _dp_inputs()
    mean, _, dp = central_dp_mean(
        current,
        updates,
        DP_GROUPS,
        clip=1.0,
        noise_multiplier=0.8,
        rng=np.random.default_rng([0, 1, 0xD9]),
    )
    assert dp.clipped == ["b", "c"]
    for name, values in DP_BEFORE.items():
        assert np.array_equal(mean[name], np.array(values, np.float32))

    fed = FederationConfig(
        min_sites=2,
        client_dp_noise_multiplier=0.8,
        client_dp_clip=1.0,
        dp_reproducible=True,
        seed=5,
    )
    replies = [
        SiteTrainReply(
            u.site,
            TrainReply(counts={**dict.fromkeys(DP_GROUPS, 0), **u.counts}),
            dict(u.arrays),
        )
        for u in updates
    ]
    out = GroupedStrategy(fed, DP_GROUPS).aggregate_replies(3, replies, current)
    assert out.client_dp is not None and out.client_dp["releases"] == 1
    for name, values in DP_BEFORE_STRATEGY.items():
        assert np.array_equal(out.arrays[name], np.array(values, np.float32))
