"""The synthetic cohort's tables: sizes, rates, confounding, signal, determinism."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from simulations.cohort import (
    NCT_SITE,
    PRESETS,
    RETROSPECTIVE_SITES,
    build_cohort,
    clinical_risk,
)
from simulations.synth import synthesize


@pytest.fixture(scope="module")
def paper_tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("paper") / "cohort"
    synthesize(out, preset="paper", seed=0, tables_only=True)
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_paper_counts_match_the_study(paper_tables: Path) -> None:
    s = json.loads((paper_tables / "cohort.json").read_text())
    assert s["n_retrospective"] == 760 and s["n_prospective"] == 95
    by = s["retrospective_by_regimen"]
    assert {r: v["n"] for r, v in by.items()} == {"nCRT": 414, "TNT": 258, "nCT": 88}
    for regimen, target in (("nCRT", 0.19), ("TNT", 0.30), ("nCT", 0.20)):
        assert abs(by[regimen]["pcr_rate"] - target) <= 0.02


def test_paper_tables_on_disk_agree_with_summary(paper_tables: Path) -> None:
    rows = []
    assert len(list((paper_tables / "sites").glob("Dataset*"))) == len(
        RETROSPECTIVE_SITES
    )
    for table in sorted((paper_tables / "sites").glob("*/clinical.csv")):
        rows += _rows(table)
    assert len(rows) == 760
    assert len({r["case_id"] for r in rows}) == 760
    n_ct = [r for r in rows if r["regimen"] == "nCT"]
    assert len(n_ct) == 88 and all(r["case_id"].startswith("WCH_") for r in n_ct)
    # tables-only: no images, no site YAML
    assert not list((paper_tables / "sites").glob("*/imagesTr"))
    prosp = []
    for table in sorted(
        (paper_tables / "prospective" / "sites").glob("*/clinical.csv")
    ):
        prosp += _rows(table)
    assert len(prosp) == 95
    assert any(r["case_id"].startswith("YNC_") for r in prosp)


def test_oracle_is_kept_apart_and_consistent(paper_tables: Path) -> None:
    oracle = _rows(paper_tables / "oracle" / "potential_outcomes.csv")
    assert len(oracle) == 855
    by_id = {r["case_id"]: r for r in oracle}
    for table in (paper_tables / "sites").glob("*/clinical.csv"):
        for row in _rows(table):
            o = by_id[row["case_id"]]
            assert o["received"] == row["regimen"]
            assert int(row["pCR"]) == int(o[f"pCR_{row['regimen']}"])
            for r in ("nCRT", "TNT", "nCT"):
                assert 0.0 < float(o[f"p_{r}"]) < 1.0
    # nothing in a site folder refers to the oracle
    for path in (paper_tables / "sites").rglob("*"):
        if path.is_file():
            assert "oracle" not in path.read_text(errors="ignore")


def test_signal_matches_the_study(paper_tables: Path) -> None:
    aucs = json.loads((paper_tables / "cohort.json").read_text())["aucs"]
    assert 0.58 <= aucs["clinical_logreg_auc_cv"] <= 0.68
    assert aucs["oracle_auc"] >= 0.85


def test_clinical_mix_in_larc_ranges(paper_tables: Path) -> None:
    prev = json.loads((paper_tables / "cohort.json").read_text())["clinical_prevalence"]
    assert 0.62 <= prev["cT=T3"] <= 0.78
    assert 0.13 <= prev["cT=T4"] <= 0.27
    assert 0.55 <= 1 - prev["cN=N0"] <= 0.82
    assert 0.22 <= prev["EMVI=1"] <= 0.47
    assert 0.22 <= prev["CRM=1"] <= 0.42
    assert 0.08 <= prev["LLN=1"] <= 0.22
    assert 0.33 <= prev["location=low"] <= 0.47


def test_regimen_choice_is_confounded_by_risk() -> None:
    retro, _, _ = build_cohort(PRESETS["paper"], 0)
    risk = {
        r: np.mean([clinical_risk(p.clinical) for p in retro if p.regimen == r])
        for r in ("nCRT", "TNT", "nCT")
    }
    assert risk["nCT"] < risk["nCRT"] < risk["TNT"]
    assert {p.site for p in retro if p.regimen == "nCT"} == {NCT_SITE}


def test_regimen_effects_follow_the_documented_model() -> None:
    retro, _, _ = build_cohort(PRESETS["paper"], 0)
    prob = np.stack([p.prob for p in retro])
    risk = np.array([p.risk for p in retro])
    high, low = risk >= np.quantile(risk, 0.75), risk <= np.quantile(risk, 0.25)
    gain_tnt = prob[:, 1] - prob[:, 0]
    assert gain_tnt[high].mean() > gain_tnt[low].mean()  # TNT helps high risk most
    ratio_nct = prob[:, 2] / prob[:, 0]
    assert ratio_nct[low].mean() > 1.5 * ratio_nct[high].mean()  # nCT: low risk only
    assert (prob[high, 2] < prob[high, 0]).mean() > 0.95


def test_tables_are_deterministic(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        synthesize(out, preset="demo", seed=seed, tables_only=True)
    files = ["oracle/potential_outcomes.csv", "sites/Dataset101_WestChina/clinical.csv"]
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()
        assert (a / f).read_bytes() != (c / f).read_bytes()


def test_refuses_to_overwrite_foreign_files(tmp_path: Path) -> None:
    from shared_model.errors import MoeflError

    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(MoeflError, match="not empty"):
        synthesize(tmp_path, preset="tiny", tables_only=True)
    with pytest.raises(MoeflError, match="did not write"):
        synthesize(tmp_path, preset="tiny", tables_only=True, force=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
