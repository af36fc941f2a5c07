"""Preflight check of a site before it joins a federation (``moefl check``).

One pass finds every problem and explains each: the site YAML, dataset.json,
the files of every case (readable, 3-D, channels on one grid, finite values,
mask values and non-empty masks, ADC unit, spacing and orientation), the
clinical table and the match between table and images. The check only reads:
it never writes into, moves or deletes site data. Its summary carries counts
and rates only, no patient identifiers.
"""

from __future__ import annotations

import gzip
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from client.dp_preflight import CANNOT_LEARN
from client.site_config import SiteConfig, parse_site_yaml
from client.site_data import (
    Problem,
    read_clinical_table,
    read_dataset_json,
    scan_dataset,
    segmentation_records,
)
from shared_model.clinical import REGIMENS
from shared_model.federation_config import FederationConfig

# Tolerances and plausible ranges (see site_configs/README.md).
AFFINE_ATOL_MM = 1e-2  # origin difference allowed between channels
DIRECTION_ATOL = 1e-3  # direction-cosine difference allowed between channels
T2_INPLANE_MM = (0.2, 3.0)  # outside: warning (synthetic demo cohorts reach ~2 mm)
SLICE_MM = (1.0, 6.0)
MAX_VOXELS = 64 * 1024 * 1024  # per volume; a 1024 x 1024 x 64 export is 64 Mi
MAX_OBLIQUE_DEG = 35.0
ADC_P99_RANGE_1E3 = (0.8, 6.0)  # 99th percentile of ADC in 10^-3 mm^2/s
MIN_PER_REGIMEN_WARN = 5


@dataclass(frozen=True)
class Finding:
    """One finding of the check, as shown to the site."""

    severity: str  # "error" | "warning"
    code: str
    where: str
    message: str
    fix: str


@dataclass
class CheckReport:
    """Everything the check found, plus identifier-free summaries."""

    yaml: str
    site: str | None = None
    role: str | None = None
    findings: list[Finding] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, problem: Problem) -> None:
        self.findings.append(
            Finding(
                problem.severity,
                problem.code,
                problem.where,
                problem.message,
                problem.fix,
            )
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "yaml": self.yaml,
            "site": self.site,
            "role": self.role,
            "ok": self.ok,
            "n_errors": len(self.errors),
            "n_warnings": len(self.warnings),
            "findings": [asdict(f) for f in self.findings],
            "summary": self.summary,
        }


def load_volume(path: Path, rel: str) -> tuple[nib.Nifti1Image, np.ndarray] | Problem:
    """Load a NIfTI fully (a truncated file fails here, not at training time)."""
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            return Problem(
                "unreadable", rel, "not a NIfTI image", "convert it to NIfTI (.nii.gz)"
            )
        voxels = int(np.prod([int(n) for n in img.shape], dtype=np.int64))
        if voxels > MAX_VOXELS:
            return Problem(
                "too-large",
                rel,
                f"the header claims {'x'.join(str(n) for n in img.shape)} = "
                f"{voxels:,} voxels, above the {MAX_VOXELS:,} a rectal MRI volume "
                "needs; the file is not read",
                "check the export (a corrupt header, or a 4-D series saved as one "
                "volume); re-export the 3-D T2W or ADC volume",
            )
        data = np.asanyarray(img.dataobj)
    except (
        OSError,
        EOFError,
        ValueError,
        zlib.error,
        gzip.BadGzipFile,
        nib.filebasedimages.ImageFileError,
    ) as e:
        return Problem(
            "unreadable",
            rel,
            f"cannot read the NIfTI file ({e})",
            "re-export the file from the scanner or PACS",
        )
    return img, data


def _dims_problem(data: np.ndarray, rel: str) -> Problem | None:
    if data.ndim == 3:
        return None
    return Problem(
        "dims",
        rel,
        f"image is {data.ndim}-D with shape {data.shape}; expected a 3-D volume",
        "export one 3-D volume per file (split 4-D series, e.g. one b-value "
        "or the ADC map only; 2-D slices must be stacked)",
    )


def _orientation_findings(img: nib.Nifti1Image, rel: str) -> list[Problem]:
    out = []
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    inplane, slice_mm = min(zooms[:2]), zooms[2]
    if not T2_INPLANE_MM[0] <= inplane <= T2_INPLANE_MM[1]:
        out.append(
            Problem(
                "spacing-unusual",
                rel,
                f"in-plane spacing {inplane:.2f} mm is unusual for rectal T2W "
                f"(expected {T2_INPLANE_MM[0]}-{T2_INPLANE_MM[1]} mm)",
                "check the export; resampled or 2-D exports lose detail",
                "warning",
            )
        )
    if not SLICE_MM[0] <= slice_mm <= SLICE_MM[1]:
        out.append(
            Problem(
                "spacing-unusual",
                rel,
                f"slice spacing {slice_mm:.2f} mm is unusual (expected "
                f"{SLICE_MM[0]}-{SLICE_MM[1]} mm)",
                "check that the third axis is the slice axis",
                "warning",
            )
        )
    direction = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
    slice_axis = direction[:, 2]
    tilt = float(np.degrees(np.arccos(min(1.0, abs(slice_axis[2])))))
    if tilt > MAX_OBLIQUE_DEG:
        out.append(
            Problem(
                "orientation-unusual",
                rel,
                f"slice normal is {tilt:.0f} deg from the inferior-superior axis; "
                "expected an axial or axial-oblique stack",
                "export the axial (oblique) T2W series, not sagittal or coronal",
                "warning",
            )
        )
    return out


def grid_problem(
    ref: nib.Nifti1Image, other: nib.Nifti1Image, ref_rel: str, rel: str, what: str
) -> Problem | None:
    if ref.shape[:3] != other.shape[:3]:
        return Problem(
            "grid-mismatch",
            rel,
            f"{what} has shape {other.shape[:3]} but the T2W image {ref_rel} has "
            f"{ref.shape[:3]}; all channels and the label must share one grid",
            "resample it onto the T2W grid (e.g. with the T2W image as reference)",
        )
    a, b = ref.affine, other.affine
    dir_a = a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)
    dir_b = b[:3, :3] / np.linalg.norm(b[:3, :3], axis=0)
    spacing_ok = np.allclose(
        np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0), rtol=1e-3
    )
    if (
        not spacing_ok
        or not np.allclose(dir_a, dir_b, atol=DIRECTION_ATOL)
        or not np.allclose(a[:3, 3], b[:3, 3], atol=AFFINE_ATOL_MM)
    ):
        shift = float(np.linalg.norm(a[:3, 3] - b[:3, 3]))
        return Problem(
            "grid-mismatch",
            rel,
            f"{what} has the same shape but a different affine than {ref_rel} "
            f"(origin differs by {shift:.2f} mm); the voxels do not line up",
            "resample it onto the T2W grid and keep the T2W header",
        )
    return None


def _check_case(
    case_id: str,
    channels: dict[int, Path],
    label: Path | None,
    config: SiteConfig,
    dataset_dir: Path,
    report: CheckReport,
    stats: dict[str, list[float]],
) -> bool:
    """Check one case's files; return True when the case is usable."""
    usable = True

    def rel(p: Path) -> str:
        return str(p.relative_to(dataset_dir))

    for ch, name in ((0, "T2W"), (1, "ADC")):
        if ch not in channels:
            report.add(
                Problem(
                    "channel-missing",
                    f"imagesTr/{case_id}_{ch:04d}",
                    f"case {case_id} has no {name} image (channel {ch:04d})",
                    f"add imagesTr/{case_id}_{ch:04d}.nii.gz or remove the case "
                    "from clinical.csv",
                )
            )
            usable = False
    for ch, p in channels.items():
        if ch not in (0, 1):
            report.add(
                Problem(
                    "channel-unexpected",
                    rel(p),
                    f"channel {ch:04d} is not part of this dataset (T2 and ADC only)",
                    "remove it or move it out of imagesTr",
                )
            )
            usable = False
    if label is None and config.role in ("train", "public"):
        report.add(
            Problem(
                "label-missing",
                f"labelsTr/{case_id}",
                f"case {case_id} has no tumour mask",
                f"add labelsTr/{case_id}"
                ".nii.gz or set role: evaluate for an unlabelled cohort",
            )
        )
        usable = False
    if not usable:
        return False

    t2_loaded = load_volume(channels[0], rel(channels[0]))
    if isinstance(t2_loaded, Problem):
        report.add(t2_loaded)
        usable = False
    loaded: list[tuple[Path, str, nib.Nifti1Image, np.ndarray]] = []
    for path, what in ((channels[1], "ADC"), (label, "label")):
        if path is None:
            continue
        result = load_volume(path, rel(path))
        if isinstance(result, Problem):
            report.add(result)
            usable = False
        else:
            loaded.append((path, what, *result))
    if isinstance(t2_loaded, Problem):
        return False
    t2_img, t2 = t2_loaded
    if (dims := _dims_problem(t2, rel(channels[0]))) is not None:
        report.add(dims)
        return False
    for path, _what, _img, data in loaded:
        if (dims := _dims_problem(data, rel(path))) is not None:
            report.add(dims)
            usable = False
    if not usable:
        return False

    for f in _orientation_findings(t2_img, rel(channels[0])):
        report.add(f)
    zooms = [float(z) for z in t2_img.header.get_zooms()[:3]]
    stats["inplane"].append(min(zooms[:2]))
    stats["slice"].append(zooms[2])

    t2f = np.asarray(t2, dtype=np.float64)
    if not np.isfinite(t2f).all():
        report.add(
            Problem(
                "non-finite",
                rel(channels[0]),
                f"{int((~np.isfinite(t2f)).sum())} voxels are NaN or infinite",
                "re-export the image; NaN usually marks a failed conversion",
            )
        )
        usable = False
    elif float(t2f.std()) == 0.0:
        report.add(
            Problem(
                "blank-image",
                rel(channels[0]),
                "the T2W image is constant",
                "re-export the image; it holds no signal",
            )
        )
        usable = False

    for path, what, img, data in loaded:
        grid = grid_problem(t2_img, img, rel(channels[0]), rel(path), what)
        if grid is not None:
            report.add(grid)
            usable = False
            continue
        values = np.asarray(data, dtype=np.float64)
        if not np.isfinite(values).all():
            report.add(
                Problem(
                    "non-finite",
                    rel(path),
                    f"{int((~np.isfinite(values)).sum())} voxels are NaN or infinite",
                    "re-export the image; NaN usually marks a failed conversion",
                )
            )
            usable = False
            continue
        if what == "ADC":
            usable &= _check_adc(values, rel(path), config, report, stats)
        else:
            usable &= _check_label(
                values, rel(path), case_id, config, report, zooms, stats
            )
    return usable


def adc_unit_problem(
    values: np.ndarray, adc_unit: str, rel: str, *, setting: str = "site YAML"
) -> Problem | None:
    """The ADC map's values against its declared unit ("1e-3" or "1e-6").

    The 99th percentile of the positive values, in 10^-3 mm^2/s, must lie in
    the range of an ADC map; otherwise the unit (or the map) is wrong, and the
    finding says which unit the values suggest. ``setting`` names where the
    unit is set (the site YAML's ``adc_unit``, or ``moefl predict --adc-unit``).
    """
    positive = values[values > 0]
    if positive.size == 0:
        return Problem(
            "blank-image",
            rel,
            "the ADC map has no positive values",
            "export the ADC map (not a raw DWI b0 image)",
        )
    p99 = float(np.percentile(positive, 99)) * (1.0 if adc_unit == "1e-3" else 1e-3)
    lo, hi = ADC_P99_RANGE_1E3
    if lo <= p99 <= hi:
        return None
    guess = "1e-6" if p99 > hi * 100 else "1e-3" if p99 < lo / 100 else None
    where = "adc_unit in the site YAML" if setting == "site YAML" else setting
    fix = (
        f'set {where} to "{guess}"'
        if guess and guess != adc_unit
        else "check that this is an ADC map in mm^2/s"
    )
    return Problem(
        "adc-unit",
        rel,
        f"ADC values look wrong for adc_unit {adc_unit}: the 99th percentile is "
        f"{p99:.3g} x 10^-3 mm^2/s, expected {lo}-{hi}",
        fix,
    )


def _check_adc(
    values: np.ndarray,
    rel: str,
    config: SiteConfig,
    report: CheckReport,
    stats: dict[str, list[float]],
) -> bool:
    problem = adc_unit_problem(values, config.adc_unit, rel)
    if problem is not None:
        report.add(problem)
        return False
    p99 = float(np.percentile(values[values > 0], 99)) * config.adc_scale
    if float(values.min()) < 0:
        report.add(
            Problem(
                "adc-negative",
                rel,
                "the ADC map has negative values",
                "they are clipped to 0 when loading; check the export",
                "warning",
            )
        )
    stats["adc_p99"].append(p99)
    return True


def _check_label(
    values: np.ndarray,
    rel: str,
    case_id: str,
    config: SiteConfig,
    report: CheckReport,
    zooms: list[float],
    stats: dict[str, list[float]],
) -> bool:
    uniq = np.unique(values)
    bad = [float(v) for v in uniq if v not in (0.0, 1.0)]
    if bad:
        report.add(
            Problem(
                "label-values",
                rel,
                f"mask values {bad[:5]} are outside {{0, 1}}",
                "store the tumour as 1 and everything else as 0 (merge other "
                "labels, round interpolated masks)",
            )
        )
        return False
    n = int((values > 0).sum())
    if n == 0:
        if config.role in ("train", "public"):
            report.add(
                Problem(
                    "label-empty",
                    rel,
                    f"the tumour mask of case {case_id} is empty",
                    "delineate the tumour or remove the case from training",
                )
            )
            return False
        report.add(
            Problem(
                "label-empty",
                rel,
                f"the tumour mask of case {case_id} is empty",
                "Dice cannot be computed for this case",
                "warning",
            )
        )
        return True
    stats["tumour_ml"].append(n * float(np.prod(zooms)) / 1000.0)
    return True


def run_check(yaml_path: Path, fed: FederationConfig | None = None) -> CheckReport:
    """Check a site end to end and return every finding.

    ``fed``: the federation the site is to join (default: the run config's
    defaults); with a ``privacy`` section, the DP feasibility for it
    (:mod:`client.dp_preflight`). The check reads only; it never creates,
    changes or deletes a file.
    """
    report = CheckReport(yaml=str(yaml_path))
    config, yaml_problems = parse_site_yaml(Path(yaml_path))
    for p in yaml_problems:
        report.findings.append(
            Finding("error", "yaml", f"{yaml_path}:{p.key}", p.message, p.fix)
        )
    if config is None:
        return report
    report.site, report.role = config.site_name, config.role
    dataset_dir = config.dataset_dir

    meta, meta_problems = read_dataset_json(dataset_dir)
    for problem in meta_problems:
        report.add(problem)
    ending = (
        str(meta.get("file_ending"))
        if meta and meta.get("file_ending") in (".nii.gz", ".nii")
        else ".nii.gz"
    )
    labelled = config.role in ("train", "public")
    for folder in ("imagesTr",) + (("labelsTr",) if labelled else ()):
        if not (dataset_dir / folder).is_dir():
            report.add(
                Problem(
                    "folder-missing",
                    folder,
                    f"{folder}/ is missing",
                    f"create {folder}/ in the nnU-Net raw layout",
                )
            )
    scan = scan_dataset(dataset_dir, ending)
    for stray in scan.stray:
        report.add(
            Problem(
                "stray-file",
                str(stray.relative_to(dataset_dir)),
                f"file name does not follow <case>_XXXX{ending} / <case>{ending}",
                "rename or move it; moefl ignores it",
                "warning",
            )
        )

    if config.role == "public":  # a public segmentation dataset: no clinical.csv
        records = segmentation_records(scan.channels)
        table_problems: list[Problem] = []
    else:
        records, table_problems = read_clinical_table(
            dataset_dir / "clinical.csv", require_outcome=config.role == "train"
        )
    for problem in table_problems:
        report.add(problem)

    image_ids = set(scan.channels) | set(scan.labels)
    for case_id in sorted(image_ids - set(records)):
        if records or not table_problems:
            report.add(
                Problem(
                    "case-not-in-table",
                    f"imagesTr/{case_id}",
                    f"case {case_id} has images but no row in clinical.csv",
                    "add its clinical row or remove its files",
                )
            )
    for case_id in sorted(set(records) - image_ids):
        report.add(
            Problem(
                "case-without-images",
                f"clinical.csv:{case_id}",
                f"case {case_id} is in clinical.csv but has no images",
                f"add imagesTr/{case_id}_0000{ending} and _0001{ending}, "
                "or remove the row",
            )
        )
    if (
        meta
        and isinstance(meta.get("numTraining"), int)
        and meta["numTraining"] != len(scan.channels)
    ):
        report.add(
            Problem(
                "dataset-json-count",
                "dataset.json:numTraining",
                f"numTraining is {meta['numTraining']} but imagesTr holds "
                f"{len(scan.channels)} cases",
                "set numTraining to the case count",
                "warning",
            )
        )

    stats: dict[str, list[float]] = {
        "inplane": [],
        "slice": [],
        "adc_p99": [],
        "tumour_ml": [],
    }
    usable = []
    for case_id in sorted(set(scan.channels) & set(records)):
        if _check_case(
            case_id,
            scan.channels[case_id],
            scan.labels.get(case_id),
            config,
            dataset_dir,
            report,
            stats,
        ):
            usable.append(records[case_id])

    if len(usable) < config.min_cases:
        report.add(
            Problem(
                "too-few-cases",
                str(dataset_dir.name),
                f"{len(usable)} usable cases; this site requires at least "
                f"{config.min_cases} (min_cases)",
                "fix the cases reported above or add cases; lower min_cases only "
                "if the federation agrees",
            )
        )
    by_regimen = Counter(r.regimen for r in usable)
    if config.role == "train":
        for regimen in REGIMENS:
            if 0 < by_regimen[regimen] < MIN_PER_REGIMEN_WARN:
                report.add(
                    Problem(
                        "regimen-small",
                        "clinical.csv:regimen",
                        f"only {by_regimen[regimen]} usable {regimen} cases; that "
                        "expert learns little from this site",
                        "expected with small cohorts; no action needed",
                        "warning",
                    )
                )
        n_train = len(usable) - round(len(usable) * config.val_fraction)
        privacy = config.privacy
        if privacy is not None and n_train > 0 and privacy.delta >= 1.0 / n_train:
            report.add(
                Problem(
                    "privacy-delta",
                    "site YAML: privacy.delta",
                    f"privacy.delta = {privacy.delta:g} is not below 1/N = 1/{n_train} "
                    "(about N training patients after the validation split): a "
                    "delta that large permits releasing a whole patient",
                    f"set privacy.delta well below {1.0 / n_train:.2g} (1e-5 is usual)",
                )
            )
        if usable and len({r.pcr for r in usable}) < 2:
            report.add(
                Problem(
                    "single-outcome",
                    "clinical.csv:pCR",
                    "every usable case has the same pCR value; AUC cannot be "
                    "computed at this site",
                    "check the pCR column",
                    "warning",
                )
            )
    report.summary = _summary(usable, stats)
    if config.role == "public":  # placeholder records: no clinical summary
        report.summary["by_regimen"] = {}
    if config.privacy is not None and config.role == "train":
        n_train = len(usable) - round(len(usable) * config.val_fraction)
        _check_dp(report, config, n_train, fed or FederationConfig())
    report.findings = _merge_repeated_warnings(report.findings)
    return report


def _check_dp(
    report: CheckReport, config: SiteConfig, n_train: int, fed: FederationConfig
) -> None:
    """The DP feasibility for ``fed``, as summary lines and warnings."""
    from client.dp_preflight import describe_feasibility, dp_feasibility

    f = dp_feasibility(config, n_train, fed)
    report.summary["privacy"] = {
        **f.to_dict(),
        "lines": describe_feasibility(f, config),
    }
    where = "site YAML: privacy"
    if f.mode == "refused":
        report.add(
            Problem(
                "privacy-refused", where, f"the site refuses this federation: {f.reason}",
                "the coordinator gives run config `backbone` (moefl pretrain) or "
                '`training = "joint"`',
                "warning",
            )
        )  # fmt: skip
    elif f.noise_multiplier is None:
        report.add(
            Problem(
                "privacy-declines", where, f"the site would decline: {f.reason}",
                "fewer rounds or steps, or a larger budget if the site agrees",
                "warning",
            )
        )  # fmt: skip
    elif f.cannot_learn:
        report.add(
            Problem(
                "privacy-cannot-learn", where,
                f"under this budget the noise outweighs the signal over the whole "
                f"run ({f.noise_to_signal_run:.2g} > {CANNOT_LEARN:g}): training "
                "cannot learn",
                "ask for the linear head over a public backbone (run config "
                '`backbone` and `head-type = "linear"`), fewer rounds or a larger '
                "budget",
                "warning",
            )
        )  # fmt: skip
    if config.privacy is not None and config.privacy.release_evaluation:
        report.add(
            Problem(
                "privacy-evaluation-not-dp", where,
                "privacy.release_evaluation is true: the validation counts this "
                "site sends each evaluation round are NOT differentially private",
                "set it to false to withhold them, unless the site accepts that",
                "warning",
            )
        )  # fmt: skip


def _merge_repeated_warnings(findings: list[Finding]) -> list[Finding]:
    """Fold warnings that repeat word for word across files into one finding.

    Errors stay one per file, since each names what to repair.
    """
    groups: dict[tuple[str, str], list[Finding]] = {}
    for f in findings:
        if f.severity == "warning":
            groups.setdefault((f.code, f.message), []).append(f)
    out = []
    for f in findings:
        if f.severity != "warning":
            out.append(f)
            continue
        group = groups.get((f.code, f.message))
        if not group:
            continue
        if len(group) > 1:
            f = Finding(
                f.severity,
                f.code,
                f"{group[0].where} and {len(group) - 1} more",
                f.message,
                f.fix,
            )
        out.append(f)
        groups[(f.code, f.message)] = []
    return out


def _summary(usable: list, stats: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"usable_cases": len(usable), "by_regimen": {}}
    for regimen in REGIMENS:
        group = [r for r in usable if r.regimen == regimen]
        if group:
            known = [r.pcr for r in group if r.pcr is not None]
            out["by_regimen"][regimen] = {
                "n": len(group),
                "pcr_rate": round(float(np.mean(known)), 3) if known else None,
            }
    for key, name in (
        ("inplane", "t2w_inplane_mm"),
        ("slice", "t2w_slice_mm"),
        ("adc_p99", "adc_p99_1e-3"),
        ("tumour_ml", "tumour_ml"),
    ):
        if stats[key]:
            out[name] = {
                "median": round(float(np.median(stats[key])), 3),
                "min": round(float(np.min(stats[key])), 3),
                "max": round(float(np.max(stats[key])), 3),
            }
    return out


def format_report(report: CheckReport) -> str:
    """Human-readable report: one block per finding, then the summary."""
    lines = [f"moefl check {report.yaml}"]
    if report.site:
        lines.append(f"site {report.site} (role {report.role})")
    for f in report.findings:
        lines.append(f"{f.severity.upper():7s} [{f.code}] {f.where}: {f.message}")
        lines.append(f"        fix: {f.fix}")
    s = report.summary
    if s:
        lines.append(f"usable cases: {s.get('usable_cases')}")
        by_regimen: dict[str, dict[str, float | None]] = s.get("by_regimen", {})
        for regimen, v in by_regimen.items():
            rate = "unknown" if v["pcr_rate"] is None else f"{v['pcr_rate']:.0%}"
            lines.append(f"  {regimen}: {v['n']} cases, pCR {rate}")
        lines.extend(s.get("privacy", {}).get("lines", []))
    verdict = "PASSED" if report.ok else "FAILED"
    lines.append(
        f"{verdict}: {len(report.errors)} errors, {len(report.warnings)} warnings"
    )
    return "\n".join(lines)
