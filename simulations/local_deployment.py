"""A Flower deployment on 127.0.0.1, for the tests and benchmarks that start
real processes: a SuperLink with TLS and node authentication, registered
SuperNodes (Flower's own ClientApp processes, or app pinning's launcher), and
``flwr`` commands against them. :meth:`LocalDeployment.stop` ends every
process it started (each in its own session, with its children).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from server.deploy import make_certificates

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    """Return once something listens on ``port``; TimeoutError after ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def flower_env() -> dict[str, str]:
    """This environment for a Flower process: no outbound calls, INFO logs, the
    repository importable and this venv's commands first on the PATH."""
    return {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOG_LEVEL": "INFO",
        "PYTHONPATH": str(ROOT),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


class LocalDeployment:
    """Processes of a local TLS deployment under ``root``; `stop()` ends them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = free_port()
        self.env = flower_env()
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
        log = (self.root / f"{name}.log").open("ab")
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
        self, name: str, key: Path, site_yaml: Path, *, pinned: bool = False
    ) -> subprocess.Popen[bytes]:
        """A registered site's SuperNode. ``pinned``: in ``--isolation process``
        with app pinning's launcher beside it (``moefl pinned-clientapp``; the
        site YAML must approve the app), else Flower's own ClientApp processes."""
        runtime_port = free_port()
        proc = self.start(
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
                str(runtime_port),
                "--max-retries",
                "3",
                "--max-wait-time",
                "20",
                "--node-config",
                f"site-config='{site_yaml}'",
                *(["--isolation", "process"] if pinned else []),
            ],
        )
        if pinned:
            self.start(
                f"{name}_launcher",
                [
                    sys.executable,
                    "-m",
                    "client.node.app_pinning",
                    "launch",
                    "--insecure",
                ]
                + ["--site-config", str(site_yaml)]
                + ["--runtime-api-address", f"127.0.0.1:{runtime_port}"],
            )
        return proc

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
