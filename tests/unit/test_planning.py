"""Federated planning: the planning query at a site (exact, or noised and
charged to its DP ledger), the server's checks on untrusted fingerprints, and
a site's refusal of a plan under which its data would be unusable."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, Metadata, RecordDict

from client.checks.fingerprint import check_plan_usable, released_fingerprint
from client.data.site_config import load_site_config, write_site_yaml
from client.node.client_app import SITE_ERRORS, fingerprint, train
from client.privacy.ledger import PrivacyLedger
from server.planning import federated_plan
from shared_model.errors import ConfigError, PlanRefused
from shared_model.federation_config import FederationConfig
from shared_model.fingerprint import SENSITIVITY_ROWS, Fingerprint
from shared_model.plan import PRESET_PLANS, Plan
from tests.unit.test_site_errors import _context  # a deployed site's node
from wire.records import FINGERPRINT_QUERY, fingerprint_query

SITES = ("sah_sysu", "sysucc", "west_china")


def _query(run_config: dict, node: int = 7) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"q{node}",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="0",
        created_at=time.time(),
        ttl=60.0,
        message_type=FINGERPRINT_QUERY,
    )
    return Message(fingerprint_query(run_config), metadata=metadata)


def _yaml(cohort: Path, site: str) -> Path:
    return cohort / "site_configs" / f"{site}.yaml"


def test_the_query_answers_the_sites_exact_fingerprint(tiny_cohort: Path) -> None:
    reply = fingerprint(
        _query(FederationConfig().to_run_config()),
        _context(_yaml(tiny_cohort, "sysucc")),
    )
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    info = reply.content.config_records["info"]
    assert info["site"] == "sysucc"
    fp = Fingerprint.from_values(json.loads(str(info["fingerprint"])))
    assert fp.n_cases == fp.n_labelled == 10 and fp.noise_std == 0
    # the intensities inside the tumour: ADC in 10^-3 mm^2/s, T2W z-scores
    assert 0.3 < fp.quantile("adc", 0.5)[1] < 2.0
    assert -4 < fp.quantile("t2w", 0.5)[1] < 4
    assert not dict(reply.content.metric_records["metrics"])  # no DP accounting


def _private_site(tiny_copy: Path, site: str, **privacy: float) -> Path:
    import yaml

    path = _yaml(tiny_copy, site)
    raw = yaml.safe_load(path.read_text())
    raw["privacy"] = {
        "target_epsilon": 4.0,
        "delta": 1e-3,
        "max_grad_norm": 1.0,
        **privacy,
    }
    write_site_yaml(path, raw)
    return path


def test_a_dp_site_noises_its_fingerprint_and_charges_its_ledger(
    tiny_copy: Path,
) -> None:
    path = _private_site(tiny_copy, "west_china", fingerprint_epsilon=1.0)
    config = load_site_config(path)
    exact = Fingerprint.from_values(
        json.loads(
            str(
                fingerprint(
                    _query(FederationConfig().to_run_config()),
                    _context(_yaml(tiny_copy, "sysucc")),
                ).content.config_records["info"]["fingerprint"]
            )
        )
    )
    assert exact.noise_std == 0
    noised, privacy = released_fingerprint(config, seed=[0, 1])
    assert privacy is not None
    assert privacy.epsilon == pytest.approx(1.0, rel=0.01)  # the whole release
    z = privacy.noise_multiplier
    assert noised.noise_std == pytest.approx(z * np.sqrt(SENSITIVITY_ROWS))
    # what leaves is readable by the server although its rows no longer add up
    again = Fingerprint.from_values(json.loads(json.dumps(noised.to_values())))
    assert again.noise_std > 0
    ledger = PrivacyLedger.for_site(config.run_dir)
    assert [e["kind"] for e in ledger.entries] == ["fingerprint"]
    assert ledger.epsilon(1e-3) == pytest.approx(privacy.epsilon)
    # the budget pays for the release: past it, the site refuses to send one
    released_fingerprint(config, seed=[0, 2])
    released_fingerprint(config, seed=[0, 3])
    released_fingerprint(config, seed=[0, 4])
    with pytest.raises(ConfigError, match="past 4"):
        for k in range(20):
            released_fingerprint(config, seed=[1, k])
    assert PrivacyLedger.for_site(config.run_dir).epsilon(1e-3) <= 4.0


def test_an_exact_fingerprints_rows_must_add_up() -> None:
    fp = Fingerprint.of(np.tile([3.0, 1.0, 1.0], (4, 1)), np.tile([20, 99, 99], (4, 1)))
    values = fp.to_values()
    values["spacing"][0][60] += 1
    with pytest.raises(ValueError, match="per row"):
        Fingerprint.from_values(values)
    Fingerprint.from_values({**values, "noise_std": 2.0})  # noised: they need not
    with pytest.raises(ValueError, match="noise_std"):
        Fingerprint.from_values({**values, "noise_std": float("nan")})


@dataclass(frozen=True)
class _Node:
    node_id: int
    name: str = ""


class _PlanningGrid:
    """Sites behind Flower's Grid that answer the planning query through the
    real ClientApp handler, and hostile ones."""

    def __init__(self, cohort: Path, hostile: dict[int, str] | None = None) -> None:
        self.cohort = cohort
        self.sites = {100 + i: s for i, s in enumerate(SITES)}
        self.hostile = hostile or {}
        self.registered = False

    def get_node_ids(self) -> list[int]:
        return [*self.sites, *self.hostile]

    def get_nodes(self) -> list[_Node]:
        names = {**self.sites, **{n: f"rogue{n}" for n in self.hostile}}
        return [_Node(n, names[n] if self.registered else "") for n in names]

    def send_and_receive(self, messages: list[Message], *, timeout: float) -> list:
        replies = []
        for msg in messages:
            assert msg.metadata.message_type == FINGERPRINT_QUERY
            node = msg.metadata.dst_node_id
            kind = self.hostile.get(node)
            site = self.sites.get(node, "sysucc")
            good = fingerprint(msg, _context(_yaml(self.cohort, site)))
            if kind == "error":
                reply = Message(Error(code=1002, reason="x"), reply_to=msg)
            elif kind is not None:
                info = dict(good.content.config_records["info"])
                values = json.loads(str(info["fingerprint"]))
                if kind == "malformed":
                    values["size"][0][5] = -3
                if kind == "huge":
                    values["n_cases"] = 10**9
                info["site"] = "west_china" if kind == "impostor" else f"rogue{node}"
                info["fingerprint"] = json.dumps(values)
                reply = Message(RecordDict({"info": ConfigRecord(info)}), reply_to=msg)
            else:
                reply = good
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def test_the_server_plans_from_the_honest_fingerprints_alone(
    tiny_cohort: Path, flower_task_identity: None
) -> None:
    fed = FederationConfig(min_sites=3)
    # unregistered nodes are refused unless the coordinator accepts claimed names
    with pytest.raises(ConfigError, match="no registered name"):
        federated_plan(_PlanningGrid(tiny_cohort), fed)
    claims = FederationConfig(min_sites=3, allow_unregistered_sites=True)
    plan, honest = federated_plan(_PlanningGrid(tiny_cohort), claims)
    assert honest["identified_by"] == "reply"
    assert honest["sites"] == list(SITES) and not honest["excluded"]
    assert plan.patch_size == (12, 40, 40) and plan.spacing == (3.0, 2.5, 2.5)
    assert sum(honest["cases"].values()) == honest["fingerprint"]["n_cases"] == 33

    hostile = {201: "malformed", 202: "huge", 203: "error"}
    grid = _PlanningGrid(tiny_cohort, hostile)
    grid.registered = True
    plan2, record = federated_plan(grid, fed)
    assert plan2 == plan and record["sites"] == list(SITES)
    assert record["identified_by"] == "registration"
    reasons = " | ".join(record["excluded"].values())
    assert "whole counts" in reasons and "n_cases" in reasons
    assert "site reported an error" in reasons

    # a registered node that claims another site's name is excluded under its own
    grid = _PlanningGrid(tiny_cohort, {204: "impostor"})
    grid.registered = True
    _, record = federated_plan(grid, fed)
    assert record["cases"]["west_china"] == honest["cases"]["west_china"]
    assert "replies as 'west_china'" in record["excluded"]["rogue204"]

    # too few usable fingerprints end the planning with the reasons
    grid = _PlanningGrid(tiny_cohort, {301: "malformed"})
    grid.sites = {}
    with pytest.raises(ConfigError, match="min-sites is 3; 1 node"):
        federated_plan(grid, FederationConfig(min_sites=3, round_timeout=1.5))


def test_a_site_refuses_a_plan_that_would_make_its_data_unusable(
    tiny_cohort: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_site_config(_yaml(tiny_cohort, "sysucc"))
    check_plan_usable(config, PRESET_PLANS["tiny"])  # the cohort's own plan
    with pytest.raises(PlanRefused, match="over 4 times"):
        check_plan_usable(config, Plan(spacing=(3.0, 12.0, 12.0)))
    with pytest.raises(PlanRefused, match="voxels there"):
        check_plan_usable(config, Plan(spacing=(10.0, 2.5, 2.5)))
    with pytest.raises(PlanRefused, match="in memory"):
        check_plan_usable(config, Plan(spacing=(0.1, 0.1, 0.1)))

    # at the ClientApp: code 1004 to the server, the reason in the site's log
    from tests.unit.test_site_errors import _instruction  # a training message

    msg = _instruction("train", FederationConfig().to_run_config())
    msg.content.config_records["config"]["plan"] = json.dumps(
        Plan(spacing=(3.0, 12.0, 12.0)).to_dict()
    )
    reply = train(msg, _context(_yaml(tiny_cohort, "sysucc")))
    assert reply.has_error() and reply.error.code == SITE_ERRORS["plan"][0] == 1004
    assert "over 4 times" in caplog.text and "over 4" not in reply.error.reason


def _protocol_site(n: int, spacing: tuple, size: tuple, seed: int) -> Fingerprint:
    """``n`` cases of one scanner protocol: fixed spacing, sizes within +-20."""
    rng = np.random.default_rng(seed)
    sizes = np.stack(
        [rng.integers(s - w, s + w, n) for s, w in zip(size, (4, 20, 20), strict=True)],
        axis=1,
    )
    return Fingerprint.of(np.tile(spacing, (n, 1)), sizes)


def test_noised_fingerprints_of_sites_of_a_hundred_cases_give_the_exact_plan() -> None:
    from client.checks.fingerprint import fingerprint_noise
    from shared_model.fingerprint import plan_from_fingerprint

    sites = [
        _protocol_site(300, (3.0, 0.7, 0.7), (24, 256, 256), 0),
        _protocol_site(150, (3.5, 0.8, 0.8), (22, 240, 240), 1),
        _protocol_site(80, (3.0, 0.5, 0.5), (24, 320, 320), 2),
    ]
    exact = plan_from_fingerprint(sites[0].merge(sites[1]).merge(sites[2]))
    std = fingerprint_noise(1.0, 1e-5) * np.sqrt(SENSITIVITY_ROWS)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        noised = [s.noised(std, rng) for s in sites]
        pooled = noised[0].merge(noised[1]).merge(noised[2])
        assert pooled.n_cases == pytest.approx(530, abs=6 * std)
        assert plan_from_fingerprint(pooled) == exact
    # sites of ten cases: every count is under the noise floor
    small = _protocol_site(10, (3.0, 0.7, 0.7), (24, 256, 256), 3)
    with pytest.raises(ValueError, match="empty"):
        plan_from_fingerprint(small.noised(std, np.random.default_rng(0)))


def test_coarsening_keeps_spacing_and_centres_each_block() -> None:
    from shared_model.fingerprint import DP_BLOCKS, HISTOGRAMS, adc_clip

    site = _protocol_site(40, (3.0, 0.55, 0.55), (24, 256, 256), 4)
    coarse = site.coarsened()
    assert np.array_equal(coarse.histograms["spacing"], site.histograms["spacing"])
    for name, block in DP_BLOCKS.items():
        assert block % 2 == 1  # odd: each block's middle bin is its centre
        assert (coarse.histograms[name].sum(1) == site.histograms[name].sum(1)).all()
        width = float(HISTOGRAMS[name][1] - HISTOGRAMS[name][0])
        if site.histograms[name].sum() and name != "spacing":
            shift = coarse.quantile(name, 0.5) - site.quantile(name, 0.5)
            assert np.abs(shift).max() <= width * (block // 2)
    # the ADC clip needs only the 99.5th percentiles' row, even if noise emptied
    # the others
    values = {**site.to_values()}
    adc = np.zeros((3, len(HISTOGRAMS["adc_range"]) - 1), int)
    adc[2, 150] = 40  # 3.0 x 10^-3 mm^2/s
    noised = Fingerprint.from_values(
        {**values, "adc_range": adc.tolist(), "noise_std": 1.0}
    )
    assert adc_clip(noised) == (0.0, 3.0)
