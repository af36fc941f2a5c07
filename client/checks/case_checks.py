"""Per-case checks of ``moefl check``: a case's files present, each read
(:mod:`client.checks.volume_checks`: header first, then voxels), 3-D and
finite, the channels and mask on one grid, the ADC unit, spacing and
orientation, mask values and a non-empty mask.

Each check returns or adds :class:`client.problem.Problem` findings; the
report that collects them is :class:`client.problem.CheckReport`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from client.checks.volume_checks import MAX_VOXELS as MAX_VOXELS  # re-exported
from client.checks.volume_checks import (
    adc_unit_problem,
    dims_problem,
    grid_problem,
    load_volume,
    orientation_findings,
)
from client.data.site_config import SiteConfig
from client.problem import CheckReport, Problem


def check_case(
    case_id: str,
    channels: dict[int, Path],
    label: Path | None,
    config: SiteConfig,
    dataset_dir: Path,
    report: CheckReport,
    stats: dict[str, list[float]],
) -> bool:
    """Check one case's files; return True when the case is usable."""

    def rel(p: Path) -> str:
        return str(p.relative_to(dataset_dir))

    if not _files_present(case_id, channels, label, config, rel, report):
        return False
    loaded_case = _load_case(channels, label, rel, report)
    if loaded_case is None:
        return False
    t2_img, t2, loaded = loaded_case

    for f in orientation_findings(t2_img, rel(channels[0])):
        report.add(f)
    zooms = [float(z) for z in t2_img.header.get_zooms()[:3]]
    stats["inplane"].append(min(zooms[:2]))
    stats["slice"].append(zooms[2])

    usable = _check_t2_signal(t2, rel(channels[0]), report)
    for path, what, img, data in loaded:
        grid = grid_problem(t2_img, img, rel(channels[0]), rel(path), what)
        if grid is not None:
            report.add(grid)
            usable = False
            continue
        values = np.asarray(data, dtype=np.float64)
        if not np.isfinite(values).all():
            report.add(_non_finite(values, rel(path)))
            usable = False
            continue
        if what == "ADC":
            usable &= _check_adc(values, rel(path), config, report, stats)
        else:
            usable &= _check_label(
                values, rel(path), case_id, config, report, zooms, stats
            )
    return usable


def _files_present(
    case_id: str,
    channels: dict[int, Path],
    label: Path | None,
    config: SiteConfig,
    rel: Callable[[Path], str],
    report: CheckReport,
) -> bool:
    """Both channels, no other channel, and a mask where the role needs one."""
    usable = True
    for ch, name in ((0, "T2W"), (1, "ADC")):
        if ch not in channels:
            report.add(
                Problem(
                    "channel-missing",
                    f"imagesTr/{case_id}_{ch:04d}",
                    f"case {case_id} has no {name} image (channel {ch:04d})",
                    f"add imagesTr/{case_id}_{ch:04d}.nii.gz or remove the case "
                    "from clinical.csv",
                    case=case_id,
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
    return usable


_Loaded = tuple[Path, str, nib.Nifti1Image, np.ndarray]


def _load_case(
    channels: dict[int, Path],
    label: Path | None,
    rel: Callable[[Path], str],
    report: CheckReport,
) -> tuple[nib.Nifti1Image, np.ndarray, list[_Loaded]] | None:
    """The T2W image and the other files (ADC, mask) read and 3-D; ``None``
    when any cannot be read or is not 3-D (every finding reported)."""
    usable = True
    t2_loaded = load_volume(channels[0], rel(channels[0]))
    if isinstance(t2_loaded, Problem):
        report.add(t2_loaded)
        usable = False
    loaded: list[_Loaded] = []
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
        return None
    t2_img, t2 = t2_loaded
    if (dims := dims_problem(t2, rel(channels[0]))) is not None:
        report.add(dims)
        return None
    for path, _what, _img, data in loaded:
        if (dims := dims_problem(data, rel(path))) is not None:
            report.add(dims)
            usable = False
    return (t2_img, t2, loaded) if usable else None


def _non_finite(values: np.ndarray, rel: str) -> Problem:
    return Problem(
        "non-finite",
        rel,
        f"{int((~np.isfinite(values)).sum())} voxels are NaN or infinite",
        "re-export the image; NaN usually marks a failed conversion",
    )


def _check_t2_signal(t2: np.ndarray, rel: str, report: CheckReport) -> bool:
    """The T2W voxels are finite and not constant."""
    t2f = np.asarray(t2, dtype=np.float64)
    if not np.isfinite(t2f).all():
        report.add(_non_finite(t2f, rel))
        return False
    if float(t2f.std()) == 0.0:
        report.add(
            Problem(
                "blank-image",
                rel,
                "the T2W image is constant",
                "re-export the image; it holds no signal",
            )
        )
        return False
    return True


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
