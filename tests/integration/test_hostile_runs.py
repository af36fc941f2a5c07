"""One hostile site in a whole run: the coordinator's real loop
(:func:`server.server_app.run_federation`) against three honest sites and one
hostile registered node (:mod:`simulations.hostile`). No reply ends the run,
none moves the model past the round's bound, and each comes to what it should:
excluded with a reason, bounded, or (harmless) accepted."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load

from shared_model.plan import PRESET_PLANS
from simulations.hostile import ATTACKER, Hostile
from simulations.hostile_kinds import HOSTILE, metrics, scaled_kind
from simulations.hostile_run import judge, play

OFF = {"update-bound": 0.0, "max-site-share": 1.0}


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    PRESET_PLANS["tiny"].save(path)
    return path


@pytest.fixture(scope="module")
def honest(plan: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The all-honest runs' final models, with the bounds on and off."""
    out = {}
    for tag, override in (("default", {}), ("off", OFF)):
        run_dir = tmp_path_factory.mktemp(f"honest_{tag}")
        record, _ = play(None, run_dir, plan, **override)
        assert record["status"] == "finished", record
        out[tag] = load((run_dir / "model.safetensors").read_bytes())
    return out


def _run(
    h: Hostile, plan: Path, tmp_path: Path, honest: dict[str, Any], **override: Any
) -> Any:
    record, grid = play(h, tmp_path / "run", plan, **override)
    ref = honest["off" if override else "default"]
    return judge(h, record, tmp_path / "run", grid, ref), record


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_reply_never_ends_the_run_nor_passes_the_bound(
    kind: str, plan: Path, tmp_path: Path, honest: dict[str, Any]
) -> None:
    verdict, record = _run(HOSTILE[kind], plan, tmp_path, honest)
    assert verdict.finished, record.get("error")
    assert verdict.outcome == HOSTILE[kind].expect, verdict
    assert verdict.move_over_bound <= 1 + 1e-6
    if verdict.outcome == "excluded":
        assert verdict.reason


def test_there_are_sixty_kinds() -> None:
    assert len(HOSTILE) >= 60


DP_KEYS = ("dp_epsilon", "dp_target_epsilon", "dp_delta")


@pytest.mark.parametrize(
    "keys",
    [
        *(c for n in (1, 2) for c in itertools.combinations(DP_KEYS, n)),
        ("dp_foo",),
        ("dp_epsilon", "dp_target_epsilon", "dp_delta", "dp_foo"),
    ],
    ids="+".join,
)
def test_a_partial_dp_account_is_excluded_and_the_run_finishes(
    keys: tuple[str, ...], plan: Path, tmp_path: Path, honest: dict[str, Any]
) -> None:
    """Any dp-* key without the whole account ended the coordinator's run
    (KeyError in its privacy log line) and broke `moefl report`."""
    h = Hostile("partial", "train", metrics(**dict.fromkeys(keys, 1e-3)))
    verdict, record = _run(h, plan, tmp_path, honest)
    assert verdict.finished and verdict.outcome == "excluded", verdict
    assert "DP accounting" in verdict.reason

    from server.report import build_report

    build_report(tmp_path / "run")  # reads the record defensively
    assert (tmp_path / "run" / "report.md").is_file()


def test_a_report_reads_an_old_record_with_a_partial_account(tmp_path: Path) -> None:
    """A run folder written before accounts were typed still reports."""
    from server.report import build_report

    entry = {"privacy": {"dp_foo": 1.0}, "n-shared": 4}
    rounds = [
        {
            "round": 1,
            "sites": {"a": entry, "b": {"privacy": {"epsilon": 1.0}}},
            "declined": {"c": {"privacy": {"epsilon": "x"}}},
            "excluded": {},
        }
    ]
    (tmp_path / "metrics.json").write_text(
        json.dumps({"status": "finished", "rounds": rounds})
    )
    md, _ = build_report(tmp_path)
    assert "| b | 1.000 | n/a |" in md.read_text()


def test_a_scaled_update_moves_the_model_no_further_than_the_bound(
    plan: Path, tmp_path: Path, honest: dict[str, Any]
) -> None:
    bounded, _ = _run(scaled_kind(1e30), plan, tmp_path / "on", honest)
    off, record = _run(scaled_kind(1e30), plan, tmp_path / "off", honest, **OFF)
    assert bounded.outcome == "bounded" and bounded.move_over_bound <= 1 + 1e-6
    assert bounded.distance < 2.0  # the honest run's own progress is 1
    assert not off.finished or off.distance > 1e6  # the rule before: taken


def test_a_huge_declaration_gets_no_more_than_the_share_cap(
    plan: Path, tmp_path: Path, honest: dict[str, Any]
) -> None:
    big = Hostile("big", "train", metrics(n_shared=100_000, n_nCRT=100_000), "bounded")
    verdict, record = _run(big, plan, tmp_path, honest)
    assert verdict.outcome == "bounded"
    for r in record["rounds"]:
        shares = r["bounds"]["capped_shares"]
        assert shares["shared"][ATTACKER] == pytest.approx(0.5)
        assert sum(shares["shared"].values()) == pytest.approx(1.0)
    assert np.isfinite(verdict.distance) and verdict.distance < 0.5
