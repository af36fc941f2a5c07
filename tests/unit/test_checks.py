"""The preflight check: clean sites pass, each corruption gets its own finding."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client.checks.preflight import run_check

SITE = "west_china"
DATASET = "sites/Dataset101_WestChina"
CASE = "WCH_R0003"


def _yaml(root: Path, site: str = SITE) -> Path:
    return root / "site_configs" / f"{site}.yaml"


def test_every_generated_site_passes(tiny_cohort: Path) -> None:
    yamls = sorted(tiny_cohort.rglob("site_configs/*.yaml"))
    assert len(yamls) == 10  # 3 retrospective, 3 prospective, 4 test sites
    for path in yamls:
        report = run_check(path)
        assert report.ok, [f.message for f in report.errors]
        assert report.summary["usable_cases"] >= 4


def _snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(root))] = (digest, st.st_mtime_ns, st.st_mode)
    return out


def test_check_leaves_site_data_byte_identical(tiny_copy: Path) -> None:
    site_dir = tiny_copy / DATASET
    (site_dir / "labelsTr" / f"{CASE}.nii.gz").write_bytes(
        b"broken"
    )  # a failing site too
    before = _snapshot(tiny_copy)
    report = run_check(_yaml(tiny_copy))
    assert not report.ok
    assert _snapshot(tiny_copy) == before


def test_summary_carries_no_identifiers(tiny_cohort: Path) -> None:
    report = run_check(_yaml(tiny_cohort))
    text = json.dumps(report.summary)
    assert "WCH_" not in text
    assert report.summary["by_regimen"]["nCT"]["n"] == 4


# --- corruptions -----------------------------------------------------------------


def _img(root: Path, name: str) -> Path:
    folder = "labelsTr" if not name.endswith(("_0000", "_0001")) else "imagesTr"
    return root / DATASET / folder / f"{name}.nii.gz"


def _rewrite(
    path: Path, fn: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
) -> None:
    img = nib.load(str(path))
    data, affine = fn(np.asarray(img.dataobj), img.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _edit_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def c_yaml_unknown_key(root: Path) -> None:
    _edit_text(_yaml(root), "role: train", "role: train\nbatchsize: 2")


def c_yaml_missing_key(root: Path) -> None:
    _edit_text(_yaml(root), "dataset_dir:", "# dataset_dir:")


def c_yaml_bad_path(root: Path) -> None:
    _edit_text(_yaml(root), "Dataset101_WestChina", "Dataset999_Missing")


def c_dataset_json(root: Path) -> None:
    _edit_text(root / DATASET / "dataset.json", '"1": "ADC"', '"1": "DWI"')


def c_missing_channel(root: Path) -> None:
    _img(root, f"{CASE}_0001").unlink()


def c_missing_label(root: Path) -> None:
    _img(root, CASE).unlink()


def c_truncated(root: Path) -> None:
    p = _img(root, f"{CASE}_0000")
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def c_not_gzip(root: Path) -> None:
    _img(root, f"{CASE}_0000").write_bytes(b"this is not an image")


def c_four_d(root: Path) -> None:
    _rewrite(_img(root, f"{CASE}_0001"), lambda d, a: (np.stack([d, d], -1), a))


def c_two_d(root: Path) -> None:
    _rewrite(_img(root, f"{CASE}_0000"), lambda d, a: (d[:, :, 0], a))


def c_grid_shape(root: Path) -> None:
    _rewrite(_img(root, f"{CASE}_0001"), lambda d, a: (d[:-2], a))


def c_grid_affine(root: Path) -> None:
    def shift(d: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a[:3, 3] += 4.0
        return d, a

    _rewrite(_img(root, CASE), shift)


def c_nan(root: Path) -> None:
    def nan(d: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = d.astype(np.float32)
        d[3, 3, 3] = np.nan
        return d, a

    _rewrite(_img(root, f"{CASE}_0001"), nan)


def c_label_values(root: Path) -> None:
    _rewrite(_img(root, CASE), lambda d, a: (d * 2, a))


def c_empty_mask(root: Path) -> None:
    _rewrite(_img(root, CASE), lambda d, a: (np.zeros_like(d), a))


def c_adc_unit(root: Path) -> None:
    _edit_text(_yaml(root), 'adc_unit: "1e-3"', 'adc_unit: "1e-6"')


def c_clinical_column(root: Path) -> None:
    _edit_text(root / DATASET / "clinical.csv", ",EMVI,", ",emvi,")


def c_clinical_value(root: Path) -> None:
    p = root / DATASET / "clinical.csv"
    lines = p.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(CASE))
    lines[i] = (
        lines[i]
        .replace(",T3,", ",T3a,")
        .replace(",T4,", ",T3a,")
        .replace(",T2,", ",T3a,")
    )
    p.write_text("\n".join(lines) + "\n")


def c_clinical_duplicate(root: Path) -> None:
    p = root / DATASET / "clinical.csv"
    lines = p.read_text().splitlines()
    p.write_text("\n".join([*lines, lines[3]]) + "\n")


def c_missing_outcome(root: Path) -> None:
    p = root / DATASET / "clinical.csv"
    lines = p.read_text().splitlines()
    col = lines[0].split(",").index("pCR")  # optional DFS columns may follow it
    i = next(i for i, line in enumerate(lines) if line.startswith(CASE))
    cells = lines[i].split(",")
    cells[col] = ""
    lines[i] = ",".join(cells)
    p.write_text("\n".join(lines) + "\n")


def c_case_not_in_table(root: Path) -> None:
    p = root / DATASET / "clinical.csv"
    p.write_text(
        "\n".join(x for x in p.read_text().splitlines() if not x.startswith(CASE))
        + "\n"
    )


def c_case_without_images(root: Path) -> None:
    for p in (_img(root, f"{CASE}_0000"), _img(root, f"{CASE}_0001"), _img(root, CASE)):
        p.unlink()


def c_too_few(root: Path) -> None:
    _edit_text(_yaml(root), "min_cases: 4", "min_cases: 40")


def c_yaml_syntax(root: Path) -> None:
    _edit_text(_yaml(root), "role: train", "role: [train")


def c_dataset_json_invalid(root: Path) -> None:
    (root / DATASET / "dataset.json").write_text("{not json")


def c_privacy_delta(root: Path) -> None:
    path = _yaml(root)
    path.write_text(
        path.read_text()
        + "privacy:\n  target_epsilon: 8.0\n  delta: 0.2\n  max_grad_norm: 1.0\n"
    )


def c_complex(root: Path) -> None:
    _rewrite(
        _img(root, f"{CASE}_0000"), lambda d, a: (d.astype(np.complex64) * (1 + 1j), a)
    )


def _outside(root: Path) -> Path:
    """A copy of the case's T2W image outside the dataset folder."""
    elsewhere = root / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    target = elsewhere / f"{CASE}_0000.nii.gz"
    target.write_bytes(_img(root, f"{CASE}_0000").read_bytes())
    return target


def c_outside_link(root: Path) -> None:
    target = _outside(root)
    link = _img(root, f"{CASE}_0000")
    link.unlink()
    link.symlink_to(target)


def c_dangling_link(root: Path) -> None:
    link = _img(root, f"{CASE}_0001")
    link.unlink()
    link.symlink_to(root / "gone" / "adc.nii.gz")


CORRUPTIONS = [
    # (corruption, finding code, text that `where` must contain)
    (c_yaml_unknown_key, "yaml", "batchsize"),
    (c_yaml_missing_key, "yaml", "dataset_dir"),
    (c_yaml_bad_path, "yaml", "dataset_dir"),
    (c_yaml_syntax, "yaml", "(syntax)"),
    (c_dataset_json, "dataset-json-field", "dataset.json:channel_names"),
    (c_dataset_json_invalid, "dataset-json-invalid", "dataset.json"),
    (c_missing_channel, "channel-missing", f"{CASE}_0001"),
    (c_missing_label, "label-missing", CASE),
    (c_truncated, "unreadable", f"{CASE}_0000.nii.gz"),
    (c_not_gzip, "unreadable", f"{CASE}_0000.nii.gz"),
    (c_four_d, "dims", f"{CASE}_0001.nii.gz"),
    (c_two_d, "dims", f"{CASE}_0000.nii.gz"),
    (c_grid_shape, "grid-mismatch", f"{CASE}_0001.nii.gz"),
    (c_grid_affine, "grid-mismatch", f"labelsTr/{CASE}.nii.gz"),
    (c_nan, "non-finite", f"{CASE}_0001.nii.gz"),
    (c_label_values, "label-values", f"labelsTr/{CASE}.nii.gz"),
    (c_empty_mask, "label-empty", f"labelsTr/{CASE}.nii.gz"),
    (c_adc_unit, "adc-unit", "_0001.nii.gz"),
    (c_clinical_column, "clinical-columns", "clinical.csv"),
    (c_clinical_value, "clinical-value", "clinical.csv:"),
    (c_clinical_duplicate, "clinical-duplicate", "clinical.csv:"),
    (c_missing_outcome, "clinical-no-outcome", "clinical.csv:"),
    (c_case_not_in_table, "case-not-in-table", CASE),
    (c_case_without_images, "case-without-images", CASE),
    (c_too_few, "too-few-cases", "Dataset101_WestChina"),
    (c_privacy_delta, "privacy-delta", "privacy.delta"),
    (c_complex, "dtype", f"{CASE}_0000.nii.gz"),
    (c_outside_link, "outside-dataset", f"{CASE}_0000.nii.gz"),
    (c_dangling_link, "dangling-link", f"{CASE}_0001.nii.gz"),
]


@pytest.mark.parametrize(
    ("corrupt", "code", "where"),
    CORRUPTIONS,
    ids=[c[0].__name__[2:] for c in CORRUPTIONS],
)
def test_corruption_gets_its_own_finding(
    tiny_copy: Path, corrupt: Callable[[Path], None], code: str, where: str
) -> None:
    corrupt(tiny_copy)
    report = run_check(_yaml(tiny_copy))
    assert not report.ok
    matching = [f for f in report.errors if f.code == code and where in f.where]
    assert matching, [(f.code, f.where) for f in report.findings]
    f = matching[0]
    assert f.message and f.fix


def test_corruption_codes_are_distinct_enough() -> None:
    assert len({code for _, code, _ in CORRUPTIONS}) >= 12


def test_a_broken_case_does_not_hide_others(tiny_copy: Path) -> None:
    c_truncated(tiny_copy)
    other = "WCH_R0005"
    _rewrite(_img(tiny_copy, f"{other}_0001"), lambda d, a: (d[:-1], a))
    report = run_check(_yaml(tiny_copy))
    codes = {(f.code, f.where.split("/")[-1]) for f in report.errors}
    assert ("unreadable", f"{CASE}_0000.nii.gz") in codes
    assert ("grid-mismatch", f"{other}_0001.nii.gz") in codes
    assert report.summary["usable_cases"] == 11


def test_warnings_do_not_fail_the_check(tiny_copy: Path) -> None:
    def sagittal(d: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a[:3, :3] = a[:3, [2, 1, 0]] * np.array([1, 1, 1])
        return d, a

    for name in (f"{CASE}_0000", f"{CASE}_0001", CASE):
        _rewrite(_img(tiny_copy, name), sagittal)
    report = run_check(_yaml(tiny_copy))
    assert report.ok
    assert "orientation-unusual" in {f.code for f in report.warnings}


def test_thick_slices_are_a_warning_naming_the_file(tiny_copy: Path) -> None:
    def thick(d: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a[:3, 2] *= 3.0
        return d, a

    for name in (f"{CASE}_0000", f"{CASE}_0001", CASE):
        _rewrite(_img(tiny_copy, name), thick)
    report = run_check(_yaml(tiny_copy))
    assert report.ok
    spacing = [f for f in report.warnings if f.code == "spacing-unusual"]
    assert spacing and f"{CASE}_0000.nii.gz" in spacing[0].where
    assert "9.00 mm" in spacing[0].message


@pytest.mark.parametrize(
    "corrupt", [c_outside_link, c_dangling_link, c_clinical_value, c_complex]
)
def test_a_refused_case_is_named_once_with_the_real_reason(
    tiny_copy: Path, corrupt: Callable[[Path], None]
) -> None:
    """No second, false finding beside the real one ("no T2W image" for a
    link, "no row in clinical.csv" for a bad value)."""
    corrupt(tiny_copy)
    report = run_check(_yaml(tiny_copy))
    about = [f for f in report.errors if CASE in f.where or f.case == CASE]
    assert len(about) == 1, [(f.code, f.where, f.message) for f in about]
    assert CASE not in report.usable_cases and CASE in report.cases_seen


def test_a_named_image_root_admits_files_outside_the_dataset(tiny_copy: Path) -> None:
    c_outside_link(tiny_copy)
    path = _yaml(tiny_copy)
    path.write_text(path.read_text() + f"image_roots: [{tiny_copy / 'elsewhere'}]\n")
    report = run_check(path)
    assert report.ok and CASE in report.usable_cases


def test_training_refuses_a_link_out_of_the_dataset(tiny_copy: Path) -> None:
    """The loader a site trains and scores with refuses it too, not only
    ``moefl check``."""
    from client.data.site_data import list_cases
    from shared_model.errors import DataError

    c_outside_link(tiny_copy)
    with pytest.raises(DataError, match="outside the dataset folder"):
        list_cases(tiny_copy / DATASET, require_outcome=True)
    cases = list_cases(
        tiny_copy / DATASET,
        require_outcome=True,
        image_roots=[tiny_copy / "elsewhere"],
    )
    assert CASE in {c.case_id for c in cases}
