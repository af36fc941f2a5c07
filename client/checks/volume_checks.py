"""Checks of one image file of ``moefl check`` (and ``moefl predict``): read
from its header first (a header claiming an implausible volume is a finding,
never a MemoryError), then its voxels; its dimensions, spacing and
orientation, its grid against the T2W image's, and an ADC map's unit.
:mod:`client.checks.case_checks` puts them together per case.
"""

from __future__ import annotations

import gzip
import zlib
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from client.problem import Problem

if TYPE_CHECKING:
    from pathlib import Path

# Tolerances and plausible ranges (see site_configs/README.md).
AFFINE_ATOL_MM = 1e-2  # origin difference allowed between channels
DIRECTION_ATOL = 1e-3  # direction-cosine difference allowed between channels
T2_INPLANE_MM = (0.2, 3.0)  # outside: warning (synthetic demo cohorts reach ~2 mm)
SLICE_MM = (1.0, 6.0)
MAX_VOXELS = 64 * 1024 * 1024  # per volume; a 1024 x 1024 x 64 export is 64 Mi
MAX_OBLIQUE_DEG = 35.0
ADC_P99_RANGE_1E3 = (0.8, 6.0)  # 99th percentile of ADC in 10^-3 mm^2/s


def load_volume(path: Path, rel: str) -> tuple[nib.Nifti1Image, np.ndarray] | Problem:
    """Load a NIfTI fully (a truncated file fails here, not at training time)."""
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            return Problem(
                "unreadable", rel, "not a NIfTI image", "convert it to NIfTI (.nii.gz)"
            )
        dtype = np.dtype(img.get_data_dtype())
        if dtype.kind not in "biuf":
            return Problem(
                "dtype",
                rel,
                f"the image stores {dtype} voxels (complex or RGB); expected real "
                "numbers (integers or floats)",
                "re-export the magnitude image (T2W) or the ADC map as a real-valued "
                "NIfTI; training would otherwise read only part of each voxel",
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
        if data.dtype.kind not in "biuf":  # scaling can change the type
            return Problem(
                "dtype",
                rel,
                f"the image's voxels read as {data.dtype}; expected real numbers",
                "re-export it as a real-valued NIfTI",
            )
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


def dims_problem(data: np.ndarray, rel: str) -> Problem | None:
    """A finding when the image is not a 3-D volume."""
    if data.ndim == 3:
        return None
    return Problem(
        "dims",
        rel,
        f"image is {data.ndim}-D with shape {data.shape}; expected a 3-D volume",
        "export one 3-D volume per file (split 4-D series, e.g. one b-value "
        "or the ADC map only; 2-D slices must be stacked)",
    )


def orientation_findings(img: nib.Nifti1Image, rel: str) -> list[Problem]:
    """Warnings for unusual spacing or a non-axial slice stack."""
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
