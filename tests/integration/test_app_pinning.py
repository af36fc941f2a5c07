"""App pinning on 127.0.0.1: a SuperLink, a SuperNode in ``--isolation process``
and the site's pinned launcher (``python -m client.node.app_pinning launch``). The
approved app runs; the same app changed by one byte is refused before any of its
code runs (its import-time marker file never appears). Every process started here
is stopped here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.node.app_approval import app_hash
from simulations.local_deployment import flower_env, free_port, wait_for_port

pytestmark = [
    pytest.mark.integration,
    # Flower's FAB builder (used by app_hash) warns about its pathspec usage.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec.*"),
]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "pinprobe"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "moefltest"

[tool.flwr.app.components]
serverapp = "pinprobe.server_app:app"
clientapp = "client.client_app:app"

[tool.flwr.app.config]
note = "throwaway app for the app pinning test"
"""
# Importing this module is the first thing the app's code does: the marker file
# proves it ran. The changed app differs in one byte (A -> B) of the marker name.
# Like moefl's app, it lives in a package named `client`: the launcher has imported
# moefl's own `client`, and the app must still get its own approved file.
CLIENT_APP = """\
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

Path({out!r}, "imported_A").write_text("this app's code ran")
app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({{"m": MetricRecord({{"answer": 42}})}}), reply_to=msg)
"""
SERVER_APP = """\
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = []
    for _ in range(300):
        nodes = list(grid.get_node_ids())
        if nodes:
            break
        time.sleep(0.2)
    msg = grid.create_message(
        RecordDict({{"c": ConfigRecord({{"q": 1}})}}), MessageType.QUERY, nodes[0], "1"
    )
    out = {{}}
    for reply in grid.send_and_receive([msg], timeout=90):
        if reply.has_error():
            out = {{"error": reply.error.code, "reason": reply.error.reason}}
        else:
            out = {{"answer": reply.content["m"]["answer"]}}
    Path({out!r}, f"result_{{context.run_id}}.json").write_text(json.dumps(out))
"""


def write_app(folder: Path, out: Path, variant: str) -> Path:
    for package in ("client", "pinprobe"):
        (folder / package).mkdir(parents=True)
        (folder / package / "__init__.py").write_text("")
    (folder / "pyproject.toml").write_text(PYPROJECT)
    client = CLIENT_APP.format(out=str(out)).replace(
        "imported_A", f"imported_{variant}"
    )
    (folder / "client" / "client_app.py").write_text(client)
    (folder / "pinprobe" / "server_app.py").write_text(SERVER_APP.format(out=str(out)))
    return folder


class Site:
    """SuperLink, SuperNode and pinned launcher; `stop()` ends them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.link_port, self.runtime_port = free_port(), free_port()
        self.env = {
            **flower_env(),
            "TMPDIR": str(root / "tmp"),  # where the launcher unpacks approved apps
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",  # the launcher's (default 1 s)
        }
        (root / "tmp").mkdir()
        self.cli_home = root / "home_cli"
        self.cli_home.mkdir()
        (self.cli_home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n[superlink.test]\n'
            f'address = "127.0.0.1:{self.link_port}"\ninsecure = true\n'
        )

    def start(self, name: str, args: list[str]) -> None:
        home = self.root / f"home_{name}"
        home.mkdir()
        self.procs.append(
            subprocess.Popen(
                args,
                env={**self.env, "FLWR_HOME": str(home)},
                stdout=(self.root / f"{name}.log").open("wb"),
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,  # its own process group: stop() ends children
            )
        )

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def flwr_run(self, app: Path) -> dict[str, str]:
        done = subprocess.run(
            [str(BIN / "flwr"), "run", str(app), "test", "--format", "json"],
            env={**self.env, "FLWR_HOME": str(self.cli_home)},
            cwd=self.root,
            text=True,
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return dict(json.loads(done.stdout))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def test_site_runs_the_approved_app_and_refuses_a_changed_one(
    site: Site, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    approved = write_app(tmp_path / "approved", out, "A")
    changed = write_app(tmp_path / "changed", out, "B")
    a = (approved / "client" / "client_app.py").read_bytes()
    b = (changed / "client" / "client_app.py").read_bytes()
    assert len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1
    hash_a, hash_b = app_hash(approved), app_hash(changed)
    assert hash_a != hash_b
    (tmp_path / "data").mkdir()
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(
        f'site_name: pinned_site\ndataset_dir: data\napproved_apps:\n  - "{hash_a}"\n'
    )

    link = f"127.0.0.1:{site.link_port}"
    site.start(
        "superlink",
        [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1"]
        + ["--port", str(site.link_port), "--database", str(tmp_path / "link.db")]
        + ["--disable-runtime-dependency-installation"],
    )
    site.start(
        "supernode",
        [str(BIN / "flower-supernode"), "--insecure", "--superlink", link]
        + ["--isolation", "process", "--host", "127.0.0.1"]
        + ["--port", str(site.runtime_port), "--max-retries", "10"],
    )
    site.start(
        "launcher",
        [sys.executable, "-m", "client.node.app_pinning", "launch", "--insecure"]
        + ["--site-config", str(site_yaml)]
        + ["--runtime-api-address", f"127.0.0.1:{site.runtime_port}"],
    )
    wait_for_port(site.link_port)
    runs = {v: site.flwr_run(app) for v, app in (("A", approved), ("B", changed))}
    assert runs["A"]["fab-hash"] == hash_a[:8] and runs["B"]["fab-hash"] == hash_b[:8]

    results = {v: out / f"result_{r['run-id']}.json" for v, r in runs.items()}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(p.exists() for p in results.values()):
        time.sleep(0.5)
    logs = "".join(
        f"\n--- {n}\n" + site.log(n)[-3000:] for n in ("launcher", "superlink")
    )
    assert all(p.exists() for p in results.values()), logs
    result_a = json.loads(results["A"].read_text())
    result_b = json.loads(results["B"].read_text())

    assert result_a == {"answer": 42}, logs  # approved: it ran and replied
    assert (out / "imported_A").exists()
    assert "error" in result_b, logs  # changed: refused, the coordinator is told
    assert "refused" in result_b["reason"] and hash_b in result_b["reason"]
    assert hash_a not in result_b["reason"]  # the approved list stays at the site
    assert not (out / "imported_B").exists()  # none of the changed app's code ran
    refusal = [line for line in site.log("launcher").splitlines() if "REFUSED" in line]
    assert len(refusal) == 1 and hash_b in refusal[0] and hash_a in refusal[0], logs
    assert str(site_yaml) in refusal[0]

    def unpacked() -> list[Path]:  # beside the fork server's and PyTorch's folders
        return [
            p
            for p in (tmp_path / "tmp").iterdir()
            if not p.name.startswith(("pymp-", "torchinductor_"))
        ]

    deadline = time.monotonic() + 15  # task processes remove what they unpacked
    while time.monotonic() < deadline and unpacked():
        time.sleep(0.3)
    assert not unpacked()
