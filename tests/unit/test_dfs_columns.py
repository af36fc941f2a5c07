"""Optional disease-free survival columns of clinical.csv: read, or warned about."""

from __future__ import annotations

import csv
from pathlib import Path

from client.checks.preflight import run_check
from client.data.clinical_table import read_clinical_table
from client.data.site_data import list_cases
from shared_model.clinical import CLINICAL_COLUMNS

DATASET = "sites/Dataset101_WestChina"
YAML = "site_configs/west_china.yaml"


def _add_dfs(
    root: Path, cells: dict[str, tuple[str, str]], header: str = "dfs_months,dfs_event"
) -> None:
    """Rewrite clinical.csv with the required columns plus the DFS ``header``
    (whatever DFS columns the synthetic cohort wrote are dropped first);
    ``cells`` maps case -> (months, event), other cases get empty cells."""
    path = root / DATASET / "clinical.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    dfs = header.split(",")
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CLINICAL_COLUMNS, *dfs])
        for row in rows:
            values = cells.get(row["case_id"], ("", ""))[: len(dfs)]
            writer.writerow([*(row[c] for c in CLINICAL_COLUMNS), *values])


def _case_ids(root: Path) -> list[str]:
    with (root / DATASET / "clinical.csv").open(newline="") as f:
        return [row["case_id"] for row in csv.DictReader(f)]


def test_valid_dfs_columns_pass_and_reach_the_records(tiny_copy: Path) -> None:
    clean = run_check(tiny_copy / YAML)
    ids = _case_ids(tiny_copy)
    cells = {ids[0]: ("0", "1"), ids[1]: ("37.5", "0"), ids[2]: (" 12 ", "1")}
    _add_dfs(tiny_copy, cells)  # every other case: both cells empty

    report = run_check(tiny_copy / YAML)
    assert report.ok, [f.message for f in report.errors]
    codes = {f.code for f in report.findings}
    assert not {c for c in codes if c.startswith("clinical-dfs")}
    assert "clinical-extra-columns" not in codes
    assert report.summary["usable_cases"] == clean.summary["usable_cases"]

    records, problems = read_clinical_table(
        tiny_copy / DATASET / "clinical.csv", require_outcome=True
    )
    assert problems == []
    assert (records[ids[0]].dfs_months, records[ids[0]].dfs_event) == (0.0, 1)
    assert (records[ids[1]].dfs_months, records[ids[1]].dfs_event) == (37.5, 0)
    assert (records[ids[2]].dfs_months, records[ids[2]].dfs_event) == (12.0, 1)
    assert (records[ids[3]].dfs_months, records[ids[3]].dfs_event) == (None, None)
    by_case = {
        c.case_id: c.clinical
        for c in list_cases(tiny_copy / DATASET, require_outcome=True)
    }
    assert by_case[ids[1]].dfs_months == 37.5


def test_bad_dfs_values_are_warnings_naming_case_and_column(tiny_copy: Path) -> None:
    clean = run_check(tiny_copy / YAML)
    ids = _case_ids(tiny_copy)
    bad = {
        ids[0]: (("abc", "1"), "`dfs_months` is 'abc'"),
        ids[1]: (("-3", "0"), "`dfs_months` is '-3'"),
        ids[2]: (("24", "2"), "`dfs_event` is '2'"),
        ids[3]: (("18", ""), "`dfs_event` is empty but `dfs_months` is '18'"),
    }
    good = ids[4]
    _add_dfs(tiny_copy, {c: v for c, (v, _) in bad.items()} | {good: ("40", "0")})

    report = run_check(tiny_copy / YAML)
    assert report.ok, [f.message for f in report.errors]
    dfs = [f for f in report.findings if f.code == "clinical-dfs"]
    assert len(dfs) == len(bad)
    for case, (_, text) in bad.items():
        (finding,) = [f for f in dfs if f"case {case}:" in f.message]
        assert finding.severity == "warning"
        assert text in finding.message
        assert finding.where.startswith("clinical.csv:")
        assert "survival analysis" in finding.fix and "empty" in finding.fix
    assert report.summary["usable_cases"] == clean.summary["usable_cases"]

    records, _ = read_clinical_table(
        tiny_copy / DATASET / "clinical.csv", require_outcome=True
    )
    assert set(records) == set(ids)
    for case in bad:
        assert (records[case].dfs_months, records[case].dfs_event) == (None, None)
    assert (records[good].dfs_months, records[good].dfs_event) == (40.0, 0)
    assert len(list_cases(tiny_copy / DATASET, require_outcome=True)) == len(ids)


def test_one_dfs_column_alone_is_a_warning_naming_the_other(tiny_copy: Path) -> None:
    ids = _case_ids(tiny_copy)
    _add_dfs(tiny_copy, {ids[0]: ("12", "1")}, header="dfs_months")

    report = run_check(tiny_copy / YAML)
    assert report.ok, [f.message for f in report.errors]
    (finding,) = [f for f in report.findings if f.code.startswith("clinical-")]
    assert finding.code == "clinical-dfs-columns" and finding.severity == "warning"
    assert "`dfs_event` is missing" in finding.message
    records, _ = read_clinical_table(
        tiny_copy / DATASET / "clinical.csv", require_outcome=True
    )
    assert records[ids[0]].dfs_months is None
