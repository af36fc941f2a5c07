"""The moefl command line, driven as a user would."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cli.main import app

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
    for name in (
        "report.md",
        "report.html",
        "training.png",
        "evaluation/evaluation.json",
    ):
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


def test_public_cohort_and_pretrain(tiny_cohort: Path, tmp_path: Path) -> None:
    """A public preset draws other patients than the site cohort of the same
    seed; `moefl pretrain` writes a backbone from it and refuses a site cohort
    (a backbone for DP sites must not see their patients); `moefl check` on a
    DP site works out the feasibility for the federation it names."""
    public = tmp_path / "public"
    made = runner.invoke(app, ["synth", str(public), "--preset", "public-tiny"])
    assert made.exit_code == 0, made.output
    assert "public pretraining cohort" in made.output
    assert json.loads((public / "cohort.json").read_text())["public"] is True
    ours = (public / "sites" / "Dataset101_WestChina" / "clinical.csv").read_text()
    site = (tiny_cohort / "sites" / "Dataset101_WestChina" / "clinical.csv").read_text()
    assert ours.splitlines()[0] == site.splitlines()[0]
    assert ours.splitlines()[1:] != site.splitlines()[1:]
    out = tmp_path / "backbone.safetensors"
    widths = ["--base-filters", "4", "--max-filters", "32"]
    done = runner.invoke(
        app, ["pretrain", str(public), "--out", str(out), "--epochs", "1", *widths]
    )
    assert done.exit_code == 0, done.output
    from shared_model.backbone import load_backbone

    backbone = load_backbone(out)
    assert backbone.sha256 in done.output and backbone.trained_on["public"] is True
    assert "public-tiny" in backbone.trained_on["source"]
    refused = runner.invoke(
        app, ["pretrain", str(tiny_cohort), "--out", str(tmp_path / "b2.safetensors")]
    )
    assert refused.exit_code != 0 and "not a public one" in refused.output
    assert not (tmp_path / "b2.safetensors").exists()


def test_check_works_out_dp_feasibility(tiny_copy: Path) -> None:
    yaml_path = tiny_copy / "site_configs" / "sah_sysu.yaml"
    yaml_path.write_text(
        yaml_path.read_text()
        + "privacy:\n  target_epsilon: 8.0\n  delta: 1.0e-5\n  max_grad_norm: 1.0\n"
    )
    joint = runner.invoke(
        app, ["check", str(yaml_path), "--run-config", "training='joint'", "--json"]
    )
    report = json.loads(joint.output)
    privacy = report["summary"]["privacy"]
    assert privacy["mode"] == "joint" and privacy["cannot_learn"] is True
    assert any(f["code"] == "privacy-cannot-learn" for f in report["findings"])
    heads = runner.invoke(
        app,
        [
            "check",
            str(yaml_path),
            "--run-config",
            "backbone='b.safetensors' head-fit='rounds' head-rounds=5",
        ],
    )
    assert heads.exit_code == 0, heads.output
    assert "trains the pCR heads over a public backbone" in heads.output
    assert (
        "noise multiplier" in heads.output
        and "validation counts are withheld" in heads.output
    )
    refused = runner.invoke(app, ["check", str(yaml_path)])
    assert "privacy-refused" in refused.output
    bad = runner.invoke(app, ["check", str(yaml_path), "--run-config", "head-lr=nan"])
    assert bad.exit_code != 0 and "head-lr" in bad.output


def _msd_task(folder: Path, n: int = 4) -> Path:
    """A small fixture in the MSD Task05_Prostate layout: 4-D T2/ADC volumes
    (channels last, ADC in 10^-6 mm^2/s), zone labels 1 and 2."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    affine = np.diag([0.6 * 4, 0.6 * 4, 4.0, 1.0])
    training = []
    for i in range(n):
        shape = (40, 40, 10)
        t2 = rng.normal(300, 20, shape)
        adc = rng.normal(1800, 100, shape)
        zones = np.zeros(shape, np.uint8)
        zones[14:26, 14:26, 3:7] = 1
        zones[17:23, 17:23, 4:6] = 2
        t2[zones > 0] += 150
        adc[zones > 0] -= 700
        image = np.stack([t2, adc], axis=-1).astype(np.float32)
        nib.save(
            nib.Nifti1Image(image, affine),
            str(folder / "imagesTr" / f"prostate_{i:02d}.nii.gz"),
        )
        nib.save(
            nib.Nifti1Image(zones, affine),
            str(folder / "labelsTr" / f"prostate_{i:02d}.nii.gz"),
        )
        training.append(
            {
                "image": f"./imagesTr/prostate_{i:02d}.nii.gz",
                "label": f"./labelsTr/prostate_{i:02d}.nii.gz",
            }
        )
    training.append({"image": "./imagesTr/prostate_99.nii.gz", "label": "./x.nii.gz"})
    (folder / "dataset.json").write_text(
        json.dumps(
            {
                "name": "PROSTATE",
                "modality": {"0": "T2", "1": "ADC"},
                "labels": {"0": "background", "1": "PZ", "2": "TZ"},
                "training": training,
            }
        )
    )
    return folder


def test_msd_import_check_and_pretrain(tmp_path: Path) -> None:
    """An MSD-layout task (T2 + ADC) becomes a public site that `moefl check`
    passes and `moefl pretrain` trains a backbone on; a missing case is
    skipped and named."""
    task = _msd_task(tmp_path / "Task05_Prostate")
    out = tmp_path / "public"
    done = runner.invoke(app, ["import-msd", str(task), str(out)])
    assert done.exit_code == 0, done.output
    assert "imported 4 cases" in done.output and "ADC unit 1e-6" in done.output
    assert "skipped prostate_99" in done.output
    site_yaml = out / "msd_prostate.yaml"
    import nibabel as nib
    import numpy as np

    t2 = nib.load(str(out / "msd_prostate" / "imagesTr" / "prostate_00_0000.nii.gz"))
    label = nib.load(str(out / "msd_prostate" / "labelsTr" / "prostate_00.nii.gz"))
    assert t2.shape == (40, 40, 10) and set(np.unique(label.get_fdata())) == {0, 1}
    check = runner.invoke(app, ["check", str(site_yaml)])
    assert check.exit_code == 0, check.output
    assert "role public" in check.output
    plan = tmp_path / "plan.json"
    from shared_model.plan import PRESET_PLANS

    PRESET_PLANS["tiny"].save(plan)
    backbone = tmp_path / "backbone.safetensors"
    trained = runner.invoke(
        app,
        ["pretrain", str(site_yaml), "--out", str(backbone), "--epochs", "1"]
        + ["--plan", str(plan), "--base-filters", "4", "--max-filters", "32"]
        + ["--source", "MSD Task05_Prostate (fixture)"],
    )
    assert trained.exit_code == 0, trained.output
    from shared_model.backbone import load_backbone

    assert load_backbone(backbone).trained_on["source"].startswith("MSD")
    again = runner.invoke(app, ["import-msd", str(task), str(out)])
    assert again.exit_code != 0 and "not empty" in again.output
