"""Hostile replies: each is excluded with a reason, never ends the round, and
never moves the honest sites' mean."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from server.identity import SiteIdentities
from server.run_folder import StrategyState
from server.strategy import GroupedStrategy
from shared_model.federated_metrics import ScoreCounts
from shared_model.federation_config import FederationConfig
from shared_model.policy_value import PolicySums
from shared_model.site_evaluation import SiteEvaluation
from tests.unit.test_strategy import CURRENT, GROUPS, FakeReply, claims, reply
from wire.records import arrays_to_record


def _arrays(value: Any, dtype: Any = np.float32, **extra: Any) -> dict[str, Any]:
    return {
        "enc": np.full(3, value, dtype),
        "e0": np.full(3, value, dtype),
        **extra,
    }


def _raw(
    site: Any, arrays: dict | None, metrics: dict | None, info: bool = True
) -> FakeReply:
    content: dict[str, Any] = {}
    if arrays is not None:
        content["arrays"] = arrays_to_record(arrays)
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    if info:
        content["info"] = ConfigRecord({"site": site})
    return FakeReply(RecordDict(content))


GOOD_METRICS = {"n-shared": 10, "n-nCRT": 10, "n-TNT": 0, "n-nCT": 0}

HOSTILE: dict[str, FakeReply] = {
    "error reply": FakeReply(None, error="Traceback ... /data/WCH_R0001.nii.gz"),
    "empty reply": FakeReply(None),
    "string dtype": _raw("evil", _arrays("x", dtype="<U1"), GOOD_METRICS),
    "float64 dtype": _raw("evil", _arrays(99.0, dtype=np.float64), GOOD_METRICS),
    "complex dtype": _raw("evil", _arrays(99 + 1j, dtype=np.complex64), GOOD_METRICS),
    "integer dtype": _raw("evil", _arrays(99, dtype=np.int32), GOOD_METRICS),
    "wrong shape": reply("evil", 99.0, arrays={"enc": np.full(4, 99, np.float32)}),
    "NaN weights": reply("evil", float("nan")),
    "infinite weights": reply("evil", float("inf")),
    "unknown array": reply(
        "evil", 99.0, arrays=_arrays(99.0, extra=np.zeros(2, np.float32))
    ),
    "no arrays": _raw("evil", None, GOOD_METRICS),
    "no metrics": _raw("evil", _arrays(99.0), None),
    "missing count": _raw("evil", _arrays(99.0), {"n-shared": 10}),
    "fractional count": reply("evil", 99.0, **{"n-shared": 10.5}),
    "negative count": reply("evil", 99.0, **{"n-shared": -5}),
    "huge count": reply("evil", 99.0, **{"n-shared": 10**12, "n-nCRT": 10**12}),
    "expert count without its arrays": reply("evil", 99.0, **{"n-nCT": 5}),
    "list-valued seconds": reply("evil", 99.0, seconds=[1.0, 2.0]),
    "list-valued train loss": reply("evil", 99.0, **{"train-loss": [1.0]}),
    "NaN train loss": reply("evil", 99.0, **{"train-loss": float("nan")}),
    "list-valued dp metric": reply("evil", 99.0, **{"dp-epsilon": [1.0, 2.0]}),
    "infinite dp metric": reply("evil", 99.0, **{"dp-epsilon": float("inf")}),
    "impostor of an honest site": reply("a", 99.0),
    "non-string site name": _raw(7, _arrays(99.0), GOOD_METRICS),
}


NODES = SiteIdentities({1: "a", 2: "b", 3: "c", 4: "evil"}, "simulation")
"""Four nodes, each known as its site (a simulation's map, or registrations)."""


def _from(node: int, r: FakeReply) -> FakeReply:
    return FakeReply(r.content, error=r.error.reason if r.error else None, node=node)


def _round(hostile: FakeReply) -> Any:
    strategy = GroupedStrategy(FederationConfig(min_sites=2), GROUPS)
    honest = [_from(1, reply("a", 1.0)), _from(2, reply("b", 3.0))]
    honest.append(_from(3, reply("c", 2.0)))
    return strategy.aggregate_round(1, [*honest, _from(4, hostile)], CURRENT, NODES)


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_reply_is_excluded_and_the_honest_mean_stands(kind: str) -> None:
    out = _round(HOSTILE[kind])
    assert out.updated
    assert set(out.sites) == {"a", "b", "c"}, out.excluded
    assert list(out.excluded) == ["evil"]
    assert np.allclose(out.arrays["enc"], 2.0)
    assert np.allclose(out.arrays["e0"], 2.0)
    assert len(out.excluded) == 1
    (reasons,) = out.excluded.values()
    assert reasons and all(isinstance(r, str) and r for r in reasons)


def test_a_declaration_without_a_group_excludes_with_a_reason() -> None:
    """A resumed state whose declaration lacks a group: a later claim on that
    group is excluded as more than declared (0), not as an unreadable reply."""
    strategy = GroupedStrategy(FederationConfig(min_sites=2), GROUPS)
    strategy.restore(StrategyState(declared={"a": {"shared": 10}, "b": {}}))
    out = strategy.aggregate_round(
        2, [reply("a", 1.0), reply("b", 3.0), reply("c", 1.0)], CURRENT, claims()
    )
    reasons = " ".join(out.excluded["a"])
    assert "more than the 0 it declared" in reasons and "unreadable" not in reasons


def test_at_least_fifteen_kinds() -> None:
    assert len(HOSTILE) >= 15


def test_a_site_cannot_claim_more_patients_than_it_declared() -> None:
    strategy = GroupedStrategy(FederationConfig(min_sites=2), GROUPS)
    first = strategy.aggregate_round(
        1, [reply("a", 1.0), reply("b", 3.0)], CURRENT, claims()
    )
    assert strategy.declared["a"]["shared"] == 10 and not first.excluded
    inflated = reply("a", 99.0, **{"n-shared": 1000, "n-nCRT": 1000})
    out = strategy.aggregate_round(
        2, [inflated, reply("b", 3.0), reply("c", 1.0)], CURRENT, claims()
    )
    assert "more than the 10 it declared" in out.excluded["a"][0]
    assert np.allclose(out.arrays["enc"], 2.0)
    # fewer than declared is accepted and flagged
    fewer = reply("a", 1.0, **{"n-shared": 8, "n-nCRT": 8})
    out = strategy.aggregate_round(3, [fewer, reply("b", 3.0)], CURRENT, claims())
    assert "a" in out.sites and "declared 10" in out.flags["a"][0]


def _evaluation(site: str, **override: Any) -> FakeReply:
    rng = np.random.default_rng(len(site))
    counts = {
        r: ScoreCounts.from_scores(
            rng.random(20).tolist(), (rng.random(20) < 0.3).astype(float).tolist()
        )
        for r in ("nCRT", "TNT", "nCT")
    }
    values = {
        **SiteEvaluation(
            site, "validation", counts, 10.0, 20, PolicySums()
        ).to_values(),
        **override,
    }
    return FakeReply(
        RecordDict(
            {"metrics": MetricRecord(values), "info": ConfigRecord({"site": site})}
        )
    )


@pytest.mark.parametrize(
    "override",
    [
        {"dice-sum": float("nan")},
        {"dice-sum": 1e9},
        {"loss-sum": float("inf")},
        {"dice-n": -3},
        {"loss-n": 2.5},
        {"nCRT-calib": [float("nan")] * 10},
        {"nCRT-sums": [1.0, 2.0]},
        {"nCRT-pos": [1, 2]},
    ],
    ids=lambda o: next(iter(o)),
)
def test_a_hostile_evaluation_is_left_out(override: dict[str, Any]) -> None:
    strategy = GroupedStrategy(FederationConfig(min_sites=2), GROUPS)
    honest = [_evaluation("a"), _evaluation("b")]
    ev = strategy.aggregate_evaluation(
        [*honest, _evaluation("evil", **override)], claims()
    )
    assert set(ev["sites"]) == {"a", "b"} and ev["n"] == 120
    assert ev["dice"] == pytest.approx(0.5)  # 10 / 20 at each honest site


def test_declared_counts_survive_a_resume(tmp_path: Any) -> None:
    """The declarations are checkpointed with the round, so a resumed run
    still refuses an inflated count."""
    from server.run_folder import RunFolder, StrategyState
    from shared_model.model_config import ModelConfig
    from shared_model.plan import PRESET_PLANS

    plan = PRESET_PLANS["tiny"]
    declared = {"a": {"shared": 10, "expert/nCRT": 10}}
    folder = RunFolder(tmp_path)
    folder.save_round(
        1,
        CURRENT,
        StrategyState(declared=declared),
        {"rounds": [{"round": 1}]},
        ModelConfig.from_plan(plan),
        plan,
    )
    resumed = folder.last_complete()
    assert resumed is not None and resumed.state.declared == declared
    strategy = GroupedStrategy(FederationConfig(min_sites=2), GROUPS)
    strategy.restore(resumed.state)
    out = strategy.aggregate_round(
        2,
        [reply("a", 9.0, **{"n-shared": 11}), reply("b", 1.0), reply("c", 3.0)],
        CURRENT,
        claims(),
    )
    assert "a" in out.excluded and np.allclose(out.arrays["enc"], 2.0)


@pytest.mark.parametrize(
    "plan",
    [
        {"patch_size": [4096, 4096, 4096], "spacing": [3.0, 1.5, 1.5]},
        {"patch_size": [8.5, 32, 32], "spacing": [3.0, 1.5, 1.5]},
        {"patch_size": [8, 32, 32], "spacing": [float("nan"), 1.5, 1.5]},
        {"patch_size": [8, 32, 32], "spacing": [3.0, float("inf"), 1.5]},
        {"patch_size": [8, 32, 32], "spacing": [3.0, 1e-9, 1.5]},
        {"patch_size": [8, 32, 32], "spacing": [3, 1.5, 1.5], "adc_clip": [0, 1e9]},
        {"patch_size": [8, 32, 32], "spacing": ["3", 1.5, 1.5]},
    ],
)
def test_a_coordinators_plan_out_of_bounds_is_refused(plan: dict) -> None:
    from shared_model.errors import ConfigError
    from shared_model.plan import Plan

    with pytest.raises(ConfigError, match="plan"):
        Plan.from_dict(plan)


@pytest.mark.parametrize(
    "setting",
    [
        {"lr": float("inf")},
        {"lr": float("nan")},
        {"lr": 1e6},
        {"batch-size": 100_000},
        {"local-epochs": 10**9},
        {"max-filters": 10**6},
        {"proximal-mu": float("inf")},
        {"client-dp-clip": float("nan")},
        {"round-timeout": float("inf")},
    ],
    ids=lambda o: next(iter(o)),
)
def test_a_coordinators_run_config_out_of_bounds_is_refused(setting: dict) -> None:
    from shared_model.errors import ConfigError

    key = next(iter(setting))
    with pytest.raises(ConfigError, match=key.split("-")[0]):
        FederationConfig.from_run_config(setting)


@pytest.mark.parametrize("name", ["../escaped", "/etc/x", "West", "a b", "", "x" * 65])
def test_site_key_refuses_a_name_that_is_not_a_site_name(
    name: str, tmp_path: Any
) -> None:
    from server.deploy import make_site_key
    from shared_model.errors import MoeflError

    keys = tmp_path / "keys"
    with pytest.raises(MoeflError, match="site name"):
        make_site_key(keys, name)
    assert not any(tmp_path.rglob("*.key")) and not any(tmp_path.rglob("*.pub"))


def test_a_nifti_header_claiming_a_huge_volume_is_a_finding(tmp_path: Any) -> None:
    """Read as a finding from the header alone, not a MemoryError."""
    import nibabel as nib

    from client.checks.volume_checks import load_volume
    from client.problem import Problem

    path = tmp_path / "huge.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), str(path))
    img = nib.load(str(path))
    header = img.header.copy()
    header.set_data_shape((32767, 32767, 32767))
    raw = tmp_path / "huge.nii"
    with raw.open("wb") as f:
        header.write_to(f)
        f.write(b"\0" * 128)
    found = load_volume(raw, "imagesTr/huge_0000.nii")
    assert isinstance(found, Problem) and found.code == "too-large"
    assert found.where == "imagesTr/huge_0000.nii"


def test_reproducible_central_noise_is_refused_outside_simulation() -> None:
    from server.server_app import verify_for_runtime
    from shared_model.errors import ConfigError

    fed = FederationConfig.from_run_config({"dp-reproducible": True})
    with pytest.raises(ConfigError, match="dp-reproducible"):
        verify_for_runtime(fed, simulation=False)
    verify_for_runtime(fed, simulation=True)
    verify_for_runtime(FederationConfig(), simulation=False)


def test_a_site_is_its_nodes_name_not_its_claim() -> None:
    """The node's name (registration, or the simulation's map) is the
    identity: an impostor claiming an honest site's name is excluded under its
    own name and the honest site is kept; an unregistered node is refused
    unless the coordinator accepts claimed names."""
    honest = [
        FakeReply(reply(s, v).content, node=n)
        for n, s, v in ((1, "a", 1.0), (2, "b", 3.0), (3, "c", 2.0))
    ]
    impostor = FakeReply(reply("a", 99.0).content, node=4)
    strategy = GroupedStrategy(FederationConfig(min_sites=2), GROUPS)
    registered = SiteIdentities(NODES.names, "registration")
    out = strategy.aggregate_round(1, [*honest, impostor], CURRENT, registered)
    assert sorted(out.sites) == ["a", "b", "c"]
    assert list(out.excluded) == ["evil"]
    assert "known as evil (registration) replies as 'a'" in out.excluded["evil"][0]
    assert np.allclose(out.arrays["enc"], 2.0)
    stranger = FakeReply(reply("d", 2.0).content, node=9)
    out = strategy.aggregate_round(2, [*honest, stranger], CURRENT, registered)
    assert sorted(out.sites) == ["a", "b", "c"]
    assert "no registered name" in out.excluded["node-9"][0]
    opted_in = SiteIdentities(NODES.names, "registration", allow_claims=True)
    out = strategy.aggregate_round(3, [*honest, stranger], CURRENT, opted_in)
    assert sorted(out.sites) == ["a", "b", "c", "d"] and not out.excluded


def test_an_impostor_cannot_take_the_name_of_a_site_absent_that_round() -> None:
    """The impostor's node is its own site; its small declaration never
    attaches to the real site, which joins later with its own counts."""
    strategy = GroupedStrategy(FederationConfig(min_sites=2), GROUPS)
    small = FakeReply(reply("a", 99.0, **{"n-shared": 1, "n-nCRT": 1}).content, node=4)
    first = [FakeReply(reply("b", 3.0).content, node=2), small]
    first.append(FakeReply(reply("c", 1.0).content, node=3))
    out = strategy.aggregate_round(1, first, CURRENT, NODES)
    assert "a" not in strategy.declared and list(out.excluded) == ["evil"]
    assert np.allclose(out.arrays["enc"], 2.0)
    later = [
        FakeReply(reply(s, v).content, node=n)
        for n, s, v in ((1, "a", 1.0), (2, "b", 3.0))
    ]
    out = strategy.aggregate_round(2, later, CURRENT, NODES)
    assert sorted(out.sites) == ["a", "b"] and strategy.declared["a"]["shared"] == 10


def test_claimed_names_bind_to_the_first_node_that_used_them() -> None:
    """With allow-unregistered-sites, a name is held by the node that first
    used it; another node claiming it later is refused, the holder stays."""
    strategy = GroupedStrategy(FederationConfig(min_sites=2), GROUPS)
    held = SiteIdentities({}, "reply", allow_claims=True)
    honest = [
        FakeReply(reply(s, v).content, node=n)
        for n, s, v in ((1, "a", 1.0), (2, "b", 3.0))
    ]
    strategy.aggregate_round(1, honest, CURRENT, held)
    impostor = FakeReply(reply("a", 99.0).content, node=7)
    out = strategy.aggregate_round(2, [*honest, impostor], CURRENT, held)
    assert (
        sorted(out.sites) == ["a", "b"]
        and "first used by a different node" in (out.excluded["reply-2"][0])
    )
    assert np.allclose(out.arrays["enc"], 2.0)


@pytest.mark.parametrize(
    "name", ["../escaped", "a\nb", "West", "x" * 65, "x" * 1_000_000, "", "a b"]
)
def test_a_claimed_name_that_is_not_a_site_name_never_reaches_the_record(
    name: str,
) -> None:
    strategy = GroupedStrategy(FederationConfig(min_sites=2), GROUPS)
    held = SiteIdentities({}, "reply", allow_claims=True)
    honest = [
        FakeReply(reply(s, v).content, node=n)
        for n, s, v in ((1, "a", 1.0), (2, "b", 3.0))
    ]
    bad = FakeReply(reply(name, 99.0).content, node=5)
    out = strategy.aggregate_round(1, [*honest, bad], CURRENT, held)
    assert sorted(out.sites) == ["a", "b"] and list(out.excluded) == ["reply-2"]
    assert len(out.excluded["reply-2"][0]) < 200
    assert "\n" not in out.excluded["reply-2"][0]
