from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared_model.clinical import (
    CLINICAL_DIM,
    CLINICAL_FEATURES,
    ONE_HOT_NAMES,
    REGIMENS,
    encode_clinical,
    parse_clinical_row,
    parse_dfs,
)
from shared_model.errors import DataError

patients = st.fixed_dictionaries(
    {k: st.sampled_from(v) for k, v in CLINICAL_FEATURES.items()}
)


def test_dimension_is_fifteen() -> None:
    assert CLINICAL_DIM == 15
    assert len(ONE_HOT_NAMES) == 15
    assert REGIMENS == ("nCRT", "TNT", "nCT")


@given(patients)
def test_one_hot_has_one_value_per_variable_and_round_trips(
    features: dict[str, str],
) -> None:
    vec = encode_clinical(features)
    assert vec.dtype == np.float32 and vec.shape == (15,)
    assert vec.sum() == len(CLINICAL_FEATURES)
    decoded = {}
    for name, value in zip(ONE_HOT_NAMES, vec, strict=True):
        if value == 1.0:
            column, level = name.split("=")
            assert column not in decoded
            decoded[column] = level
    assert decoded == features


@given(patients, patients)
def test_encoding_is_injective(a: dict[str, str], b: dict[str, str]) -> None:
    assert (encode_clinical(a) == encode_clinical(b)).all() == (a == b)


def test_values_are_case_sensitive() -> None:
    with pytest.raises(DataError, match=r"`cT` has value 't3'.*T2.*T3.*T4"):
        encode_clinical(
            {
                "cT": "t3",
                "cN": "N0",
                "EMVI": "0",
                "CRM": "0",
                "LLN": "0",
                "location": "low",
            }
        )


def _row(**over: str) -> dict[str, str]:
    row = {
        "case_id": "A_1",
        "cT": "T3",
        "cN": "N1",
        "EMVI": "0",
        "CRM": "1",
        "LLN": "0",
        "location": "mid",
        "regimen": "TNT",
        "pCR": "1",
    }
    row.update(over)
    return row


def test_parse_row() -> None:
    rec = parse_clinical_row(_row())
    assert rec.case_id == "A_1" and rec.regimen_index == 1 and rec.pcr == 1
    assert rec.dfs_months is None and rec.dfs_event is None
    assert parse_clinical_row(_row(pCR="")).pcr is None


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"regimen": "ncrt"}, "`regimen` is 'ncrt'"),
        ({"pCR": "yes"}, "`pCR` is 'yes'"),
        ({"case_id": " "}, "`case_id` is empty"),
        ({"location": "distal"}, "`location` has value 'distal'"),
    ],
)
def test_parse_row_errors_name_the_column(over: dict[str, str], match: str) -> None:
    with pytest.raises(DataError, match=match):
        parse_clinical_row(_row(**over), where="clinical.csv:7")


@pytest.mark.parametrize(
    ("months", "event", "expect"),
    [
        ("", "", (None, None)),
        (None, None, (None, None)),
        ("0", "1", (0.0, 1)),
        (" 37.5 ", "0", (37.5, 0)),
        ("130", "1", (130.0, 1)),
    ],
)
def test_parse_dfs_valid(
    months: str | None, event: str | None, expect: tuple[float | None, int | None]
) -> None:
    assert parse_dfs(
        {"dfs_months": months, "dfs_event": event}, case_id="WCH_R0001"
    ) == (*expect, None)


@pytest.mark.parametrize(
    ("months", "event", "expect"),
    [
        ("abc", "1", "`dfs_months` is 'abc'; expected a number of months >= 0"),
        ("-0.5", "0", "`dfs_months` is '-0.5'; expected a number of months >= 0"),
        ("nan", "0", "`dfs_months` is 'nan'"),
        ("inf", "0", "`dfs_months` is 'inf'"),
        ("12", "2", "`dfs_event` is '2'; expected 0 (censored) or 1"),
        ("12", "yes", "`dfs_event` is 'yes'"),
        ("12", "", "`dfs_event` is empty but `dfs_months` is '12'"),
        ("", "1", "`dfs_months` is empty but `dfs_event` is '1'"),
    ],
)
def test_parse_dfs_problems_name_case_column_and_value(
    months: str, event: str, expect: str
) -> None:
    got_months, got_event, problem = parse_dfs(
        {"dfs_months": months, "dfs_event": event}, case_id="WCH_R0001"
    )
    assert got_months is None and got_event is None
    assert problem is not None and problem.startswith("case WCH_R0001: ")
    assert expect in problem


def test_parse_dfs_reports_both_bad_cells() -> None:
    _, _, problem = parse_dfs({"dfs_months": "x", "dfs_event": "2"}, case_id="C")
    assert problem is not None
    assert "`dfs_months` is 'x'" in problem and "`dfs_event` is '2'" in problem
