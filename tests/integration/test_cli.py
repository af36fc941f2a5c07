"""The moefl command line, driven as a user would."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from client.cli import app

runner = CliRunner()


def test_synth_tables_only_prints_counts(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["synth", str(tmp_path / "c"), "--preset", "paper", "--tables-only"]
    )
    assert result.exit_code == 0, result.output
    assert "760 retrospective + 95 prospective" in result.output
    assert "nCT   n=  88" in result.output
    summary = json.loads((tmp_path / "c" / "cohort.json").read_text())
    assert summary["tables_only"] is True
    # the oracle's scoreboard, one line per cohort
    assert "share of the oracle's gain" in result.output
    assert result.output.count("best regimen: nCRT") == 3


def test_synth_test_size_sets_the_held_out_cohort(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["synth", str(tmp_path / "c"), "--preset", "tiny", "--tables-only"]
        + ["--test-size", "12"],
    )
    assert result.exit_code == 0, result.output
    assert "+ 12 test cases" in result.output
    tables = sorted((tmp_path / "c" / "test" / "sites").glob("Dataset3*/clinical.csv"))
    assert len(tables) == 4  # every centre, the new one included
    rows = sum(len(t.read_text().splitlines()) - 1 for t in tables)
    assert rows == 12
    bad = runner.invoke(
        app, ["synth", str(tmp_path / "d"), "--tables-only", "--test-size", "-1"]
    )
    assert bad.exit_code == 2 and "--test-size" in bad.output


def test_synth_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    result = runner.invoke(app, ["synth", str(tmp_path), "--preset", "tiny"])
    assert result.exit_code == 2
    assert "not empty" in result.output


def test_check_exit_codes_and_json(tiny_copy: Path) -> None:
    yaml_path = tiny_copy / "site_configs" / "sah_sysu.yaml"
    ok = runner.invoke(app, ["check", str(yaml_path)])
    assert ok.exit_code == 0, ok.output
    assert "PASSED: 0 errors" in ok.output
    label = next((tiny_copy / "sites" / "Dataset103_SAHSYSU" / "labelsTr").iterdir())
    label.write_bytes(b"\x1f\x8b broken")
    bad = runner.invoke(app, ["check", str(yaml_path), "--json"])
    assert bad.exit_code == 1
    report = json.loads(bad.output)
    assert report["ok"] is False and report["site"] == "sah_sysu"
    assert any(
        f["code"] == "unreadable" and label.name in f["where"]
        for f in report["findings"]
    )


def test_check_of_a_missing_yaml_is_a_finding(tmp_path: Path) -> None:
    result = runner.invoke(app, ["check", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert "cannot read the site YAML" in result.output


def test_demo_reuses_an_existing_cohort(tiny_cohort: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(tiny_cohort, tmp_path / "run" / "cohort")
    result = runner.invoke(
        app, ["demo", "--out", str(tmp_path / "run"), "--preset", "tiny"]
    )
    assert result.exit_code == 0, result.output
    assert "reusing the tiny cohort" in result.output
    assert result.output.count(": ok (") == 10  # 3 + 3 + 4 test sites
    run = tmp_path / "run" / "federated"
    for name in ("report.md", "report.html", "training.png", "evaluation/metrics.json"):
        assert (run / name).is_file(), name
    assert f"report: {run / 'report.html'}" in result.output
    text = (run / "report.md").read_text()
    assert "circular" in text and "doubly robust" in text and "oracle" in text


def test_report_of_a_dp_run_without_evaluation(tmp_path: Path) -> None:
    """The report reads only records: a DP run record without an evaluation
    still gives the training and privacy sections, and says how to evaluate."""
    site = {
        "n-shared": 8,
        "privacy": {
            "epsilon": 1.5,
            "target_epsilon": 2.0,
            "delta": 1e-3,
            "noise_multiplier": 1.2,
            "max_grad_norm": 1.0,
        },
    }
    record = {
        "status": "finished",
        "rounds": [
            {"round": 1, "sites": {"a": site}, "seconds": 10.0},
            {
                "round": 2,
                "sites": {},
                "declined": {
                    "a": {"reason": "privacy budget", "privacy": site["privacy"]}
                },
                "seconds": 3.0,
            },
        ],
    }
    (tmp_path / "metrics.json").write_text(json.dumps(record))
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report.md").read_text()
    assert "| a | 1.500 | 2 |" in text and "moefl evaluate" in text
    assert (tmp_path / "privacy.png").is_file() and (tmp_path / "report.html").is_file()
    bad = runner.invoke(app, ["report", str(tmp_path / "none")])
    assert bad.exit_code != 0 and "no metrics.json" in bad.output


def test_simulate_rejects_an_invalid_privacy_budget(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["simulate", "--out", str(tmp_path), "--dp-epsilon", "-1"]
    )
    assert result.exit_code != 0
    assert "--dp-epsilon" in result.output and "target_epsilon" in result.output
    assert not any(tmp_path.iterdir())  # nothing made, nothing started
