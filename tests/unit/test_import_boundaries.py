"""The house's arrows point down: the core imports no Flower and no site,
server or simulation code; the server imports no site or simulation code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "shared_model": ("flwr", "client", "server", "simulations"),
    "server": ("client", "simulations"),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_arrow_runs_back_up(package: str) -> None:
    bad = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / package).rglob("*.py")
        for name in _imports(path) & set(FORBIDDEN[package])
    }
    assert not bad, sorted(bad)


def test_loading_the_server_app_loads_no_site_stack() -> None:
    """The model (MONAI's network) is shared; the site's code and opacus are not."""
    code = (
        "import sys, server.server_app; "
        "bad = [m for m in ('client', 'opacus', 'simulations') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "", out.stdout
