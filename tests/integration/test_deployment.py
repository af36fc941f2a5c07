"""A real deployment on 127.0.0.1: SuperLink with TLS and node authentication,
three SuperNodes with registered keys, a two-round run through `flwr run`; and a
SuperNode whose key was never registered is refused. Every process started here
is stopped here.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.deploy import make_site_key
from simulations.local_deployment import LocalDeployment as Federation

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SITES = ("sah_sysu", "sysucc", "west_china")


@pytest.fixture()
def federation(tiny_cohort: Path, tmp_path: Path) -> Iterator[Federation]:
    shutil.copytree(tiny_cohort, tmp_path / "cohort")
    fed = Federation(tmp_path)
    try:
        fed.superlink()
        yield fed
    finally:
        fed.stop()


def test_tls_authenticated_federation_runs_and_survives_losing_a_site(
    federation: Federation, tmp_path: Path
) -> None:
    """Three registered SuperNodes answer the planning query and complete two
    rounds over TLS; then one site's SuperNode is killed and the third round
    goes on with the other two."""
    nodes = {}
    for site in SITES:
        _, pub = make_site_key(tmp_path / "keys", site)
        reg = federation.flwr("supernode", "register", str(pub), "test", "--name", site)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        nodes[site] = federation.supernode(
            site,
            tmp_path / "keys" / f"{site}.key",
            tmp_path / "cohort" / "site_configs" / f"{site}.yaml",
        )
    run_dir = tmp_path / "run"
    config = (
        f"num-server-rounds=1 head-fit='rounds' head-rounds=2 head-epochs=3 min-sites=2 "
        f"base-filters=4 max-filters=32 "
        f"round-timeout=150 evaluate-every=2 run-dir='{run_dir}'"
    )
    launcher = subprocess.Popen(
        [
            str(BIN / "flwr"),
            "run",
            str(ROOT),
            "test",
            "--run-config",
            config,
            "--stream",
        ],
        env={**federation.env, "FLWR_HOME": str(federation.cli_home)},
        cwd=ROOT,
        stdout=(tmp_path / "launcher.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    federation.procs.append(launcher)
    metrics = run_dir / "metrics.json"
    deadline = time.monotonic() + 900

    def record() -> dict:
        return json.loads(metrics.read_text()) if metrics.exists() else {"rounds": []}

    while time.monotonic() < deadline and len(record()["rounds"]) < 2:
        if record().get("status") == "failed":
            break
        time.sleep(1)
    federation.kill(nodes["sysucc"], signal.SIGKILL)
    while time.monotonic() < deadline and record().get("status") in (None, "running"):
        time.sleep(2)
    final = record()
    assert final.get("status") == "finished", (
        json.dumps(final)[-2000:] + federation.log("superlink")[-2000:]
    )
    # no plan given: the run began with the planning query over TLS
    planning = final["planning"]
    assert planning["sites"] == sorted(SITES) and not planning["excluded"]
    assert planning["identified_by"] == "registration"
    assert json.loads((run_dir / "plan.json").read_text()) == planning["plan"]
    assert planning["plan"]["patch_size"] == [12, 40, 40]  # moefl plan's, nnU-Net's
    rounds = final["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    # staged: a segmentation round, then head rounds over the sites' caches
    assert [r["stage"] for r in rounds] == ["segmentation", "heads", "heads"]
    for r in rounds[:2]:  # the two-round run over TLS with node authentication
        assert sorted(r["sites"]) == sorted(SITES)
        assert r["identified_by"] == "registration"  # the nodes' registered names
        assert r["groups"]["expert/nCT"]["sites"] == ["west_china"]
    assert rounds[1]["evaluate"]["n"] == 7
    assert sorted(rounds[2]["sites"]) == ["sah_sysu", "west_china"]
    assert rounds[2]["missing"] == ["sysucc"] and rounds[2]["updated"]
    launcher.wait(timeout=120)
    listing = federation.flwr("list", "test", "--format", "json")
    assert "finished:completed" in listing.stdout, listing.stdout + listing.stderr


def test_unregistered_key_is_refused(federation: Federation, tmp_path: Path) -> None:
    key, _ = make_site_key(tmp_path / "keys", "rogue")
    proc = federation.supernode(
        "rogue", key, tmp_path / "cohort" / "site_configs" / "sysucc.yaml"
    )
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(
            "a SuperNode with an unregistered key stayed up:\n"
            + federation.log("rogue")[-2000:]
        )
    assert proc.returncode != 0
    assert (
        "Failed to activate SuperNode" in federation.log("rogue")
        or "authenticat" in federation.log("rogue").lower()
    ), federation.log("rogue")[-2000:]
