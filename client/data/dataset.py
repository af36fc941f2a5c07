"""From a checked site to training samples: split (:mod:`client.data.split`)
and MONAI pipeline (:mod:`client.data.transforms`).

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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from client.data.site_config import SiteConfig
from client.data.site_data import CaseFiles, list_cases
from client.data.split import Split, load_or_make_split
from client.data.transforms import build_preprocess, build_sampling
from client.data.volume_store import VolumeStore
from shared_model.clinical import encode_clinical
from shared_model.errors import DataError
from shared_model.layout import PREPROCESSED
from shared_model.plan import Plan


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
