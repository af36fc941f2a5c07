"""The run folder survives a crash at any write: resume falls back to the
newest round whose files all read back, and never loses a round's record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server.run_folder import RUN_RECORD, RunFolder, StrategyState, read_run_record
from shared_model.aggregation import AdamState
from shared_model.errors import ConfigError
from shared_model.model_config import ModelConfig
from shared_model.plan import PRESET_PLANS

PLAN = PRESET_PLANS["tiny"]


def _three_rounds(path: Path) -> RunFolder:
    folder = RunFolder(path)
    record: dict = {"status": "running", "rounds": []}
    for rnd in (1, 2, 3):
        record["rounds"].append({"round": rnd})
        adam = AdamState(
            t=rnd, m={"w": np.full(2, rnd, np.float32)}, v={"w": np.ones(2, np.float32)}
        )
        folder.save_round(
            rnd,
            {"w": np.full(2, float(rnd), np.float32)},
            StrategyState(adam, {"a": {"shared": 5}}, client_dp_releases=rnd),
            record,
            ModelConfig.from_plan(PLAN),
            PLAN,
        )
    return folder


def _ckpt(folder: RunFolder, rnd: int, suffix: str) -> Path:
    return folder.checkpoints / f"round_{rnd:03d}{suffix}"


def test_a_complete_folder_resumes_from_its_last_round(tmp_path: Path) -> None:
    got = _three_rounds(tmp_path).last_complete()
    assert got is not None and got.round == 3
    assert np.array_equal(got.arrays["w"], np.full(2, 3.0, np.float32))
    assert got.state.adam.t == 3 and got.state.client_dp_releases == 3
    assert np.array_equal(got.state.adam.m["w"], np.full(2, 3.0, np.float32))
    assert [r["round"] for r in got.rounds] == [1, 2, 3]
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary file is left


BREAKS = {
    "truncated weights": lambda f: _ckpt(f, 3, ".safetensors").write_bytes(
        _ckpt(f, 3, ".safetensors").read_bytes()[:40]
    ),
    "missing state": lambda f: _ckpt(f, 3, ".state.json").unlink(),
    "empty state": lambda f: _ckpt(f, 3, ".state.json").write_text(""),
    "truncated moments": lambda f: _ckpt(f, 3, ".adam.safetensors").write_bytes(b"{"),
    "record without the round": lambda f: (f.path / "metrics.json").write_text(
        json.dumps({"rounds": [{"round": 1}, {"round": 2}]})
    ),
    "weights of a round never marked": lambda f: _ckpt(
        f, 4, ".safetensors"
    ).write_bytes(_ckpt(f, 3, ".safetensors").read_bytes()),
}


@pytest.mark.parametrize("kind", sorted(BREAKS))
def test_resume_falls_back_past_an_incomplete_round(kind: str, tmp_path: Path) -> None:
    folder = _three_rounds(tmp_path)
    BREAKS[kind](folder)
    got = folder.last_complete()
    expected = 3 if kind == "weights of a round never marked" else 2
    assert got is not None and got.round == expected
    assert np.array_equal(got.arrays["w"], np.full(2, float(expected), np.float32))
    assert got.state.client_dp_releases == expected
    assert [r["round"] for r in got.rounds] == list(range(1, expected + 1))


def test_a_missing_record_means_starting_afresh(tmp_path: Path) -> None:
    folder = _three_rounds(tmp_path)
    (folder.path / "metrics.json").unlink()
    assert folder.last_complete() is None


def test_a_second_run_on_the_folder_is_refused(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    with (
        folder.locked(),
        pytest.raises(ConfigError, match="another run"),
        RunFolder(tmp_path).locked(),
    ):
        pass
    with RunFolder(tmp_path).locked():  # released
        pass


def test_a_resume_under_a_changed_run_config_is_refused(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.check_run_config({"lr": 0.001, "num-server-rounds": 3}, allow_changes=True)
    folder.check_run_config({"lr": 0.001, "num-server-rounds": 8}, allow_changes=False)
    with pytest.raises(ConfigError, match="lr"):
        folder.check_run_config(
            {"lr": 0.01, "num-server-rounds": 8}, allow_changes=False
        )
    stored = json.loads((tmp_path / "run_config.json").read_text())
    assert stored["lr"] == 0.001  # the refused config is not stored
    folder.check_run_config({"lr": 0.01, "num-server-rounds": 8}, allow_changes=True)
    assert json.loads((tmp_path / "run_config.json").read_text())["lr"] == 0.01


def test_a_damaged_run_record_is_refused_with_its_path(tmp_path: Path) -> None:
    (tmp_path / RUN_RECORD).write_text('{"status": "finished", "rounds": [1, {}]}')
    with pytest.raises(ConfigError, match="rounds") as info:
        read_run_record(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / RUN_RECORD).write_text('{"status": "finished", "rounds": [{}]}')
    assert read_run_record(tmp_path)["rounds"] == [{}]
