"""Reading a site's ``clinical.csv``: one record per case, every row
validated, every problem collected (the optional disease-free survival
columns only ever warn). :mod:`client.data.site_data` reads the rest of the
site folder."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from client.problem import Problem
from shared_model.clinical import (
    CLINICAL_COLUMNS,
    DFS_COLUMNS,
    ClinicalRecord,
    parse_clinical_row,
    parse_dfs,
)
from shared_model.errors import DataError


def read_clinical_table(
    path: Path, *, require_outcome: bool
) -> tuple[dict[str, ClinicalRecord], list[Problem]]:
    """Read ``clinical.csv`` and validate every row; collect all problems.

    The optional disease-free survival columns (:data:`DFS_COLUMNS`) are read
    when both are present. A bad DFS value is only a warning: the record keeps
    ``dfs_months``/``dfs_event`` of ``None`` and the case stays usable.

    Args:
        path: the table.
        require_outcome: training sites need ``pCR`` for every case.
    """
    rel = path.name
    problems: list[Problem] = []
    records: dict[str, ClinicalRecord] = {}
    if not path.is_file():
        return records, [
            Problem(
                "clinical-missing",
                rel,
                "clinical.csv is missing",
                f"write one row per case with columns {list(CLINICAL_COLUMNS)}",
            )
        ]
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in CLINICAL_COLUMNS if c not in header]
            if missing:
                return records, [
                    Problem(
                        "clinical-columns",
                        rel,
                        f"columns {missing} are missing (found {header})",
                        f"use exactly these column names: {list(CLINICAL_COLUMNS)}",
                    )
                ]
            has_dfs = _check_optional_columns(header, rel, problems)
            _read_rows(
                enumerate(reader, start=2),
                rel,
                has_dfs=has_dfs,
                require_outcome=require_outcome,
                records=records,
                problems=problems,
            )
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        problems.append(
            Problem(
                "clinical-unreadable",
                rel,
                f"cannot read the table ({e})",
                "save it as UTF-8 CSV with a header row",
            )
        )
    return records, problems


def _check_optional_columns(
    header: Sequence[str], rel: str, problems: list[Problem]
) -> bool:
    """Whether both DFS columns are present; warnings for a lone DFS column
    and for columns moefl does not use."""
    has_dfs, dfs_problem = _dfs_header(header, rel)
    if dfs_problem is not None:
        problems.append(dfs_problem)
    known = (*CLINICAL_COLUMNS, *DFS_COLUMNS)
    extra = [c for c in header if c not in known]
    if extra:
        problems.append(
            Problem(
                "clinical-extra-columns",
                rel,
                f"columns {extra} are not used",
                "remove them, or keep them knowing moefl ignores them",
                "warning",
            )
        )
    return has_dfs


def _read_rows(
    rows: Iterable[tuple[int, dict[str, str]]],
    rel: str,
    *,
    has_dfs: bool,
    require_outcome: bool,
    records: dict[str, ClinicalRecord],
    problems: list[Problem],
) -> None:
    """Parse each ``(line, row)`` into ``records``; a bad value or a repeated
    case is a problem and the row is skipped."""
    seen_rows: dict[str, int] = {}
    for line, row in rows:
        where = f"{rel}:{line}"
        try:
            record = parse_clinical_row(row)
        except DataError as e:
            problems.append(
                Problem(
                    "clinical-value",
                    where,
                    str(e),
                    "correct the value (allowed values: site_configs/README.md)",
                    case=(row.get("case_id") or "").strip() or None,
                )
            )
            continue
        if record.case_id in seen_rows:
            problems.append(
                Problem(
                    "clinical-duplicate",
                    where,
                    f"case {record.case_id} appears again (first on line "
                    f"{seen_rows[record.case_id]})",
                    "keep one row per case",
                )
            )
            continue
        seen_rows[record.case_id] = line
        if has_dfs:
            record, problem = _with_dfs(record, row, where)
            if problem is not None:
                problems.append(problem)
        if require_outcome and record.pcr is None:
            problems.append(
                Problem(
                    "clinical-no-outcome",
                    where,
                    f"case {record.case_id} has an empty pCR; a training site needs the "
                    "outcome of every case",
                    "fill pCR (0/1) or move the case to an evaluate-role site",
                )
            )
        records[record.case_id] = record


def _dfs_header(header: Sequence[str], rel: str) -> tuple[bool, Problem | None]:
    """Whether the table carries both DFS columns; a warning when only one."""
    present = [c for c in DFS_COLUMNS if c in header]
    if len(present) == len(DFS_COLUMNS):
        return True, None
    if not present:
        return False, None
    missing = [c for c in DFS_COLUMNS if c not in header]
    return False, Problem(
        "clinical-dfs-columns",
        rel,
        f"column `{present[0]}` is present but `{missing[0]}` is missing; "
        "disease-free survival is ignored for every case",
        f"add the `{missing[0]}` column (see site_configs/README.md), or remove "
        f"`{present[0]}`",
        "warning",
    )


def _with_dfs(
    record: ClinicalRecord, row: Mapping[str, str | None], where: str
) -> tuple[ClinicalRecord, Problem | None]:
    """The record with its DFS cells parsed; a bad value is a warning only, the
    case stays usable for training and is left out of survival analysis."""
    months, event, message = parse_dfs(row, case_id=record.case_id)
    if message is not None:
        return record, Problem(
            "clinical-dfs",
            where,
            message,
            "correct the value or leave both `dfs_months` and `dfs_event` empty; "
            "until then the case is used for training but left out of survival "
            "analysis",
            "warning",
        )
    return replace(record, dfs_months=months, dfs_event=event), None
