"""`moefl train` and `moefl predict` end to end on the tiny cohort."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from client.scoring.predict import parse_clinical_args, predict_case
from multisite.training import read_training_record
from shared_model.checkpoint import load_checkpoint
from shared_model.clinical import REGIMENS
from shared_model.errors import ConfigError, DataError
from shared_model.site_evaluation import read_evaluation

runner = CliRunner()
CLINICAL = ["cT=T3", "cN=N1", "EMVI=0", "CRM=1", "LLN=0", "location=mid"]


@pytest.fixture(scope="module")
def pooled_run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    root = tmp_path_factory.mktemp("train") / "cohort"
    shutil.copytree(tiny_cohort, root)
    out = root.parent / "run"
    yamls = [str(root / "site_configs" / f"{s}.yaml") for s in ("west_china", "sysucc")]
    result = runner.invoke(
        app,
        [
            "train",
            "--sites",
            *yamls,
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--base-filters",
            "4",
            "--max-filters",
            "32",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "pooled training on west_china, sysucc" in result.output
    return out


def test_run_folder_holds_the_documented_files(pooled_run: Path) -> None:
    for name in ("model.safetensors", "plan.json", "config.json", "training.json"):
        assert (pooled_run / name).is_file()
    m = read_training_record(pooled_run)
    assert m["mode"] == "pooled" and m["sites"] == ["west_china", "sysucc"]
    assert m["n_train"] + m["n_val"] == 23
    epoch = m["epochs"][0]
    assert {"train_loss", "val_loss", "dice", "auc", "auc_by_regimen"} <= set(epoch)
    assert set(m["comparators"]) == {"clinical_logreg", "clinical_gbm", "image_only"}
    assert m["n_parameters"] > 10_000


def test_checkpoint_round_trips_without_pickle(pooled_run: Path) -> None:
    raw = (pooled_run / "model.safetensors").read_bytes()
    assert not raw.startswith(b"\x80")  # not a pickle stream
    model, plan = load_checkpoint(pooled_run)
    model.eval()
    x = torch.randn(1, 2, *plan.patch_size)
    c = torch.zeros(1, 15)
    again, _ = load_checkpoint(pooled_run)
    again.eval()
    with torch.no_grad():
        assert torch.equal(
            model(x, c, torch.tensor([1])).pcr_logits,
            again(x, c, torch.tensor([1])).pcr_logits,
        )


def test_broken_checkpoint_is_a_clear_error(pooled_run: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "ckpt"
    shutil.copytree(pooled_run, broken)
    (broken / "plan.json").unlink()
    with pytest.raises(ConfigError, match="plan.json is missing"):
        load_checkpoint(broken)
    # a truncated weights file (a copy cut short) is a clear error too
    truncated = tmp_path / "truncated"
    shutil.copytree(pooled_run, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConfigError, match="truncated"):
        load_checkpoint(truncated)


def test_predict_prints_json_and_writes_mask_on_the_input_grid(
    pooled_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    images = tiny_cohort / "sites" / "Dataset102_SYSUCC" / "imagesTr"
    t2, adc = images / "SYC_R0001_0000.nii.gz", images / "SYC_R0001_0001.nii.gz"
    mask_path = tmp_path / "mask.nii.gz"
    args = [
        "predict",
        str(pooled_run),
        "--t2w",
        str(t2),
        "--adc",
        str(adc),
        "--adc-unit",
        "1e-6",
        "--mask-out",
        str(mask_path),
    ]
    for c in CLINICAL:
        args += ["--clinical", c]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert set(out["pcr_probability"]) == {"nCRT", "TNT", "nCT"}
    assert all(0 <= p <= 1 for p in out["pcr_probability"].values())
    assert out["tumour_volume_ml"] >= 0
    ref, mask = nib.load(str(t2)), nib.load(str(mask_path))
    assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    # the same map under the wrong unit is refused, with the unit it suggests
    wrong_args = list(args)
    wrong_args[wrong_args.index("--adc-unit") + 1] = "1e-3"
    wrong = runner.invoke(app, wrong_args)
    assert wrong.exit_code == 2
    assert "adc_unit 1e-3" in wrong.output and '--adc-unit to "1e-6"' in wrong.output


def test_mask_maps_back_through_the_resampling(
    pooled_run: Path, tiny_cohort: Path
) -> None:
    """A known label, pushed through the same preprocessing and back, lands where
    it was: checks the inverse mapping independently of model quality."""
    from client.data.transforms import build_preprocess
    from client.scoring.predict import mask_on_input_grid
    from shared_model.plan import Plan

    _, plan = load_checkpoint(pooled_run)
    folder = tiny_cohort / "sites" / "Dataset101_WestChina"
    label = folder / "labelsTr" / "WCH_R0002.nii.gz"
    t2 = folder / "imagesTr" / "WCH_R0002_0000.nii.gz"
    truth = np.asarray(nib.load(str(label)).dataobj) > 0
    # the checkpoint's plan, and one whose patch is larger than the volume on
    # every axis (scoring pads symmetrically; the way back must undo it)
    padded = Plan(patch_size=(32, 64, 64), spacing=plan.spacing)
    for p in (plan, padded):
        data = build_preprocess(p, adc_scale=1.0, has_label=True)(
            {
                "t2": str(t2),
                "adc": str(folder / "imagesTr" / "WCH_R0002_0001.nii.gz"),
                "label": str(label),
            }
        )
        lab_dhw = np.asarray(data["label"])[0] > 0.5  # (D, H, W), padded to the patch
        back = mask_on_input_grid(lab_dhw.astype(np.uint8), t2, p)
        dice = 2 * (back.astype(bool) & truth).sum() / (back.sum() + truth.sum())
        assert dice > 0.8, (p, dice)


@pytest.mark.parametrize(
    ("pairs", "match"),
    [
        (["cT=T3"], "missing"),
        ([*CLINICAL[:-1], "location=distal"], "`location` has value 'distal'"),
        ([*CLINICAL, "age=60"], "unknown variable"),
        (["cT:T3"], "KEY=VALUE"),
    ],
)
def test_bad_clinical_input_is_named(pairs: list[str], match: str) -> None:
    with pytest.raises(DataError, match=match):
        parse_clinical_args(pairs)


def test_bad_image_input_is_named(
    pooled_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    images = tiny_cohort / "sites" / "Dataset101_WestChina" / "imagesTr"
    t2 = images / "WCH_R0001_0000.nii.gz"
    other = (
        tiny_cohort
        / "sites"
        / "Dataset102_SYSUCC"
        / "imagesTr"
        / "SYC_R0001_0001.nii.gz"
    )
    clinical = parse_clinical_args(CLINICAL)
    with pytest.raises(DataError, match="file not found"):
        predict_case(pooled_run, t2=t2, adc=tmp_path / "none.nii.gz", clinical=clinical)
    with pytest.raises(DataError, match="grid"):
        predict_case(pooled_run, t2=t2, adc=other, clinical=clinical, adc_unit="1e-6")
    result = runner.invoke(
        app,
        [
            "predict",
            str(pooled_run),
            "--t2w",
            str(t2),
            "--adc",
            str(other),
            *sum((["--clinical", c] for c in CLINICAL), []),
        ],
    )
    assert result.exit_code == 2 and "error:" in result.output


def test_evaluate_reports_metrics_recommendations_and_policy_value(
    pooled_run: Path, tmp_path: Path
) -> None:
    """`moefl evaluate` on the tiny cohort: validation and prospective blocks, the
    count-based AUC equal to scikit-learn on the pooled per-patient scores, the
    threshold chosen on validation and applied to the prospective cohort, and
    the policy value with the circular estimate apart and the oracle beside."""
    from sklearn.metrics import roc_auc_score

    from client.data.dataset import build_site_datasets
    from client.data.site_config import load_site_config
    from client.training.engine import evaluate
    from shared_model.federated_metrics import AUC_BINS

    root = pooled_run.parent / "cohort"
    retro = sorted((root / "site_configs").glob("*.yaml"))
    prosp = sorted((root / "prospective" / "site_configs").glob("*.yaml"))
    out = tmp_path / "eval"
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(pooled_run),
            "--sites",
            *map(str, retro + prosp),
            "--out",
            str(out),
            "--oracle",
            str(root / "oracle"),
            "--test",
            str(root / "test" / "site_configs"),
            "--min-expert-support",
            "0",  # the tiny cohort's experts are all below the default
        ],
    )
    assert result.exit_code == 0, result.output
    assert "validation (" in result.output and "model_estimate" in result.output
    assert "test (30 patients" in result.output
    assert "share of the oracle's gain" in result.output
    assert "3-year DFS by advice" in result.output
    report = read_evaluation(out)
    val, pro = report["validation"], report["prospective"]
    model, plan = load_checkpoint(pooled_run)
    compared = 0
    for block, paths in ((val, retro), (pro, prosp)):
        ys, ss = [], []
        for path in paths:
            cfg = load_site_config(path)
            if cfg.role == "train":
                _, dataset, _ = build_site_datasets(cfg, plan)
            else:
                from client.data.dataset import SiteDataset
                from client.data.site_data import list_cases

                cases = list_cases(cfg.dataset_dir, require_outcome=False)
                dataset = SiteDataset(cases, plan, adc_scale=cfg.adc_scale, train=False)
            for c in evaluate(model, dataset, device=torch.device("cpu")).cases:
                if not np.isnan(c.pcr):
                    ys.append(c.pcr)
                    ss.append(c.probs[c.regimen])
        assert block["n"] == len(ys)
        if len(set(ys)) == 2:
            # exact against scikit-learn on the scores as binned for counting;
            # against the raw scores, off by at most half the share of
            # responder/non-responder pairs whose scores share a bin (these are
            # ties after binning). A 1-epoch model's scores crowd into a few
            # bins; on the demo run's scores the two agree exactly.
            auc = block["overall"]["auc"]["auc"]
            y, sc = np.array(ys), np.array(ss)
            binned = np.minimum((sc * AUC_BINS).astype(int), AUC_BINS - 1)
            assert auc == pytest.approx(roc_auc_score(y, binned), abs=1e-12)
            same_bin = binned[y == 1][:, None] == binned[y == 0][None, :]
            assert abs(auc - roc_auc_score(y, sc)) <= 0.5 * same_bin.mean() + 1e-12
            compared += 1
        else:
            assert block["overall"]["auc"] is None
    assert compared >= 1
    assert set(val["sites"]) == {p.stem for p in retro}
    key = "sensitivity>=0.8"  # needs a responder in validation (tiny: maybe none)
    assert pro["thresholds"].get(key) == val["thresholds"].get(key)
    assert pro["threshold_chosen_on"] == (
        "validation" if key in val["thresholds"] else None
    )
    for block in (val, pro):
        pv = block["policy_value"]
        assert sum(pv["directions"].values()) == pv["n"] == block["n"]
        for k in ("ipw", "dr", "model_estimate", "observed"):
            lo, hi = pv[k]["ci"]
            assert lo <= pv[k]["value"] <= hi
        assert 0 <= pv["oracle"]["value"] <= 1
        assert block["overall"]["brier"] is not None
        assert len(block["decision_curve"]["model"]) == 99
    # the held-out test cohort: every case, scored at the validation threshold,
    # the oracle's fixed-regimen values equal to the oracle file's own means
    test = report["test"]
    assert test["n"] == 30 and test["threshold_chosen_on"] != "this cohort"
    assert test["thresholds"].get(key) == val["thresholds"].get(key)
    with (root / "oracle" / "potential_outcomes.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["cohort"] == "test"]
    truth = test["policy_value"]["oracle"]
    for r in ("nCRT", "TNT", "nCT"):
        expected = np.mean([float(row[f"p_{r}"]) for row in rows])
        assert truth["fixed"][r] == pytest.approx(expected, abs=1e-9)
    best = np.mean([max(float(row[f"p_{r}"]) for r in truth["fixed"]) for row in rows])
    assert truth["optimal"] == pytest.approx(best, abs=1e-9)
    share = truth["share_of_oracle_gain"]
    fixed = max(truth["fixed"].values())
    assert share["value"] == pytest.approx(
        (truth["value"] - fixed) / (truth["optimal"] - fixed)
    )
    assert share["ci"][0] <= share["value"] <= share["ci"][1]
    km = test["survival"]["kaplan_meier"]
    assert km["followed"]["n"] + km["not-followed"]["n"] == 30


def test_support_guard_follows_the_checkpoint(pooled_run: Path, tmp_path: Path) -> None:
    """The checkpoint records each expert's training patients; `moefl evaluate`
    never advises an expert below --min-expert-support and says why, and
    withholds advice when no expert has the support."""
    support = json.loads((pooled_run / "config.json").read_text())["expert_support"]
    m = read_training_record(pooled_run)
    assert sum(support.values()) == m["n_train"] and 0 < support["nCT"] < 10
    root = pooled_run.parent / "cohort"
    retro = sorted((root / "site_configs").glob("*.yaml"))

    def run(min_support: int) -> tuple[str, dict]:
        out = tmp_path / f"eval{min_support}"
        result = runner.invoke(
            app,
            [
                "evaluate",
                str(pooled_run),
                "--sites",
                *map(str, retro),
                "--out",
                str(out),
                "--min-expert-support",
                str(min_support),
            ],
        )
        assert result.exit_code == 0, result.output
        return result.output, read_evaluation(out)

    output, report = run(support["nCT"] + 1)
    assert report["rule"]["allowed"] == ["nCRT", "TNT"]
    assert (
        f"nCT is never recommended: its expert was trained on {support['nCT']}"
        in output
    )
    assert report["validation"]["policy_value"]["recommended"]["nCT"] == 0
    output, report = run(1000)
    assert report["rule"]["allowed"] == [] and "advice is withheld" in output
    pv = report["validation"]["policy_value"]
    assert pv["directions"]["maintain"] == pv["n"]  # everyone keeps their regimen


def _prospective_copy(tiny_cohort: Path, tmp_path: Path) -> Path:
    """A writable copy of the prospective cohort; returns west_china's YAML."""
    import shutil

    dst = tmp_path / "prospective"
    shutil.copytree(tiny_cohort / "prospective", dst)
    return dst / "site_configs" / "west_china.yaml"


def test_predict_site_scores_every_patient_as_predict_and_evaluate_do(
    pooled_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    """One row per patient; the one-patient form and `moefl evaluate`'s own
    scoring give the same numbers for the same patients."""
    import csv
    import hashlib

    import torch

    from client.data.dataset import SiteDataset
    from client.data.site_config import load_site_config
    from client.data.site_data import list_cases
    from client.scoring.evaluation import evaluate_dataset
    from client.scoring.predict import predict_case
    from client.scoring.predict_site import COLUMNS, predict_site

    yaml = _prospective_copy(tiny_cohort, tmp_path)
    config = load_site_config(yaml)
    cases = list_cases(config.dataset_dir, require_outcome=False)
    result = predict_site(
        pooled_run, yaml, tmp_path / "t.csv", masks=tmp_path / "m", min_expert_support=0
    )
    with open(tmp_path / "t.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS
    assert [r["case_id"] for r in table] == [c.case_id for c in cases]
    assert not result.skipped
    sha = hashlib.sha256((pooled_run / "model.safetensors").read_bytes()).hexdigest()
    assert {r["model_sha256"] for r in table} == {sha} == {result.sha256}
    for r in table:
        p = [float(r[f"p_{g}"]) for g in REGIMENS]
        assert all(0 < x < 1 for x in p) and r["recommended"] in REGIMENS
        assert r["direction"] in ("escalate", "maintain", "de-intensify")
        assert r["reason"].startswith(r["direction"]) and "within 0.05" in r["reason"]
        assert Path(r["mask_file"]).is_file() and float(r["tumour_volume_ml"]) >= 0

    # the support guard: experts below the threshold are never advised
    from shared_model.checkpoint import read_expert_support

    support = read_expert_support(pooled_run)
    assert support is not None
    cut = sorted(support.values())[1] + 1  # excludes the two least-supported
    guarded = predict_site(
        pooled_run, yaml, tmp_path / "g.csv", min_expert_support=cut
    ).rows
    allowed = {g for g, n in support.items() if n >= cut}
    for r in guarded:
        if allowed:
            assert r["recommended"] in allowed
        else:
            assert r["recommended"] == r["planned_regimen"]
            assert r["reason"].startswith("advice withheld")
        for flag in filter(None, r["flags"].split(";")):
            assert flag == "low-propensity" or flag.split(":")[1] not in allowed

    # the one-patient form, for the first two patients
    for case, row in zip(cases[:2], table[:2], strict=True):
        one = predict_case(
            pooled_run, t2=case.t2, adc=case.adc, clinical=case.clinical.features
        )
        # the table reads patches four at a time: the same up to float rounding
        for g in REGIMENS:
            assert abs(one.pcr_probability[g] - float(row[f"p_{g}"])) <= 1.01e-4
        assert round(one.tumour_volume_ml, 3) == float(row["tumour_volume_ml"])
        written = nib.load(row["mask_file"]).get_fdata()
        assert np.array_equal(written.astype(np.uint8), one.mask)

    # `moefl evaluate`'s scoring: the received regimen's probability per patient
    model, plan = load_checkpoint(pooled_run)
    dataset = SiteDataset(cases, plan, adc_scale=config.adc_scale, train=False)
    ev = evaluate_dataset(
        model,
        config.site_name,
        dataset,
        cases,
        cohort="prospective",
        device=torch.device("cpu"),
    )
    known = [r for r in table if not np.isnan(float(_pcr(cases, r["case_id"])))]
    from_table = [float(r[f"p_{r['planned_regimen']}"]) for r in known]
    assert len(known) == len(ev.local_scores) > 0
    assert np.allclose(ev.local_scores[:, 0], from_table, atol=5.01e-5)


def _pcr(cases: list, case_id: str) -> float:
    rec = next(c for c in cases if c.case_id == case_id).clinical
    return float("nan") if rec.pcr is None else float(rec.pcr)


def test_predict_site_names_a_broken_case_and_scores_the_others(
    pooled_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    import csv

    yaml = _prospective_copy(tiny_cohort, tmp_path)
    folder = next((tmp_path / "prospective" / "sites").glob("*WestChina"))
    adc = sorted((folder / "imagesTr").glob("*_0001.nii.gz"))[1]
    broken = adc.name.removesuffix("_0001.nii.gz")
    adc.write_bytes(adc.read_bytes()[:100])  # a truncated file
    table = folder / "clinical.csv"
    lines = table.read_text().splitlines()
    bad_row = lines[-1].split(",")[0]  # a clinical value outside its set
    lines[-1] = lines[-1].replace(",low,", ",lowish,").replace(",mid,", ",lowish,")
    lines[-1] = lines[-1].replace(",high,", ",lowish,")
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "t.csv"
    result = runner.invoke(
        app, ["predict", str(pooled_run), "--site", str(yaml), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert f"skipped {broken}: " in result.output and adc.name in result.output
    assert "sha256" in result.output
    with open(out, newline="") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    n_cases = len(list(folder.glob("imagesTr/*_0000*")))
    assert len(rows) == n_cases  # every case has its row, scored or not
    skipped = {c: r["skipped"] for c, r in rows.items() if r["skipped"]}
    assert sorted(skipped) == sorted([broken, bad_row])
    assert adc.name in skipped[broken] and rows[broken]["p_TNT"] == ""
    # the real reason: the clinical value, not "no row in clinical.csv"
    assert "lowish" in skipped[bad_row] and "no row" not in skipped[bad_row]
    assert all(
        r["p_TNT"] and not r["skipped"] for c, r in rows.items() if c not in skipped
    )
    # one form at a time
    both = runner.invoke(
        app, ["predict", str(pooled_run), "--site", str(yaml), "--t2w", str(adc)]
    )
    assert both.exit_code == 2 and "--site needs --out" in both.output


def test_pooled_training_fits_the_newton_head_and_its_rule(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    """`moefl train --head-fit newton`: the pooled comparator of a Newton
    federation, with its posterior and the rule chosen on validation."""
    from shared_model.checkpoint import load_checkpoint, load_rule

    out = tmp_path / "pooled_newton"
    yamls = [
        str(tiny_cohort / "site_configs" / f"{s}.yaml")
        for s in ("west_china", "sysucc")
    ]
    result = runner.invoke(
        app,
        ["train", "--sites", *yamls, "--out", str(out), "--epochs", "1"]
        + ["--base-filters", "4", "--max-filters", "16", "--head-fit", "newton"]
        + ["--no-image-only"],
    )
    assert result.exit_code == 0, result.output
    assert "Newton fit" in result.output
    rule = load_rule(out)
    assert rule is not None and rule.posterior is not None
    model, _ = load_checkpoint(out)
    assert model.is_glm
    assert np.allclose(model.glm_coefficients(), rule.posterior.mean, atol=1e-5)
