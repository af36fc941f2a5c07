"""``moefl predict``: one patient's tumour mask and pCR probability per regimen.

The volume is preprocessed exactly as in training (RAS, the plan's spacing,
T2W z-score, ADC in 10^-3 mm^2/s), segmented with a sliding window when it is
larger than the patch, and the pCR experts read a patch centred on the
predicted tumour. The mask can be written back on the input grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose
from scipy import ndimage

from client.checks.volume_checks import adc_unit_problem, grid_problem, load_volume
from client.data.transforms import build_preprocess, geometry_steps
from client.problem import Problem
from client.scoring.inference import score_volume
from client.training.engine import resolve_device
from shared_model.checkpoint import load_checkpoint
from shared_model.clinical import CLINICAL_FEATURES, REGIMENS, encode_clinical
from shared_model.errors import DataError
from shared_model.plan import Plan


@dataclass(frozen=True)
class Prediction:
    """Result of :func:`predict_case`."""

    pcr_probability: dict[str, float]
    tumour_volume_ml: float
    mask: np.ndarray  # on the input T2W grid, uint8

    def to_dict(self) -> dict[str, Any]:
        return {
            "pcr_probability": self.pcr_probability,
            "tumour_volume_ml": round(self.tumour_volume_ml, 3),
        }


def parse_clinical_args(pairs: list[str]) -> dict[str, str]:
    """``["cT=T3", "cN=N1", ...]`` -> validated clinical mapping.

    Raises:
        DataError: malformed pair, unknown variable, missing variable or value
            outside its allowed set (the message lists what is allowed).
    """
    values: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise DataError(f"--clinical {pair!r}: expected KEY=VALUE, e.g. cT=T3")
        key, value = (s.strip() for s in pair.split("=", 1))
        if key not in CLINICAL_FEATURES:
            raise DataError(
                f"--clinical {key}: unknown variable; expected one of "
                f"{list(CLINICAL_FEATURES)}"
            )
        values[key] = value
    missing = [k for k in CLINICAL_FEATURES if k not in values]
    if missing:
        raise DataError(
            f"--clinical is missing {missing}; give every one of "
            f"{list(CLINICAL_FEATURES)}"
        )
    encode_clinical(values)  # raises with the allowed values
    return values


def _check_inputs(t2: Path, adc: Path, adc_unit: str) -> nib.Nifti1Image:
    for path in (t2, adc):
        if not Path(path).is_file():
            raise DataError(f"{path}: file not found")
    loaded = []
    for path in (t2, adc):
        result = load_volume(Path(path), str(path))
        if isinstance(result, Problem):
            raise DataError(f"{result.where}: {result.message}; {result.fix}")
        img, data = result
        if data.ndim != 3:
            raise DataError(f"{path}: image is {data.ndim}-D; expected a 3-D volume")
        if not np.isfinite(np.asarray(data, dtype=np.float64)).all():
            raise DataError(f"{path}: contains NaN or infinite voxels")
        if path == adc:
            unit = adc_unit_problem(
                np.asarray(data, np.float64), adc_unit, str(path), setting="--adc-unit"
            )
            if unit is not None:
                raise DataError(f"{unit.where}: {unit.message}; {unit.fix}")
        loaded.append(img)
    grid = grid_problem(loaded[0], loaded[1], str(t2), str(adc), "ADC")
    if grid is not None:
        raise DataError(f"{grid.where}: {grid.message}; {grid.fix}")
    return loaded[0]


@torch.no_grad()
def predict_case(
    checkpoint: Path,
    *,
    t2: Path,
    adc: Path,
    clinical: Mapping[str, str],
    adc_unit: str = "1e-3",
    device: str = "auto",
) -> Prediction:
    """Segment one patient and predict pCR under every regimen.

    Raises:
        DataError: missing file, unreadable NIfTI, grid mismatch, bad clinical value.
        ConfigError: the checkpoint folder is incomplete or inconsistent.
    """
    if adc_unit not in ("1e-3", "1e-6"):
        raise DataError(f"--adc-unit {adc_unit!r}: expected 1e-3 or 1e-6")
    ref = _check_inputs(Path(t2), Path(adc), adc_unit)
    model, plan = load_checkpoint(Path(checkpoint))
    dev = resolve_device(device)
    adc_scale = 1.0 if adc_unit == "1e-3" else 1e-3
    prep = build_preprocess(plan, adc_scale=adc_scale, has_label=False)
    data = prep({"t2": str(t2), "adc": str(adc)})
    image = torch.cat(
        [
            torch.as_tensor(np.asarray(data["t2"])),
            torch.as_tensor(np.asarray(data["adc"])),
        ]
    ).float()
    clin = torch.from_numpy(encode_clinical(clinical))
    probs, mask = score_volume(model, image, clin, 0, plan, dev)
    volume_ml = float(mask.sum()) * math.prod(plan.spacing) / 1000.0
    return Prediction(
        pcr_probability={r: round(p, 4) for r, p in zip(REGIMENS, probs, strict=True)},
        tumour_volume_ml=volume_ml,
        mask=mask_on_input_grid(mask.numpy(), Path(t2), plan, ref=ref),
    )


def mask_on_input_grid(
    mask_dhw: np.ndarray,
    t2: Path,
    plan: Plan,
    *,
    ref: nib.Nifti1Image | None = None,
) -> np.ndarray:
    """A mask on the scored volume's grid (the plan's spacing, ``(D, H, W)``,
    padded to the patch) back on ``t2``'s own grid (nearest neighbour)."""
    if ref is None:
        loaded = nib.load(str(t2))
        assert isinstance(loaded, nib.Nifti1Image | nib.Nifti2Image)
        ref = loaded  # type: ignore[assignment]
    assert ref is not None
    t2_ras = Compose(geometry_steps(plan, ["t2"], ["bilinear"]))({"t2": str(t2)})
    xyz = tuple(int(n) for n in t2_ras["t2"].shape[1:])
    affine = np.asarray(t2_ras["t2"].affine, dtype=np.float64)
    # undo the symmetric pad to the patch (SpatialPadd: the smaller half first)
    before = [
        max(p - n, 0) // 2 for p, n in zip(plan.patch_size, xyz[::-1], strict=True)
    ]
    unpadded = mask_dhw[
        before[0] : before[0] + xyz[2],
        before[1] : before[1] + xyz[1],
        before[2] : before[2] + xyz[0],
    ]
    return _to_input_grid(unpadded, affine, ref)


def save_mask(mask: np.ndarray, reference: Path, path: Path) -> None:
    """Write ``mask`` as NIfTI with the reference image's header geometry."""
    ref = nib.load(str(reference))
    assert isinstance(ref, nib.Nifti1Image | nib.Nifti2Image)  # checked on input
    img = nib.Nifti1Image(mask.astype(np.uint8), ref.affine)
    img.set_qform(ref.affine, code=1)
    img.set_sform(ref.affine, code=1)
    nib.save(img, str(path))


def _to_input_grid(
    mask_dhw: np.ndarray, processed_affine: np.ndarray, ref: nib.Nifti1Image
) -> np.ndarray:
    """Nearest-neighbour resample of a ``(D, H, W)`` mask back onto ``ref``'s grid.

    ``processed_affine`` maps the processed volume's ``(X, Y, Z)`` voxel indices
    (before the transpose to ``(D, H, W)``) to world coordinates.
    """
    xyz = np.transpose(mask_dhw, (2, 1, 0)).astype(np.float32)
    idx = np.indices(ref.shape[:3]).reshape(3, -1).astype(np.float64)
    to_proc = np.linalg.inv(processed_affine) @ ref.affine
    coords = to_proc[:3, :3] @ idx + to_proc[:3, 3:4]
    out = ndimage.map_coordinates(xyz, coords, order=0, mode="constant", cval=0.0)
    return out.reshape(ref.shape[:3]).astype(np.uint8)
