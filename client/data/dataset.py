"""From a checked site to training samples: split and MONAI pipeline.

A sample is one patient: ``image`` ``(2, D, H, W)`` float32 (T2W z-scored over
the non-zero voxels of the image, ADC in 10^-3 mm^2/s clipped to the plan's
range), ``label`` ``(1, D, H, W)`` float32 in {0, 1}, ``clinical`` ``(15,)``
one-hot, ``regimen`` int64 index into ``REGIMENS``, ``pcr`` float32 (NaN when
unknown) and ``case_id``. One crop per patient per epoch: the patient is the
privacy unit under DP-SGD.

Every volume is reoriented to RAS, resampled to the plan's spacing, and
transposed to ``(D, H, W)`` = (superior, anterior, right) axes. Training crops
are drawn around the tumour twice as often as elsewhere (nnU-Net's foreground
oversampling); validation crops are centred on the tumour.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
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
from torch.utils.data import ConcatDataset

from client.data.site_config import SiteConfig
from client.data.site_data import CaseFiles, list_cases
from client.data.volume_store import VolumeStore
from shared_model.clinical import encode_clinical
from shared_model.errors import DataError
from shared_model.layout import PREPROCESSED
from shared_model.plan import Plan


@dataclass(frozen=True)
class Split:
    """A site's train/validation split; it stays on the site's disk."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    seed: int
    val_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "n_train": len(self.train),
            "n_val": len(self.val),
            "train": list(self.train),
            "val": list(self.val),
        }


def compute_split(
    cases: Sequence[CaseFiles], *, val_fraction: float, seed: int
) -> Split:
    """Stratified split by (regimen, pCR), exact to within one case per stratum.

    Each stratum is shuffled with the seed, the strata are laid end to end and
    every ``1 / val_fraction``-th position (with a random phase) goes to
    validation, so each stratum keeps its share and the total is
    ``round(N * val_fraction)`` give or take one.
    """
    rng = np.random.default_rng(seed)
    strata: dict[tuple[str, int], list[str]] = defaultdict(list)
    for c in sorted(cases, key=lambda c: c.case_id):
        strata[
            (c.clinical.regimen, -1 if c.clinical.pcr is None else c.clinical.pcr)
        ].append(c.case_id)
    ordered: list[str] = []
    for key in sorted(strata):
        ids = strata[key]
        ordered.extend(ids[i] for i in rng.permutation(len(ids)))
    phase = float(rng.random())
    val = [
        cid
        for i, cid in enumerate(ordered)
        if math.floor((i + 1) * val_fraction + phase)
        > math.floor(i * val_fraction + phase)
    ]
    val_set = set(val)
    train = tuple(sorted(c for c in ordered if c not in val_set))
    return Split(
        train=train, val=tuple(sorted(val_set)), seed=seed, val_fraction=val_fraction
    )


def load_or_make_split(config: SiteConfig, cases: Sequence[CaseFiles]) -> Split:
    """Reuse ``run_dir/split.json`` when it matches the site's cases, else write it.

    A split is kept across restarts so validation cases never leak into
    training. If the site's cases changed since, the old split is an error
    rather than silently replaced.
    """
    path = config.run_dir / "split.json"
    ids = {c.case_id for c in cases}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            split = Split(
                tuple(data["train"]),
                tuple(data["val"]),
                int(data["seed"]),
                float(data["val_fraction"]),
            )
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"{path}: cannot read the saved split ({e}); delete it to re-split"
            ) from e
        if set(split.train) | set(split.val) != ids:
            raise DataError(
                f"{path}: the site's cases changed since this split was written; delete "
                "the file to re-split (validation results before and after are then not "
                "comparable)"
            )
        return split
    split = compute_split(
        cases, val_fraction=config.val_fraction, seed=config.split_seed
    )
    config.run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split.to_dict(), indent=1) + "\n")
    return split


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


class SiteDataset(torch.utils.data.Dataset):
    """One sample per patient per epoch, built from the site's files.

    Args:
        cases: the patients.
        plan: spacing and patch.
        adc_scale: stored ADC to 10^-3 mm^2/s.
        train: random crops (and augmentation when ``augment``).
        augment: MONAI augmentation on training crops.
        cache: keep each patient's preprocessed volume in memory after its
            first use (fast epochs; memory grows with the cohort).
        store: keep it on the site's disk too (:mod:`client.data.volume_store`),
            so a later process reads it instead of preprocessing again.
        seed: seeds crops and augmentation.
        whole: whole volumes, no crop (for :func:`client.scoring.inference.score_dataset`).
    """

    def __init__(
        self,
        cases: Sequence[CaseFiles],
        plan: Plan,
        *,
        adc_scale: float,
        train: bool,
        augment: bool = False,
        cache: bool = False,
        seed: int = 0,
        whole: bool = False,
        store: Path | None = None,
    ) -> None:
        self.cases = list(cases)
        self.plan, self.adc_scale = plan, adc_scale
        self.has_label = all(c.label is not None for c in self.cases)
        self.preprocess = build_preprocess(
            plan, adc_scale=adc_scale, has_label=self.has_label
        )
        self.transform = build_sampling(
            plan, train=train, augment=augment, has_label=self.has_label, whole=whole
        )
        self.transform.set_random_state(seed=seed)
        self.cache = cache
        self._cache: dict[int, dict[str, Any]] = {}
        self.store_root = store
        self.store = None if store is None else VolumeStore(store, plan, adc_scale)

    def __len__(self) -> int:
        return len(self.cases)

    def whole_view(self) -> SiteDataset:
        """The same patients as whole volumes (no crop, no augmentation),
        sharing this dataset's in-memory volume cache."""
        view = SiteDataset(
            self.cases,
            self.plan,
            adc_scale=self.adc_scale,
            train=False,
            whole=True,
            store=self.store_root,
        )
        view.cache, view._cache = self.cache, self._cache
        return view

    def regimen_indices(self) -> list[int]:
        return [c.clinical.regimen_index for c in self.cases]

    def _volume(self, index: int) -> dict[str, Any]:
        if index in self._cache:
            return dict(self._cache[index])
        case = self.cases[index]
        out = None if self.store is None else self.store.load(case)
        if out is None or ("label" in out) != self.has_label:
            item: dict[str, Any] = {"t2": str(case.t2), "adc": str(case.adc)}
            if self.has_label:
                item["label"] = str(case.label)
            out = {
                k: torch.as_tensor(v).as_subclass(torch.Tensor)
                for k, v in self.preprocess(item).items()
            }
            if self.store is not None:
                self.store.save(case, out)
        if self.cache:
            self._cache[index] = out
        return dict(out)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        try:
            out = self.transform(self._volume(index))
        except Exception as e:  # MONAI wraps reader errors; name the case
            raise DataError(
                f"case {case.case_id}: cannot build the sample ({e}); run "
                "`moefl check` on the site"
            ) from e
        if isinstance(out, list):
            out = out[0]
        rec = case.clinical
        sample = {
            "image": torch.as_tensor(np.asarray(out["image"]), dtype=torch.float32),
            "clinical": torch.from_numpy(encode_clinical(rec.features)),
            "regimen": torch.tensor(rec.regimen_index, dtype=torch.int64),
            "pcr": torch.tensor(
                float("nan") if rec.pcr is None else float(rec.pcr), dtype=torch.float32
            ),
            "case_id": case.case_id,
        }
        if self.has_label:
            sample["label"] = (torch.as_tensor(np.asarray(out["label"])) > 0.5).float()
        return sample


def build_site_datasets(
    config: SiteConfig,
    plan: Plan,
    *,
    seed: int = 0,
    augment: bool = False,
    cache: bool = False,
    store: Path | None = None,
) -> tuple[SiteDataset, SiteDataset, Split]:
    """Train and validation datasets of a checked site, with its persistent split."""
    cases = list_cases(
        config.dataset_dir,
        require_outcome=config.role == "train",
        clinical=config.role != "public",
        image_roots=config.image_roots,
    )
    split = load_or_make_split(config, cases)
    by_id = {c.case_id: c for c in cases}
    train = SiteDataset(
        [by_id[i] for i in split.train],
        plan,
        adc_scale=config.adc_scale,
        train=True,
        augment=augment,
        cache=cache,
        seed=seed,
        store=store,
    )
    val = SiteDataset(
        [by_id[i] for i in split.val],
        plan,
        adc_scale=config.adc_scale,
        train=False,
        cache=cache,
        seed=seed,
        store=store,
    )
    return train, val, split


def pooled_datasets(
    configs: Sequence[SiteConfig], plan: Plan, *, seed: int, augment: bool
) -> tuple[list[SiteDataset], list[SiteDataset], Any, Any]:
    """Each site's training and validation splits, and their unions."""
    trains, vals = [], []
    for c in configs:
        tr, va, _ = build_site_datasets(c, plan, seed=seed, augment=augment, cache=True)
        trains.append(tr)
        vals.append(va)
    train: Any = trains[0] if len(trains) == 1 else ConcatDataset(trains)
    val: Any = vals[0] if len(vals) == 1 else ConcatDataset(vals)
    return trains, vals, train, val


def prepare_site(
    config: SiteConfig,
    plan: Plan,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Preprocess every case of a checked site into its store
    (``run_dir/preprocessed``). Returns (cases stored now, cases already
    stored)."""

    cases = list_cases(
        config.dataset_dir,
        require_outcome=config.role == "train",
        clinical=config.role != "public",
        image_roots=config.image_roots,
    )
    dataset = SiteDataset(
        cases,
        plan,
        adc_scale=config.adc_scale,
        train=False,
        store=config.run_dir / PREPROCESSED,
    )
    assert dataset.store is not None
    fresh = 0
    for i, case in enumerate(cases):
        if dataset.store.load(case) is None:
            dataset._volume(i)
            fresh += 1
        if progress is not None:
            progress(i + 1, len(cases))
    return fresh, len(cases) - fresh
