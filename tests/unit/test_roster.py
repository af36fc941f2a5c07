"""The enrolment roster: sites, node keys and patient ranges the coordinator
agreed to, read from its run folder and enforced at each site's replies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from server.deploy import make_site_key
from server.identity import SiteIdentities
from server.roster import Roster
from server.strategy import GroupedStrategy
from shared_model.errors import ConfigError
from shared_model.federation_config import FederationConfig
from tests.unit.test_strategy import CURRENT, GROUPS, FakeReply, reply


def _pem(pub: Path) -> bytes:
    key = serialization.load_ssh_public_key(pub.read_bytes())
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Path]:
    return {s: make_site_key(tmp_path / "keys", s)[1] for s in ("a", "b", "evil")}


def _write(run_dir: Path, keys: dict[str, Path]) -> Roster:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "roster.yaml").write_text(
        "sites:\n"
        f'  a:\n    node_key: "{keys["a"].read_text().strip()}"\n'
        "    patients: [8, 12]\n"
        "  b:\n    patients: [5, 20]\n"
    )
    roster = Roster.load(run_dir)
    assert roster is not None
    return roster


def test_the_roster_bounds_declarations_keys_and_membership(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    strategy = GroupedStrategy(FederationConfig(min_sites=1), GROUPS)
    strategy.roster = _write(tmp_path / "run", keys)
    nodes = SiteIdentities(
        {1: "a", 2: "b", 3: "c"},
        "registration",
        keys={1: _pem(keys["a"]), 2: _pem(keys["b"])},
    )
    replies = [
        FakeReply(reply("a", 1.0).content, node=1),  # 10 patients, in [8, 12]
        FakeReply(reply("b", 3.0).content, node=2),
        FakeReply(reply("c", 9.0).content, node=3),  # not enrolled
    ]
    out = strategy.aggregate_round(1, replies, CURRENT, nodes)
    assert sorted(out.sites) == ["a", "b"] and list(out.excluded) == ["c"]
    assert "not enrolled" in out.excluded["c"][0]
    assert np.allclose(out.arrays["enc"], 2.0)

    # a node holding another key than the one the site enrolled with
    stolen = SiteIdentities(
        {1: "a", 2: "b"}, "registration", keys={1: _pem(keys["evil"])}
    )
    fresh = GroupedStrategy(FederationConfig(min_sites=1), GROUPS)
    fresh.roster = strategy.roster
    out = fresh.aggregate_round(1, replies[:2], CURRENT, stolen)
    assert "key is not the one a enrolled with" in out.excluded["a"][0]

    # a first declaration outside the enrolled range
    big = FakeReply(reply("a", 1.0, **{"n-shared": 13}).content, node=1)
    fresh = GroupedStrategy(FederationConfig(min_sites=1), GROUPS)
    fresh.roster = strategy.roster
    out = fresh.aggregate_round(1, [big, replies[1]], CURRENT, nodes)
    assert "outside the 8-12 it enrolled with" in out.excluded["a"][0]
    assert "a" not in fresh.declared


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("sites: [a]", "must map site names"),
        ("sites:\n  A:\n    patients: [1, 2]", "not a site name"),
        ("sites:\n  a:\n    patients: [3, 2]", "patients must be"),
        ("sites:\n  a:\n    patients: [1, 2]\n    weight: 3", "expected `node_key`"),
        ("sites:\n  a:\n    node_key: 'not a key'\n    patients: [1, 2]", "OpenSSH"),
        ("roster: {}", "one key, `sites`"),
        ("sites: [", "cannot read"),
    ],
)
def test_a_malformed_roster_is_refused_naming_the_key(
    tmp_path: Path, text: str, match: str
) -> None:
    (tmp_path / "roster.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        Roster.load(tmp_path)


def test_no_roster_file_means_no_roster(tmp_path: Path) -> None:
    assert Roster.load(tmp_path) is None
