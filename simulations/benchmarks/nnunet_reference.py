"""nnU-Net v2's own plan for moefl sites: its fingerprint extraction and
default planner (``ExperimentPlanner``, 3d_fullres) on the sites' cases pooled
into one nnU-Net raw dataset, its plan mapped to moefl's ``(D, H, W)`` axes.

The reference that ``moefl plan`` is compared with
(``tests/integration/test_nnunet_agreement.py``,
``simulations.benchmarks.planning``). nnU-Net is a development dependency
(``make venv`` installs it); nothing else in moefl imports it.

nnU-Net reads its folders and process counts from the environment when its
modules are first imported: set them (:func:`nnunet_settings`) before
calling anything here. nnU-Net 2.8.1's fingerprint extraction and planner
make no network call (its one download, of pretrained models, is not
reached); ``HF_HUB_OFFLINE`` keeps Hugging Face libraries offline should a
later version reach one. ``nnUNet_n_proc_DA`` spares it running `hostname`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from client.data.site_config import SiteConfig, load_site_config
from client.data.site_data import CHANNELS, LABELS, list_cases
from shared_model.fingerprint import topology
from shared_model.layout import site_yamls
from shared_model.plan import Plan

FOREGROUND_SAMPLE = 1e5
"""Foreground intensities nnU-Net samples over the whole dataset (its default
1e8 is about 3 GB on the tiny cohort). They feed only its intensity
statistics, not the 3d_fullres spacing or patch compared here."""


def nnunet_settings(root: Path) -> dict[str, str]:
    """nnU-Net's environment for folders under ``root`` (made here): its raw,
    preprocessed and results folders, one process, no compilation, offline."""
    env = {
        "nnUNet_raw": root / "raw",
        "nnUNet_preprocessed": root / "preprocessed",
        "nnUNet_results": root / "results",
    }
    for path in env.values():
        path.mkdir(parents=True, exist_ok=True)
    return {
        **{k: str(v) for k, v in env.items()},
        "nnUNet_def_n_proc": "1",
        "nnUNet_n_proc_DA": "1",
        "nnUNet_compile": "f",
        "HF_HUB_OFFLINE": "1",
    }


def nifti(path: Path) -> nib.Nifti1Image:
    img = nib.load(str(path))
    assert isinstance(img, nib.Nifti1Image)  # Nifti2Image is one too
    return img


def training_sites(cohort: Path) -> list[SiteConfig]:
    """The training sites of a synthetic cohort (its ``site_configs``)."""
    configs = [load_site_config(y) for y in site_yamls(cohort)]
    return [c for c in configs if c.role == "train"]


def pool_raw_dataset(configs: list[SiteConfig], folder: Path) -> dict[str, Path]:
    """An nnU-Net raw dataset in ``folder`` of every case of ``configs`` (the
    cases :func:`client.checks.fingerprint.site_fingerprint` counts), as links; returns
    each case's T2W by nnU-Net identifier (``<site>_<case>``)."""
    endings = {
        json.loads((c.dataset_dir / "dataset.json").read_text())["file_ending"]
        for c in configs
    }
    if len(endings) != 1:
        raise ValueError(f"the sites store different file endings: {endings}")
    ending = endings.pop()
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    t2: dict[str, Path] = {}
    for config in configs:
        cases = list_cases(
            config.dataset_dir, require_outcome=False, clinical=config.role != "public"
        )
        for case in cases:
            key = f"{config.site_name}_{case.case_id}"
            if case.label is None:
                raise ValueError(f"{key} has no mask; nnU-Net trains on masks")
            (folder / "imagesTr" / f"{key}_0000{ending}").symlink_to(case.t2)
            (folder / "imagesTr" / f"{key}_0001{ending}").symlink_to(case.adc)
            (folder / "labelsTr" / f"{key}{ending}").symlink_to(case.label)
            t2[key] = case.t2
    dataset = {
        "name": folder.name,
        "channel_names": CHANNELS,  # 0: T2W, 1: ADC
        "labels": LABELS,
        "numTraining": len(t2),
        "file_ending": ending,
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return t2


@dataclass(frozen=True)
class NnunetPlan:
    """nnU-Net's 3d_fullres plan of a pooled dataset.

    Attributes:
        spacing, patch_size: in moefl's ``(D, H, W)``.
        transpose_forward: nnU-Net's axis order (plan axis ``a`` = its array
            axis ``transpose_forward[a]``).
        fullres: its 3d_fullres configuration, in its own axes.
        n_cases: the cases its fingerprint counted.
        median_shape: the median shape after cropping, its array axes.
        seconds: fingerprint extraction and planning, wall clock.
    """

    spacing: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    transpose_forward: list[int]
    fullres: dict[str, Any]
    n_cases: int
    median_shape: list[float]
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "spacing": [round(s, 4) for s in self.spacing],
            "patch_size": list(self.patch_size),
            "transpose_forward": self.transpose_forward,
            "nnunet_axes": {
                "spacing": [round(float(s), 4) for s in self.fullres["spacing"]],
                "patch_size": list(self.fullres["patch_size"]),
                "strides": self.fullres["architecture"]["arch_kwargs"]["strides"],
                "median_image_size_in_voxels": self.fullres.get(
                    "median_image_size_in_voxels"
                ),
            },
            "n_cases": self.n_cases,
            "median_shape_after_crop": self.median_shape,
            "seconds": round(self.seconds, 1),
        }


def nnunet_plan(
    configs: list[SiteConfig],
    dataset_id: int,
    name: str,
    *,
    foreground_sample: float = FOREGROUND_SAMPLE,
    num_processes: int = 1,
) -> NnunetPlan:
    """Pool ``configs``' cases as nnU-Net dataset ``dataset_id`` (under
    ``$nnUNet_raw``), run nnU-Net's fingerprint extraction and default planner
    (8 GB) on it, and map its 3d_fullres spacing and patch to moefl's axes.

    Axes. nnU-Net's default reader for NIfTI (SimpleITKIO; the dataset.json
    names none) keeps the stored orientation and gives an array with the
    file's voxel axes reversed, ``(k, j, i)``; its plan's axes are those array
    axes permuted by ``transpose_forward`` (plan axis ``a`` = array axis
    ``tf[a]``). moefl reorients each image to RAS and orders its axes
    ``(D, H, W) = (S, A, R)``, the RAS axes reversed. So plan axis ``a`` is
    file voxel axis ``2 - tf[a]``, and moefl's axis for it is ``2 - (the RAS
    axis that voxel axis lies along)``. nnU-Net pools array axes and moefl RAS
    axes across cases: the two compare only if every case has the same
    voxel-to-RAS axis assignment (ValueError otherwise).
    """
    import time

    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )
    from nnunetv2.paths import nnUNet_raw

    if nnUNet_raw is None:
        raise RuntimeError(
            "set nnU-Net's folders (nnunet_settings) before importing it"
        )
    start = time.perf_counter()
    folder = Path(nnUNet_raw) / f"Dataset{dataset_id:03d}_{name}"
    t2 = pool_raw_dataset(configs, folder)
    extractor = DatasetFingerprintExtractor(dataset_id, num_processes=num_processes)
    extractor.num_foreground_voxels_for_intensitystats = foreground_sample
    extractor.show_progress_bar = False
    fingerprint = extractor.run(overwrite_existing=True)
    plans = ExperimentPlanner(dataset_id).plan_experiment()
    fullres = plans["configurations"]["3d_fullres"]
    seconds = time.perf_counter() - start

    tf = [int(a) for a in plans["transpose_forward"]]
    moefl_axis = _moefl_axes(t2, tf)
    _check_reversed_spacings(t2, list(extractor.dataset), fingerprint["spacings"])

    spacing, patch = [0.0] * 3, [0] * 3
    for a in range(3):
        spacing[moefl_axis[a]] = float(fullres["spacing"][a])
        patch[moefl_axis[a]] = int(fullres["patch_size"][a])
    return NnunetPlan(
        spacing=(spacing[0], spacing[1], spacing[2]),
        patch_size=(patch[0], patch[1], patch[2]),
        transpose_forward=tf,
        fullres=fullres,
        n_cases=len(fingerprint["spacings"]),
        median_shape=[
            float(v) for v in np.median(fingerprint["shapes_after_crop"], axis=0)
        ],
        seconds=seconds,
    )


def _moefl_axes(t2: dict[str, Path], tf: list[int]) -> list[int]:
    """moefl's axis for each of nnU-Net's plan axes (see :func:`nnunet_plan`);
    ValueError when the cases' voxel axes lie along different RAS axes."""
    to_ras = {
        tuple(int(r) for r in nib.io_orientation(nifti(p).affine)[:, 0])
        for p in t2.values()
    }
    if len(to_ras) != 1:
        raise ValueError(
            f"the cases' voxel axes lie along different RAS axes: {to_ras}"
        )
    voxel_to_ras = to_ras.pop()
    moefl_axis = [2 - voxel_to_ras[2 - tf[a]] for a in range(3)]
    assert sorted(moefl_axis) == [0, 1, 2], moefl_axis
    return moefl_axis


def _check_reversed_spacings(
    t2: dict[str, Path], keys: list[str], spacings: list[Any]
) -> None:
    """The reversal, checked: nnU-Net's fingerprint spacings (before the
    transpose) are each file's zooms reversed."""
    if len(spacings) != len(t2):
        raise ValueError("nnU-Net's fingerprint does not count every case")
    for key, spacing in zip(keys, spacings, strict=True):
        zooms = nifti(t2[key]).header.get_zooms()[:3]
        if not np.allclose(spacing, zooms[::-1]):
            raise ValueError(f"{key}: nnU-Net's spacing {spacing}, zooms {zooms}")


def stride_step(plan: Plan) -> np.ndarray:
    """Per axis, the total stride of the U-Net moefl builds for ``plan``: the
    step by which its patch can change."""
    strides, _ = topology(np.array(plan.spacing), list(plan.patch_size))
    return np.array([2 ** sum(s[a] == 2 for s in strides) for a in range(3)])


def agreement(plan: Plan, reference: NnunetPlan) -> dict[str, Any]:
    """moefl's plan against nnU-Net's: the difference per axis and whether it is
    within tolerance (spacing within 10 %, patch within one stride step)."""
    spacing, patch = np.array(plan.spacing), np.array(plan.patch_size)
    nn_spacing, nn_patch = np.array(reference.spacing), np.array(reference.patch_size)
    step = stride_step(plan)
    relative = (spacing - nn_spacing) / nn_spacing
    return {
        "spacing_relative_difference": [round(float(v), 4) for v in relative],
        "patch_difference": [int(v) for v in patch - nn_patch],
        "stride_step": [int(v) for v in step],
        "spacing_ok": bool(np.all(np.abs(relative) <= 0.1 + 1e-9)),
        "patch_ok": bool(np.all(np.abs(patch - nn_patch) <= step)),
        "equal": bool(
            np.allclose(spacing, nn_spacing, rtol=0, atol=1e-3)
            and np.array_equal(patch, nn_patch)
        ),
        "within_tolerance": bool(
            np.all(np.abs(relative) <= 0.1 + 1e-9)
            and np.all(np.abs(patch - nn_patch) <= step)
        ),
    }


def shown(plan: Plan, reference: NnunetPlan) -> str:
    """Both plans, for a message."""
    fullres = reference.fullres
    return (
        f"\nnnU-Net 3d_fullres, its axes (transpose_forward "
        f"{reference.transpose_forward}): spacing {fullres['spacing']}, patch "
        f"{fullres['patch_size']}, strides "
        f"{fullres['architecture']['arch_kwargs']['strides']}"
        f"\nnnU-Net in moefl's (D, H, W): spacing {list(reference.spacing)}, patch "
        f"{list(reference.patch_size)}"
        f"\nmoefl (D, H, W): spacing {list(plan.spacing)}, patch "
        f"{list(plan.patch_size)}, stride step {stride_step(plan).tolist()}"
    )
