"""Preflight check of a site before it joins a federation (``moefl check``).

One pass finds every problem and explains each: the site YAML, dataset.json,
the files of every case (readable, 3-D, channels on one grid, finite values,
mask values and non-empty masks, ADC unit, spacing and orientation), the
clinical table and the match between table and images. The check only reads:
it never writes into, moves or deletes site data. Its summary carries counts
and rates only, no patient identifiers.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from client.checks.case_checks import check_case
from client.checks.dp_feasibility import CANNOT_LEARN
from client.data.clinical_table import read_clinical_table
from client.data.site_config import SiteConfig, parse_site_yaml
from client.data.site_data import (
    DatasetScan,
    read_dataset_json,
    scan_dataset,
    segmentation_records,
)
from client.problem import CheckReport, Problem
from shared_model.clinical import REGIMENS
from shared_model.federation_config import FederationConfig

MIN_PER_REGIMEN_WARN = 5


def run_check(yaml_path: Path, fed: FederationConfig | None = None) -> CheckReport:
    """Check a site end to end and return every finding.

    ``fed``: the federation the site is to join (default: the run config's
    defaults); with a ``privacy`` section, the DP feasibility for it
    (:mod:`client.checks.dp_feasibility`). The check reads only; it never creates,
    changes or deletes a file.
    """
    report = CheckReport(yaml=str(yaml_path))
    config, yaml_problems = parse_site_yaml(Path(yaml_path))
    for p in yaml_problems:
        report.findings.append(replace(p, where=f"{yaml_path}:{p.where}"))
    if config is None:
        return report
    report.site, report.role = config.site_name, config.role
    scan, records, ending = _check_layout(report, config)
    stats: dict[str, list[float]] = {
        "inplane": [],
        "slice": [],
        "adc_p99": [],
        "tumour_ml": [],
    }
    usable = [
        records[case_id]
        for case_id in sorted(set(scan.channels) & set(records))
        if not scan.refused_case(case_id)
        and check_case(
            case_id,
            scan.channels[case_id],
            scan.labels.get(case_id),
            config,
            config.dataset_dir,
            report,
            stats,
        )
    ]
    refused = {p.case for p in scan.refused if p.case}
    report.cases_seen = sorted(
        set(scan.channels) | set(scan.labels) | set(records) | refused
    )
    report.usable_cases = sorted(
        case_id
        for case_id in set(scan.channels) & set(records)
        if any(r is records[case_id] for r in usable)
    )
    _check_cohort(report, config, usable)
    report.summary = _summary(usable, stats)
    if config.role == "public":  # placeholder records: no clinical summary
        report.summary["by_regimen"] = {}
    if config.privacy is not None and config.role == "train":
        n_train = len(usable) - round(len(usable) * config.val_fraction)
        _check_dp(report, config, n_train, fed or FederationConfig())
    report.findings = _merge_repeated_warnings(report.findings)
    return report


def _check_layout(
    report: CheckReport, config: SiteConfig
) -> tuple[DatasetScan, dict[str, Any], str]:
    """dataset.json, the folders, stray files, the clinical table and the match
    between its rows and the images. Returns the scan, the table's records and
    the file ending."""
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
    scan = scan_dataset(dataset_dir, ending, config.image_roots)
    for refused in scan.refused:
        report.add(refused)
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
    invalid_rows = {p.case for p in table_problems if p.case}
    _check_table_matches_images(
        report, scan, records, (bool(table_problems), invalid_rows), ending
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
    return scan, records, ending


def _check_table_matches_images(
    report: CheckReport,
    scan: DatasetScan,
    records: dict[str, Any],
    table: tuple[bool, set[str]],
    ending: str,
) -> None:
    """Every imaged case has a row and every row has images. ``table``: whether
    the table had problems, and the cases whose row is there but invalid; such
    a case, or one whose files were refused, is named by that finding alone."""
    image_ids = set(scan.channels) | set(scan.labels)
    table_broken, invalid_rows = table
    for case_id in sorted(image_ids - set(records) - invalid_rows):
        if records or not table_broken:
            report.add(
                Problem(
                    "case-not-in-table",
                    f"imagesTr/{case_id}",
                    f"case {case_id} has images but no row in clinical.csv",
                    "add its clinical row or remove its files",
                )
            )
    for case_id in sorted(set(records) - image_ids):
        if scan.refused_case(case_id):
            continue
        report.add(
            Problem(
                "case-without-images",
                f"clinical.csv:{case_id}",
                f"case {case_id} is in clinical.csv but has no images",
                f"add imagesTr/{case_id}_0000{ending} and _0001{ending}, "
                "or remove the row",
            )
        )


def _check_cohort(report: CheckReport, config: SiteConfig, usable: list) -> None:
    """Enough usable cases; at a training site, each regimen's size, delta
    against the training patients, and more than one outcome."""
    if len(usable) < config.min_cases:
        report.add(
            Problem(
                "too-few-cases",
                str(config.dataset_dir.name),
                f"{len(usable)} usable cases; this site requires at least "
                f"{config.min_cases} (min_cases)",
                "fix the cases reported above or add cases; lower min_cases only "
                "if the federation agrees",
            )
        )
    if config.role != "train":
        return
    by_regimen = Counter(r.regimen for r in usable)
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


def _check_dp(
    report: CheckReport, config: SiteConfig, n_train: int, fed: FederationConfig
) -> None:
    """The DP feasibility for ``fed``, as summary lines and warnings."""
    from client.checks.dp_feasibility import describe_feasibility, dp_feasibility

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
    if config.privacy is not None and config.privacy.release_evaluation == "exact":
        report.add(
            Problem(
                "privacy-evaluation-not-dp", where,
                "privacy.release_evaluation is true: the validation counts this "
                "site sends each evaluation round are NOT differentially private",
                "set it to false to withhold them, or to dp (with "
                "`privacy.evaluation_epsilon`) to send them noised, unless the site "
                "accepts that",
                "warning",
            )
        )  # fmt: skip


def _merge_repeated_warnings(findings: list[Problem]) -> list[Problem]:
    """Fold warnings that repeat word for word across files into one finding.

    Errors stay one per file, since each names what to repair.
    """
    groups: dict[tuple[str, str], list[Problem]] = {}
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
            f = dataclasses.replace(
                f, where=f"{group[0].where} and {len(group) - 1} more"
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
