"""The house's arrows point down (README, "The house"): the core imports no
Flower and nothing above it; the records layer only the core and Flower; the
server no site, multi-site, simulation or command-line code; the site no
server, multi-site, simulation or command-line code; the multi-site work no
simulation or command-line code; the simulations no command-line code.
Message keys are spelt in one place."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UPPER = ("wire", "secagg", "client", "server", "multisite", "simulations", "cli")
FORBIDDEN = {
    "shared_model": ("flwr", *UPPER),
    "wire": ("secagg", "client", "server", "multisite", "simulations", "cli"),
    "secagg": (
        "shared_model",
        "wire",
        "client",
        "server",
        "multisite",
        "simulations",
        "cli",
    ),
    "server": ("client", "multisite", "simulations", "cli"),
    "client": ("server", "multisite", "simulations", "cli"),
    "multisite": ("simulations", "cli"),
    "simulations": ("cli",),
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
        "import sys, server.server_app, server.report; "
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


def test_reply_keys_are_named_in_one_place() -> None:
    """Reply keys (`n-shared`, `train-loss`, `dp-...`, `expert/...`) and request
    keys (`run-config`, `allowed-regimens`, ...) are spelt only in
    shared_model/messages.py; both sides go through its types."""
    spelled = (
        '"n-shared"',
        '"train-loss"',
        '"dp-',
        'f"n-{',
        'f"expert/{',
        '"run-config"',
        '"model-config"',
        '"allowed-regimens"',
        '"backbone-sha256"',
    )
    offenders = sorted(
        f"{path.relative_to(ROOT)}: {token}"
        for package in ("client", "server", "shared_model", "wire", "simulations")
        for path in (ROOT / package).rglob("*.py")
        # the run config and its range checks name its keys (dp-noise-multiplier, ...)
        if path.name
        not in ("messages.py", "federation_config.py", "federation_checks.py")
        for token in spelled
        # the simulations set run-config keys (`dp-reproducible`, ...)
        if token in path.read_text()
        and not (package == "simulations" and token == '"dp-')
    )
    assert not offenders, offenders


def test_train_reply_round_trips_and_refuses_nonsense() -> None:
    from shared_model.messages import COUNT_KEYS, GROUPS, PrivacyAccount, TrainReply

    reply = TrainReply(
        counts={g: i for i, g in enumerate(GROUPS)},
        steps=12,
        seconds=3.5,
        losses={"train": 1.0, "seg": 0.6, "pcr": 0.4},
    )
    assert TrainReply.from_values(reply.to_values()) == reply
    account = PrivacyAccount(epsilon=2.0, target_epsilon=8.0, delta=1e-5, steps=3)
    private = TrainReply(counts=dict.fromkeys(GROUPS, 4), privacy=account)
    values = private.to_values()
    assert values["dp-epsilon"] == 2.0 and "train-loss" not in values
    assert TrainReply.from_values(values).privacy == account
    for bad in ({COUNT_KEYS["shared"]: -1}, {"seconds": float("nan")}, {"steps": 1.5}):
        with pytest.raises(ValueError):
            TrainReply.from_values({**reply.to_values(), **bad})
