"""The MONAI pipeline of a sample: the deterministic preprocessing (files to
volumes on the plan's grid) and the random sampling (crop, augment, stack).

Every volume is reoriented to RAS, resampled to the plan's spacing, and
transposed to ``(D, H, W)`` = (superior, anterior, right) axes. Training crops
are drawn around the tumour twice as often as elsewhere (nnU-Net's foreground
oversampling); validation crops are centred on the tumour.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import nibabel as nib
import numpy as np
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    ConcatItemsd,
    DeleteItemsd,
    Lambdad,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandZoomd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialCrop,
    SpatialPadd,
    Transposed,
)
from monai.transforms.utils import generate_spatial_bounding_box

from shared_model.errors import DataError
from shared_model.plan import Plan


def _scale(x: Any, factor: float) -> Any:
    return x * factor


class CropAroundLabeld(MapTransform):
    """Crop a patch centred on the label's bounding box, kept inside the volume.

    The volume must already be padded to at least the patch size. Unlike
    ``CropForegroundd`` this keeps the tumour's surroundings: the crop is the
    patch, not the box.
    """

    def __init__(
        self, keys: Sequence[str], *, label_key: str, roi_size: Sequence[int]
    ) -> None:
        super().__init__(keys)
        self.label_key = label_key
        self.roi_size = tuple(int(r) for r in roi_size)

    def __call__(self, data: Any) -> dict[str, Any]:
        d = dict(data)
        label = d[self.label_key]
        shape = label.shape[1:]
        start, end = generate_spatial_bounding_box(label)
        if any(e <= s for s, e in zip(start, end, strict=True)):
            centre = [n // 2 for n in shape]  # empty mask: centre of the volume
        else:
            centre = [(s + e) // 2 for s, e in zip(start, end, strict=True)]
        lo = [
            min(max(c - r // 2, 0), n - r)
            for c, r, n in zip(centre, self.roi_size, shape, strict=True)
        ]
        crop = SpatialCrop(
            roi_start=lo,
            roi_end=[s + r for s, r in zip(lo, self.roi_size, strict=True)],
        )
        for key in self.key_iterator(d):
            d[key] = crop(d[key])
        return d


def verify_real_voxels(path: Any) -> Any:
    """``path`` unchanged when its NIfTI header stores real numbers; a
    DataError naming the file otherwise (a complex or RGB image would be read
    as its real part, silently)."""
    image = nib.load(str(path))  # the header only
    dtype = np.dtype(getattr(image, "get_data_dtype", lambda: np.float32)())
    if dtype.kind not in "biuf":
        raise DataError(
            f"{path}: the image stores {dtype} voxels; expected real numbers "
            "(run `moefl check` on the site)"
        )
    return path


def geometry_steps(plan: Plan, keys: Sequence[str], modes: Sequence[str]) -> list[Any]:
    """Read (real-valued images only), reorient to RAS and resample to the
    plan's spacing: the grid every volume is scored on (and masks are mapped
    back from)."""
    d, h, w = plan.spacing
    return [
        Lambdad(keys, verify_real_voxels),
        LoadImaged(
            keys, image_only=True, ensure_channel_first=True, reader="NibabelReader"
        ),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys, pixdim=(w, h, d), mode=list(modes)),
    ]


def build_preprocess(
    plan: Plan, *, adc_scale: float, has_label: bool = True, to_patch: bool = True
) -> Compose:
    """Deterministic part: file paths to whole volumes on the plan's grid.

    Loads T2W, ADC (and the mask), reorients to RAS, resamples to the plan's
    spacing, converts ADC to 10^-3 mm^2/s and clips it, z-scores T2W over its
    non-zero voxels, transposes to ``(C, D, H, W)`` and pads to the patch.
    Its output can be cached: nothing in it is random. With ``to_patch`` False
    the volumes stay in ``(C, X, Y, Z)`` RAS order, unpadded, with their
    affines intact (inference maps masks back through them).
    """
    keys = ["t2", "adc"] + (["label"] if has_label else [])
    lo, hi = plan.adc_clip
    modes = ["bilinear", "bilinear"] + (["nearest"] if has_label else [])
    steps: list[Any] = [
        *geometry_steps(plan, keys, modes),
        Lambdad("adc", partial(_scale, factor=adc_scale)),
        ScaleIntensityRanged("adc", a_min=lo, a_max=hi, b_min=lo, b_max=hi, clip=True),
        NormalizeIntensityd("t2", nonzero=True),
    ]
    if to_patch:
        steps += [
            Transposed(keys, indices=(0, 3, 2, 1)),
            SpatialPadd(keys, spatial_size=plan.patch_size),
        ]
    return Compose(steps)


def build_sampling(
    plan: Plan,
    *,
    train: bool,
    augment: bool = False,
    has_label: bool = True,
    whole: bool = False,
) -> Compose:
    """Random part: crop to the patch, augment, stack the channels.

    Training crops are centred on tumour voxels two times in three (nnU-Net's
    foreground oversampling); validation crops are centred on the tumour;
    cases without a mask get a centre crop; ``whole``: no crop (scoring,
    :mod:`client.scoring.inference`, finds the tumour itself). Augmentation (training only):
    in-plane rotation up to 15 degrees, scaling 0.9-1.1, left-right flips,
    Gaussian noise and T2W gamma.
    """
    keys = ["t2", "adc"] + (["label"] if has_label else [])
    image_keys = ["t2", "adc"]
    steps: list[Any] = []
    if whole:
        pass
    elif has_label and train:
        steps.append(
            RandCropByPosNegLabeld(
                keys,
                label_key="label",
                spatial_size=plan.patch_size,
                pos=2,
                neg=1,
                num_samples=1,
            )
        )
    elif has_label:
        steps.append(
            CropAroundLabeld(keys, label_key="label", roi_size=plan.patch_size)
        )
    else:
        steps.append(CenterSpatialCropd(keys, roi_size=plan.patch_size))
    if train and augment:
        modes = ["bilinear", "bilinear"] + (["nearest"] if has_label else [])
        steps += [
            RandRotated(keys, range_x=0.26, prob=0.3, mode=modes, padding_mode="zeros"),
            RandZoomd(
                keys,
                min_zoom=0.9,
                max_zoom=1.1,
                prob=0.3,
                mode=["trilinear", "trilinear"] + (["nearest"] if has_label else []),
                keep_size=True,
            ),
            RandFlipd(keys, prob=0.5, spatial_axis=2),
            RandGaussianNoised(image_keys, prob=0.15, std=0.05),
            RandAdjustContrastd("t2", prob=0.15, gamma=(0.8, 1.25)),
        ]
    steps += [ConcatItemsd(image_keys, "image"), DeleteItemsd(image_keys)]
    return Compose(steps)
