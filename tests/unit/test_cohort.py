"""The synthetic cohort's tables: sizes, rates, confounding, signal, determinism."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from shared_model.policy_value import share_of_oracle_gain
from simulations.cohort import build_cohort
from simulations.response import TARGET_PCR, clinical_risk
from simulations.sites import NCT_SITE, PRESETS, RETROSPECTIVE_SITES, held_out_counts
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
    assert s["n_test"] == 1000
    by = s["retrospective_by_regimen"]
    assert {r: v["n"] for r, v in by.items()} == {"nCRT": 414, "TNT": 258, "nCT": 88}


@pytest.fixture(scope="module")
def paper_boards(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    boards = []
    for seed in range(5):
        out = tmp_path_factory.mktemp(f"seed{seed}") / "cohort"
        synthesize(out, preset="paper", seed=seed, tables_only=True)
        boards.append(json.loads((out / "cohort.json").read_text())["scoreboard"])
    return boards


@pytest.mark.parametrize("cohort", ["retrospective", "test"])
def test_world_rewards_reading_the_images_on_seeds_0_to_4(
    paper_boards: list[dict], cohort: str
) -> None:
    """The targets of the world: no regimen best for everyone, a gain worth
    having, the clinical table alone captures little of it and a perfect read
    of the biomarker most of it; AUC ceilings in the study's ranges."""
    for board in paper_boards:
        c = board[cohort]
        assert max(c["best_regimen_share"].values()) <= 0.80
        assert c["oracle_gain_over_best_fixed"] >= 0.03
        assert c["share_of_oracle_gain"]["clinical_optimal"] <= 0.40
        assert c["share_of_oracle_gain"]["biomarker_optimal"] >= 0.70
        assert 0.58 <= c["auc_ceiling"]["clinical_bayes"] <= 0.68
        assert c["auc_ceiling"]["oracle"] >= 0.85
        fixed = max(c["policy_value"][f"all_{r}"] for r in ("nCRT", "TNT", "nCT"))
        assert c["share_of_oracle_gain"]["oracle_with_margin"] == pytest.approx(
            share_of_oracle_gain(
                c["policy_value"]["oracle_with_margin"],
                fixed,
                c["policy_value"]["oracle"],
            ),
            abs=0.01,  # values are stored rounded to 4 decimals
        )


def test_trial_sized_effects_and_receiver_rates(paper_boards: list[dict]) -> None:
    for board in paper_boards:
        e = board["regimen_effects"]
        assert 2.0 <= e["tnt_vs_ncrt_odds_ratio_average_risk"] <= 3.0
        assert abs(e["nct_pcr_low_risk"] - e["ncrt_pcr_low_risk"]) <= 0.06
        assert e["nct_pcr_high_risk"] < 0.5 * e["ncrt_pcr_high_risk"]
    # receivers' expected pCR rates, averaged over seeds (one seed's nCT arm of
    # 88 patients varies by about 3 points): within 3 points of the study's
    for regimen, target in TARGET_PCR.items():
        rates = [
            b["retrospective"]["receivers"][regimen]["expected_pcr_rate"]
            for b in paper_boards
        ]
        assert abs(np.mean(rates) - target) <= 0.03, (regimen, rates)


def test_test_cohort_sizes_and_sites() -> None:
    for n in (0, 30, 400, 1000, 37):
        counts = held_out_counts(n)
        assert sum(sum(v.values()) for v in counts.values()) == n
    counts = held_out_counts(1000)
    assert set(counts) == {"west_china", "sysucc", "sah_sysu", "yunnan"}
    assert [s for s, v in counts.items() if "nCT" in v] == ["west_china"]
    small = build_cohort(PRESETS["tiny"], 2, test_size=5)
    large = build_cohort(PRESETS["tiny"], 2, test_size=50)
    assert len(small.test) == 5 and len(large.test) == 50
    # the test cohort is drawn last: its size changes nothing else
    assert [p.case_id for p in small.retrospective] == [
        p.case_id for p in large.retrospective
    ]
    assert np.array_equal(
        np.stack([p.prob for p in small.prospective]),
        np.stack([p.prob for p in large.prospective]),
    )


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
    assert len(oracle) == 855 + 1000
    by_id = {r["case_id"]: r for r in oracle}
    for table in (paper_tables / "sites").glob("*/clinical.csv"):
        for row in _rows(table):
            o = by_id[row["case_id"]]
            assert o["received"] == row["regimen"]
            assert int(row["pCR"]) == int(o[f"pCR_{row['regimen']}"])
            assert row["dfs_months"] == o[f"dfs_months_{row['regimen']}"]
            assert row["dfs_event"] == o[f"dfs_event_{row['regimen']}"]
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
    retro = build_cohort(PRESETS["paper"], 0).retrospective
    risk = {
        r: np.mean([clinical_risk(p.clinical) for p in retro if p.regimen == r])
        for r in ("nCRT", "TNT", "nCT")
    }
    assert risk["nCT"] < risk["nCRT"] < risk["TNT"]
    assert {p.site for p in retro if p.regimen == "nCT"} == {NCT_SITE}


def test_regimen_effects_follow_the_documented_model() -> None:
    world = build_cohort(PRESETS["paper"], 0)
    patients = world.retrospective + world.test
    prob = np.stack([p.prob for p in patients])
    risk = np.array([p.risk for p in patients])
    hyp = np.array([p.hypoxia for p in patients])
    high, low = risk >= np.quantile(risk, 0.75), risk <= np.quantile(risk, 0.25)
    ratio_nct = prob[:, 2] / prob[:, 0]
    assert ratio_nct[low].mean() > 1.5 * ratio_nct[high].mean()  # nCT: low risk
    # the predictive biomarker: hypoxia turns the best regimen from TNT to nCT
    best = prob.argmax(1)
    assert (best[hyp > 1] == 2).mean() > 0.5
    assert (best[hyp < -0.5] == 1).mean() > 0.85
    # and it acts through radiation: nCRT and TNT fall with it, nCT rises
    slopes = [
        np.polyfit(hyp, np.log(prob[:, j] / (1 - prob[:, j])), 1)[0] for j in range(3)
    ]
    assert slopes[0] < 0 and slopes[1] < 0 and slopes[2] > 0


def test_dfs_follows_the_literature(paper_tables: Path) -> None:
    dfs = json.loads((paper_tables / "cohort.json").read_text())["dfs"]
    for cohort in ("retrospective", "test"):
        after, without = (
            dfs[cohort]["dfs_3y_after_pcr"],
            dfs[cohort]["dfs_3y_without_pcr"],
        )
        assert 0.80 <= after["value"] <= 0.95, after
        assert 0.60 <= without["value"] <= 0.78, without


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
