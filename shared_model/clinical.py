"""Clinical table schema and the fixed one-hot encoding shared by every site.

The column set and the allowed values are fixed by the site data format
(``clinical.csv``), so every hospital encodes a patient identically and the
expert MLPs see the same 15 inputs everywhere. Values are case-sensitive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from shared_model.errors import DataError

REGIMENS: tuple[str, ...] = ("nCRT", "TNT", "nCT")
"""Regimens in model order: expert index 0, 1, 2."""

REGIMEN_INTENSITY: dict[str, int] = {"nCT": 0, "nCRT": 1, "TNT": 2}
"""Treatment intensity order used by recommendations: nCT < nCRT < TNT."""

CLINICAL_FEATURES: dict[str, tuple[str, ...]] = {
    "cT": ("T2", "T3", "T4"),
    "cN": ("N0", "N1", "N2"),
    "EMVI": ("0", "1"),
    "CRM": ("0", "1"),
    "LLN": ("0", "1"),
    "location": ("low", "mid", "high"),
}
"""Clinical variables fed to the experts, in one-hot order (3+3+2+2+2+3 = 15)."""

CLINICAL_COLUMNS: tuple[str, ...] = ("case_id", *CLINICAL_FEATURES, "regimen", "pCR")
"""Exact column names of ``clinical.csv``."""

DFS_COLUMNS: tuple[str, ...] = ("dfs_months", "dfs_event")
"""Optional columns of ``clinical.csv`` for disease-free survival analysis.

``dfs_months`` is the time from the start of neoadjuvant treatment to local or
distant recurrence or death (``dfs_event`` = 1), or to the last follow-up
without either (``dfs_event`` = 0). Both are filled or both left empty; a case
without them is still used for training, only not for survival analysis.
"""

CLINICAL_DIM: int = sum(len(v) for v in CLINICAL_FEATURES.values())

ONE_HOT_NAMES: tuple[str, ...] = tuple(
    f"{column}={value}"
    for column, values in CLINICAL_FEATURES.items()
    for value in values
)


@dataclass(frozen=True)
class ClinicalRecord:
    """One validated row of ``clinical.csv``.

    Attributes:
        case_id: the case identifier, the prefix of the case's image files.
        features: clinical variable -> value, exactly the keys of
            :data:`CLINICAL_FEATURES`.
        regimen: one of :data:`REGIMENS`.
        pcr: 1 or 0, or ``None`` when the outcome is unknown (inference only).
        dfs_months: disease-free survival time in months, or ``None`` when the
            table has no (valid) DFS for the case; see :data:`DFS_COLUMNS`.
        dfs_event: 1 for recurrence or death, 0 for censored, or ``None``.
    """

    case_id: str
    features: Mapping[str, str]
    regimen: str
    pcr: int | None
    dfs_months: float | None = None
    dfs_event: int | None = None

    @property
    def regimen_index(self) -> int:
        return REGIMENS.index(self.regimen)


def encode_clinical(features: Mapping[str, str]) -> np.ndarray:
    """One-hot encode the clinical variables of one patient.

    Args:
        features: clinical variable name -> value (strings as in ``clinical.csv``).

    Returns:
        float32 array of shape ``(15,)`` in :data:`ONE_HOT_NAMES` order.

    Raises:
        DataError: a variable is missing or has a value outside its allowed set.
    """
    out = np.zeros(CLINICAL_DIM, dtype=np.float32)
    offset = 0
    for column, allowed in CLINICAL_FEATURES.items():
        if column not in features:
            raise DataError(f"clinical variable `{column}` is missing")
        value = str(features[column])
        if value not in allowed:
            raise DataError(
                f"clinical variable `{column}` has value {value!r}; "
                f"expected one of {list(allowed)} (case-sensitive)"
            )
        out[offset + allowed.index(value)] = 1.0
        offset += len(allowed)
    return out


def parse_clinical_row(row: Mapping[str, str], *, where: str = "") -> ClinicalRecord:
    """Validate one ``clinical.csv`` row and return a typed record.

    Args:
        row: column -> raw string value, as read by ``csv.DictReader``.
        where: a location prefix for error messages (file and line).

    Raises:
        DataError: a column is missing or a value is not allowed; the message
            names the column, the value, the allowed values and ``where``.
    """
    prefix = f"{where}: " if where else ""
    for column in CLINICAL_COLUMNS:
        if column not in row or row[column] is None:
            raise DataError(f"{prefix}column `{column}` is missing")
    case_id = row["case_id"].strip()
    if not case_id:
        raise DataError(f"{prefix}`case_id` is empty; every row needs its case id")
    features = {column: row[column].strip() for column in CLINICAL_FEATURES}
    try:
        encode_clinical(features)
    except DataError as e:
        raise DataError(f"{prefix}case {case_id}: {e}") from e
    regimen = row["regimen"].strip()
    if regimen not in REGIMENS:
        raise DataError(
            f"{prefix}case {case_id}: `regimen` is {regimen!r}; "
            f"expected one of {list(REGIMENS)} (case-sensitive)"
        )
    raw_pcr = row["pCR"].strip()
    if raw_pcr == "":
        pcr = None
    elif raw_pcr in ("0", "1"):
        pcr = int(raw_pcr)
    else:
        raise DataError(
            f"{prefix}case {case_id}: `pCR` is {raw_pcr!r}; expected 0, 1 or empty "
            "(empty = outcome unknown)"
        )
    return ClinicalRecord(case_id=case_id, features=features, regimen=regimen, pcr=pcr)


def parse_dfs(
    row: Mapping[str, str | None], *, case_id: str
) -> tuple[float | None, int | None, str | None]:
    """Read the optional disease-free survival cells of one ``clinical.csv`` row.

    A bad value is returned as a message rather than raised: DFS is only used
    for survival analysis, so the caller keeps the case for training and drops
    just its DFS.

    Args:
        row: column -> raw string value (a missing cell may be ``None``).
        case_id: the row's case, named in the message.

    Returns:
        ``(months, event, problem)``: ``(None, None, None)`` when both cells are
        empty; the parsed values and ``None`` when both are valid; otherwise
        ``(None, None, message)``, the message naming the case, the column and
        the value.
    """
    raw_months = (row.get("dfs_months") or "").strip()
    raw_event = (row.get("dfs_event") or "").strip()
    if not raw_months and not raw_event:
        return None, None, None
    if not raw_months or not raw_event:
        if raw_months:
            empty, filled, value = "dfs_event", "dfs_months", raw_months
        else:
            empty, filled, value = "dfs_months", "dfs_event", raw_event
        return (
            None,
            None,
            f"case {case_id}: `{empty}` is empty but `{filled}` is {value!r}; "
            "expected both filled or both empty",
        )
    issues = []
    try:
        months = float(raw_months)
    except ValueError:
        months = float("nan")
    if not np.isfinite(months) or months < 0:
        issues.append(
            f"`dfs_months` is {raw_months!r}; expected a number of months >= 0"
        )
    if raw_event not in ("0", "1"):
        issues.append(
            f"`dfs_event` is {raw_event!r}; expected 0 (censored) or 1 "
            "(recurrence or death)"
        )
    if issues:
        return None, None, f"case {case_id}: " + "; ".join(issues)
    return months, int(raw_event), None
