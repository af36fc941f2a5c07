"""The documentation's commands work as written: the plain-Flower block of the
researcher's guide (docs/research.md) runs on the tiny cohort from the
repository's root, the run finishes, and its last line stops the local SuperLink
that `flwr run` started."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from simulations.local_deployment import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "research.md"  # the guide that holds the block
MARKER = "<!-- plain-flower:"


def readme_block(marker: str) -> list[str]:
    """The command lines of the fenced block after ``marker`` in the guide."""
    text = GUIDE.read_text()
    start = text.index("```", text.index(marker)) + 3
    block = text[start : text.index("```", start)]
    return [line for line in block.strip().splitlines() if line.strip()]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_plain_flower_block_runs_as_written(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    lines = readme_block(MARKER)
    assert lines[0].startswith("source .venv/bin/activate")
    assert any(line.startswith("flwr run . ") for line in lines)
    assert lines[-1].startswith("pkill -f ")
    run_dir = tmp_path / "run"
    script = "\n".join(lines)
    # the tiny cohort in place of the demo's, and a small run; nothing else changes
    script = script.replace("$PWD/demo_run/cohort", str(tiny_cohort))
    script = script.replace("$PWD/runs/flwr", str(run_dir))
    script = re.sub(
        r"(run-dir='[^']*')",
        r"\1 num-server-rounds=1 head-rounds=1 head-epochs=2 base-filters=4 "
        r"max-filters=16 evaluate-every=0",
        script,
    )
    http, control = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")},
        "PATH": "/usr/bin:/bin",  # nothing of the venv until the block activates it
        "FLWR_HOME": str(tmp_path / "flwr_home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
    }
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:  # whatever happened, leave no SuperLink behind
        subprocess.run(["pkill", "-f", f"flower-superlink.*--port {http}"], check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "finished:completed" in done.stdout, output[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "finished"
    # one segmentation round, then the heads' Newton fit and the advice rule
    assert [r["round"] for r in record["rounds"]] == [1]
    assert record["advice"]["fit"]["converged"] and record["advice"]["rule"]
    deadline = time.monotonic() + 20
    while _listening(http) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _listening(http), "the block's last line left the SuperLink running"
