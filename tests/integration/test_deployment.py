"""A real deployment on 127.0.0.1: SuperLink with TLS and node authentication,
three SuperNodes with registered keys, a two-round run through `flwr run`; and a
SuperNode whose key was never registered is refused. Every process started here
is stopped here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.deploy import make_certificates, make_site_key
from tests.integration.local_ports import flower_env, free_port, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SITES = ("sah_sysu", "sysucc", "west_china")


class Federation:
    """Processes of a local TLS deployment; `stop()` ends them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = free_port()
        self.env = {
            **flower_env(),
        }
        self.certs = make_certificates(root / "certs")
        self.cli_home = root / "home_cli"
        self.cli_home.mkdir()
        (self.cli_home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n[superlink.test]\n'
            f'address = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs["ca_cert"]}"\n'
        )

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        home = self.root / f"home_{name}"
        home.mkdir(exist_ok=True)
        log = (self.root / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            args,
            env={**self.env, "FLWR_HOME": str(home)},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            start_new_session=True,  # its own process group: stop() ends its children
        )
        self.procs.append(proc)
        return proc

    def superlink(self) -> None:
        c = self.certs
        self.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile",
                str(c["ca_cert"]),
                "--ssl-certfile",
                str(c["server_cert"]),
                "--ssl-keyfile",
                str(c["server_key"]),
                "--enable-supernode-auth",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(self.root / "link.db"),
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_for_port(self.port)

    def flwr(
        self, *args: str, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env={**self.env, "FLWR_HOME": str(self.cli_home)},
            cwd=ROOT,
            text=True,
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    def supernode(
        self, name: str, key: Path, site_yaml: Path
    ) -> subprocess.Popen[bytes]:
        return self.start(
            name,
            [
                str(BIN / "flower-supernode"),
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--root-certificates",
                str(self.certs["ca_cert"]),
                "--auth-supernode-private-key",
                str(key),
                "--port",
                str(free_port()),
                "--max-retries",
                "3",
                "--max-wait-time",
                "20",
                "--node-config",
                f"site-config='{site_yaml}'",
            ],
        )

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        """Signal a process and everything it started (its own session)."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # not a group leader, or already gone
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            self.kill(proc)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill(proc, signal.SIGKILL)
                proc.wait(timeout=15)


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
        f"num-server-rounds=1 head-rounds=2 head-epochs=3 min-sites=2 "
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
