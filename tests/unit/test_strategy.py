"""The grouped strategy: fault tolerance, ordering and count-based evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from server.identity import SiteIdentities
from server.strategy import GroupedStrategy
from shared_model.errors import ConfigError
from shared_model.federated_metrics import ScoreCounts
from shared_model.federation_config import FederationConfig
from wire.records import arrays_to_record

GROUPS = {
    "shared": ["enc"],
    "expert/nCRT": ["e0"],
    "expert/TNT": ["e1"],
    "expert/nCT": ["e2"],
}
CURRENT = {k: np.zeros(3, np.float32) for k in ("enc", "e0", "e1", "e2")}


DP_ACCOUNT = {"dp-epsilon": 1.0, "dp-target-epsilon": 8.0, "dp-delta": 1e-5}
"""The keys every DP reply carries."""


def claims() -> SiteIdentities:
    """Replies named by their own claims (the unit tests' replies have no
    nodes of their own)."""
    return SiteIdentities.from_claims()


@dataclass
class Err:
    reason: str


class FakeReply:
    """Duck-typed stand-in for a Flower reply Message."""

    def __init__(
        self, content: RecordDict | None, error: str | None = None, node: int = 0
    ) -> None:
        self.content = content
        self.error = Err(error) if error else None
        self.metadata = SimpleNamespace(src_node_id=node)

    def has_error(self) -> bool:
        return self.error is not None

    def has_content(self) -> bool:
        return self.content is not None


def reply(
    site: str,
    value: float,
    *,
    n_ct: int = 0,
    arrays: dict | None = None,
    **metrics: Any,
) -> FakeReply:
    arr = (
        arrays
        if arrays is not None
        else {
            "enc": np.full(3, value, np.float32),
            "e0": np.full(3, value, np.float32),
            **({"e2": np.full(3, value, np.float32)} if n_ct else {}),
        }
    )
    m = {
        "n-shared": 10,
        "n-nCRT": 10,
        "n-TNT": 0,
        "n-nCT": n_ct,
        "train-loss": 1.0,
        "seconds": 1.0,
        **metrics,
    }
    return FakeReply(
        RecordDict(
            {
                "arrays": arrays_to_record(arr),
                "metrics": MetricRecord(m),
                "info": ConfigRecord({"site": site}),
            }
        )
    )


def strategy(**kw: Any) -> GroupedStrategy:
    return GroupedStrategy(FederationConfig(min_sites=2, **kw), GROUPS)


def test_bad_replies_are_excluded_and_the_round_goes_on() -> None:
    replies = [
        reply("a", 1.0),
        reply("b", 3.0, n_ct=5),
        reply(
            "nan",
            0.0,
            arrays={
                "enc": np.full(3, np.nan, np.float32),
                "e0": np.zeros(3, np.float32),
            },
        ),
        reply(
            "shape",
            0.0,
            arrays={"enc": np.zeros(4, np.float32), "e0": np.zeros(3, np.float32)},
        ),
        reply(
            "unknown",
            0.0,
            arrays={
                "enc": np.zeros(3, np.float32),
                "e0": np.zeros(3, np.float32),
                "bogus": np.zeros(3, np.float32),
            },
        ),
        FakeReply(None, error="ClientApp raised RuntimeError"),
    ]
    out = strategy().aggregate_round(1, replies, CURRENT, claims())
    assert out.updated and sorted(out.sites) == ["a", "b"]
    assert set(out.excluded) == {"nan", "shape", "unknown", "reply-5"}
    assert "NaN" in out.excluded["nan"][0] and "shape" in out.excluded["shape"][0]
    assert np.allclose(out.arrays["enc"], 2.0)  # (10*1 + 10*3) / 20
    assert np.allclose(out.arrays["e2"], 3.0)  # only b trained nCT
    assert np.array_equal(out.arrays["e1"], CURRENT["e1"])  # nobody trained TNT
    assert out.groups["expert/nCT"].sites == ["b"] and out.groups["expert/nCT"].n == 5


def test_below_min_sites_keeps_the_model() -> None:
    out = strategy().aggregate_round(1, [reply("a", 1.0)], CURRENT, claims())
    assert not out.updated and all(
        np.array_equal(out.arrays[k], CURRENT[k]) for k in CURRENT
    )


def test_min_sites_per_expert() -> None:
    out = strategy(min_sites_per_expert=2).aggregate_round(
        1, [reply("a", 1.0), reply("b", 3.0, n_ct=5)], CURRENT, claims()
    )
    assert np.array_equal(out.arrays["e2"], CURRENT["e2"])
    assert np.allclose(out.arrays["e0"], 2.0)


def test_a_site_name_claimed_twice_excludes_both_replies() -> None:
    """An impostor cannot push the real site out (nor in): both go."""
    out = strategy().aggregate_round(
        1,
        [reply("a", 1.0), reply("a", 5.0), reply("b", 3.0), reply("c", 5.0)],
        CURRENT,
        claims(),
    )
    assert out.excluded["a"] == [
        "the site name was claimed by 2 replies; all are excluded"
    ]
    assert set(out.sites) == {"b", "c"}
    assert np.allclose(out.arrays["enc"], 4.0)


def test_fedadam_strategy_moves_trained_groups_only() -> None:
    s = strategy(strategy="fedadam", server_lr=0.1)
    out = s.aggregate_round(1, [reply("a", 1.0), reply("b", 3.0)], CURRENT, claims())
    assert s.snapshot().adam.t == 1 and not np.allclose(out.arrays["enc"], 2.0)
    assert np.array_equal(out.arrays["e1"], CURRENT["e1"])


def test_a_declined_site_is_recorded_not_aggregated() -> None:
    declined = FakeReply(
        RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        **dict.fromkeys(("n-shared", "n-nCRT"), 10),
                        **dict.fromkeys(("n-TNT", "n-nCT"), 0),
                        **DP_ACCOUNT,
                        "dp-epsilon": 7.9,
                    }
                ),
                "info": ConfigRecord({"site": "c", "declined": "privacy budget: ..."}),
            }
        )
    )
    dp = {**DP_ACCOUNT, "dp-epsilon": 2.5, "dp-noise-multiplier": 1.1}
    out = strategy().aggregate_round(
        1, [reply("a", 1.0, **dp), reply("b", 3.0), declined], CURRENT, claims()
    )
    assert out.updated and sorted(out.sites) == ["a", "b"] and not out.excluded
    assert out.declined["c"]["reason"].startswith("privacy budget")
    assert out.declined["c"]["privacy"]["epsilon"] == 7.9
    assert out.sites["a"]["privacy"]["noise_multiplier"] == 1.1
    assert out.sites["b"]["privacy"] is None
    assert np.allclose(out.arrays["enc"], 2.0)
    # two declines leave one valid reply: below min-sites, the model stays
    out = strategy().aggregate_round(1, [reply("a", 1.0), declined], CURRENT, claims())
    assert not out.updated


def test_client_level_dp_clips_each_site_and_adds_calibrated_noise() -> None:
    """Noise 0: the unweighted mean of the clipped updates. Noise > 0: its
    standard deviation is noise * clip / (sites in the group); epsilon is
    opacus's RDP accountant at sampling rate 1."""
    from opacus.accountants import RDPAccountant

    big = {k: np.zeros(20000, np.float32) for k in ("enc", "e0", "e1", "e2")}

    def site(name: str, value: float, n_ct: int = 0) -> FakeReply:
        arrays = {"enc": np.full(20000, value, np.float32)}
        arrays["e0"] = np.full(20000, value, np.float32)
        if n_ct:
            arrays["e2"] = np.full(20000, value, np.float32)
        return reply(name, value, n_ct=n_ct, arrays=arrays)

    replies = [site("a", 0.001), site("b", 0.1, n_ct=5), site("c", -0.002)]
    clip = 1.0
    # the update bound off: this is the fixed clip's own arithmetic
    s = strategy(
        client_dp_noise_multiplier=1e-9, client_dp_clip=clip, seed=3, update_bound=0
    )
    out = s.aggregate_round(1, replies, big, claims())
    norms = out.client_dp["update_norms"]
    assert norms["a"] == pytest.approx(0.001 * np.sqrt(40000), rel=1e-5)
    assert out.client_dp["clipped"] == ["b"]  # 0.1 * sqrt(60000) = 24.5 > 1
    b_scale = clip / norms["b"]
    expected_enc = (0.001 + 0.1 * b_scale - 0.002) / 3  # unweighted, not by count
    assert np.allclose(out.arrays["enc"], expected_enc, atol=1e-6)
    assert np.allclose(out.arrays["e2"], 0.1 * b_scale, atol=1e-6)
    assert np.array_equal(out.arrays["e1"], big["e1"])

    sigma = 2.0
    noisy = strategy(
        client_dp_noise_multiplier=sigma, client_dp_clip=clip, update_bound=0
    )
    out = noisy.aggregate_round(1, replies, big, claims())
    assert out.client_dp["noise_std"]["shared"] == pytest.approx(sigma * clip / 3)
    assert np.std(out.arrays["enc"] - expected_enc) == pytest.approx(
        sigma * clip / 3, rel=0.05
    )
    assert np.std(out.arrays["e2"] - 0.1 * b_scale) == pytest.approx(
        sigma * clip, rel=0.05
    )
    noisy.aggregate_round(2, replies, big, claims())
    eps = noisy.client_dp_epsilon()
    for half, key in ((2.0, "epsilon"), (1.0, "epsilon_add_remove")):
        acc = RDPAccountant()
        for _ in range(2):
            acc.step(noise_multiplier=sigma / half, sample_rate=1.0)
        assert eps[key] == pytest.approx(acc.get_epsilon(delta=1e-3), rel=1e-9)
    assert eps["epsilon"] > eps["epsilon_add_remove"]


def test_client_level_dp_noise_is_secret_unless_reproducible() -> None:
    replies = [reply("a", 1.0), reply("b", 3.0)]

    def run(**kw: Any) -> np.ndarray:
        s = strategy(client_dp_noise_multiplier=1.0, client_dp_clip=1.0, **kw)
        return s.aggregate_round(1, replies, CURRENT, claims()).arrays["enc"]

    assert np.array_equal(run(dp_reproducible=True), run(dp_reproducible=True))
    assert not np.array_equal(run(), run())


def test_federated_evaluation_from_counts_matches_pooled_sklearn() -> None:
    from sklearn.metrics import brier_score_loss, roc_auc_score

    from shared_model.policy_value import site_policy_sums
    from shared_model.site_evaluation import SiteEvaluation

    rng = np.random.default_rng(1)
    replies, all_y, all_s = [], [], []
    for site in ("a", "b", "c"):
        counts = {}
        for r in ("nCRT", "TNT", "nCT"):
            y = (rng.random(30) < 0.3).astype(float)
            s = 1 / (1 + np.exp(-(rng.normal(size=30) + y)))
            counts[r] = ScoreCounts.from_scores(s.tolist(), y.tolist())
            all_y.append(y)
            all_s.append(s)
        probs = rng.random((90, 3))
        received = np.repeat([0, 1, 2], 30)
        policy = site_policy_sums(
            probs, received, np.concatenate(all_y[-3:]), np.full((90, 3), 1 / 3)
        )
        evaluation = SiteEvaluation(
            site, "validation", counts, 1.6, 2, policy, loss_sum=1.0, loss_n=2
        )
        metrics = evaluation.to_values()
        replies.append(
            FakeReply(
                RecordDict(
                    {
                        "metrics": MetricRecord(metrics),
                        "info": ConfigRecord({"site": site}),
                    }
                )
            )
        )
    ev = strategy().aggregate_evaluation(replies, claims())
    y, s = np.concatenate(all_y), np.concatenate(all_s)
    assert ev["n"] == 270 and abs(ev["auc"] - roc_auc_score(y, s)) < 0.002
    assert ev["dice"] == pytest.approx(0.8) and set(ev["sites"]) == {"a", "b", "c"}
    overall = ev["overall"]
    assert abs(overall["auc"]["auc"] - roc_auc_score(y, s)) < 0.002
    assert overall["brier"] == pytest.approx(brier_score_loss(y, s), abs=1e-12)
    t = ev["thresholds"]["sensitivity>=0.8"]
    op = overall["operating_points"]["sensitivity>=0.8"]
    assert op["sensitivity"]["value"] >= 0.8
    assert op["specificity"]["value"] == pytest.approx(np.mean(s[y == 0] < t))
    half = overall["operating_points"]["0.5"]
    assert half["tp"] == int(np.sum((s >= 0.5) & (y == 1)))
    assert ev["regimens"]["TNT"]["n"] == 90 and len(ev["decision_curve"]["model"]) == 99
    # a malformed or duplicate reply is left out, the others are summed
    bad = FakeReply(
        RecordDict(
            {
                "metrics": MetricRecord({"n": 3, "nCRT-pos": [1, 2]}),
                "info": ConfigRecord({"site": "d"}),
            }
        )
    )
    ev2 = strategy().aggregate_evaluation([*replies, bad], claims())
    assert ev2["n"] == 270 and set(ev2["sites"]) == {"a", "b", "c"}
    # a name claimed twice: both replies are left out
    ev3 = strategy().aggregate_evaluation([*replies, replies[0]], claims())
    assert ev3["n"] == 180 and set(ev3["sites"]) == {"b", "c"}
    assert ev["policy_value"]["n"] == 270 and ev["loss"] == pytest.approx(0.5)
    # a DP site that withholds its counts is named, not counted
    withheld = FakeReply(
        RecordDict({"info": ConfigRecord({"site": "dp", "withheld": "privacy"})})
    )
    ev4 = strategy().aggregate_evaluation([*replies, withheld], claims())
    assert ev4["n"] == 270 and ev4["withheld"] == ["dp"] and "dp" not in ev4["sites"]


def test_run_config_parsing() -> None:
    fed = FederationConfig.from_run_config(
        {"num-server-rounds": 5, "strategy": "fedprox", "resume": "false", "lr": "0.02"}
    )
    assert (fed.num_server_rounds, fed.strategy, fed.resume, fed.lr) == (
        5,
        "fedprox",
        False,
        0.02,
    )
    assert FederationConfig.from_run_config({}) == FederationConfig()
    with pytest.raises(ConfigError, match="unknown run config key `num-rounds`"):
        FederationConfig.from_run_config({"num-rounds": 3})
    with pytest.raises(ConfigError, match="strategy"):
        FederationConfig.from_run_config({"strategy": "scaffold"})
    with pytest.raises(ConfigError, match="local-epochs"):
        FederationConfig.from_run_config({"local-epochs": 1.5})


def test_pyproject_app_config_matches_the_typed_defaults() -> None:
    """`flwr run` only accepts keys declared in pyproject: keep both in step."""
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == FederationConfig().to_run_config()


def test_client_dp_clip_clips_without_noise_too() -> None:
    """`client-dp-clip` alone was accepted and clipped nothing."""
    big = {k: np.zeros(100, np.float32) for k in ("enc", "e0", "e1", "e2")}

    def site(name: str, value: float) -> FakeReply:
        arrays = {"enc": np.full(100, value, np.float32)}
        arrays["e0"] = np.full(100, value, np.float32)
        return reply(name, value, arrays=arrays)

    s = strategy(client_dp_clip=1.0, update_bound=0)
    out = s.aggregate_round(1, [site("a", 0.01), site("b", 5.0)], big, claims())
    assert out.client_dp is None  # no noise: not a DP release
    scale = out.bounds["fixed_clip"]["b"]
    assert scale == pytest.approx(1.0 / (5.0 * np.sqrt(200)), rel=1e-5)
    assert list(out.bounds["fixed_clip"]) == ["b"]
    expected = 0.5 * 0.01 + 0.5 * 5.0 * scale  # count-weighted (10 and 10)
    assert np.allclose(out.arrays["enc"], expected, rtol=1e-5)


def test_the_update_bound_scales_an_outlier_to_the_honest_majority() -> None:
    """Each group of each update is scaled to `update-bound` times the round's
    reference RMS step (the lower median of the sites') times sqrt(size)."""
    s = strategy(update_bound=4.0)
    replies = [reply("a", 1.0), reply("b", 2.0), reply("c", 1000.0, n_ct=5)]
    out = s.aggregate_round(1, replies, CURRENT, claims())
    bounds = out.bounds
    assert bounds["reference_rms"] == pytest.approx(2.0)  # a: 1, b: 2, c: 1000
    assert set(bounds["clipped"]) == {"c"}
    assert bounds["clipped"]["c"]["shared"] == pytest.approx(8.0 / 1000.0)
    # c's update of each group is now 8 per coordinate: the mean moves by at most 8
    assert np.allclose(out.arrays["enc"], (1.0 + 2.0 + 8.0) / 3)
    assert np.allclose(out.arrays["e2"], 8.0)  # a group only c trains: bounded too
    assert bounds["norms"]["c"]["shared"] == pytest.approx(1000.0 * np.sqrt(3))


def test_robust_rules_by_name() -> None:
    replies = [reply("a", 1.0), reply("b", 2.0), reply("c", 9.0)]
    median = strategy(aggregation="median", update_bound=0)
    assert np.allclose(
        median.aggregate_round(1, replies, CURRENT, claims()).arrays["enc"], 2.0
    )
    trimmed = strategy(aggregation="trimmed-mean", trim_fraction=0.34, update_bound=0)
    assert np.allclose(
        trimmed.aggregate_round(1, replies, CURRENT, claims()).arrays["enc"], 2.0
    )
    with pytest.raises(ConfigError, match="aggregation"):
        strategy(aggregation="krum")


def test_the_strategy_key_names_three_separate_parts() -> None:
    """Existing run configs mean what they meant: fedprox is the sites'
    proximal term alone, fedadam the server optimiser alone, and the
    aggregation rule is its own key under every strategy."""
    parts = {
        s: FederationConfig(
            strategy=s, proximal_mu=0.1, aggregation="median"
        ).strategy_parts
        for s in ("fedavg", "fedprox", "fedadam")
    }
    assert (parts["fedavg"].proximal_mu, parts["fedavg"].server_optimizer) == (
        0.0,
        "none",
    )
    assert (parts["fedprox"].proximal_mu, parts["fedprox"].server_optimizer) == (
        0.1,
        "none",
    )
    assert (parts["fedadam"].proximal_mu, parts["fedadam"].server_optimizer) == (
        0.0,
        "adam",
    )
    assert {p.aggregation for p in parts.values()} == {"median"}


def test_the_strategys_state_is_restored_and_snapshotted_whole() -> None:
    """What a resumed run needs comes back through restore(); snapshot()
    gives it to the run folder; nothing else sets it."""
    from server.run_folder import StrategyState
    from shared_model.aggregation import AdamState

    s = strategy(strategy="fedadam", server_lr=0.1)
    declared = {
        "a": {"shared": 10, "expert/nCRT": 10, "expert/TNT": 0, "expert/nCT": 0}
    }
    s.restore(StrategyState(AdamState(t=4), declared, client_dp_releases=2, round=4))
    assert s.completed_round == 4 and s.declared == declared
    out = s.aggregate_round(5, [reply("a", 1.0), reply("b", 3.0)], CURRENT, claims())
    assert out.updated
    state = s.snapshot()
    assert state.adam.t == 5 and state.client_dp_releases == 2
    assert state.declared["b"]["shared"] == 10 and "b" in s.declared
    state.declared.clear()  # a snapshot is apart from the strategy's state
    assert "b" in s.declared
    with pytest.raises(AttributeError):
        s.declared = {}  # type: ignore[misc]
