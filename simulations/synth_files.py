"""The files of a synthetic cohort: NIfTI cases, clinical tables, dataset.json
and the oracle's tables (what :mod:`simulations.synth` writes per site)."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from shared_model.clinical import (
    CLINICAL_COLUMNS,
    CLINICAL_FEATURES,
    DFS_COLUMNS,
    REGIMENS,
)
from shared_model.layout import POTENTIAL_OUTCOMES
from simulations.cohort import Patient
from simulations.phantom import generate_case
from simulations.sites import Geometry, Scanner

Progress = Callable[[int, int], None]


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def write_case(
    args: tuple[Patient, Scanner, Geometry, str],
) -> tuple[str, float, float]:
    patient, scanner, geometry, dataset_dir = args
    case = generate_case(patient, scanner, geometry)
    root = Path(dataset_dir)
    save_nifti(
        case.t2, case.affine, root / "imagesTr" / f"{patient.case_id}_0000.nii.gz"
    )
    save_nifti(
        case.adc, case.affine, root / "imagesTr" / f"{patient.case_id}_0001.nii.gz"
    )
    save_nifti(case.label, case.affine, root / "labelsTr" / f"{patient.case_id}.nii.gz")
    return patient.case_id, case.tumour_volume_ml, case.core_volume_ml


def write_clinical(patients: list[Patient], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CLINICAL_COLUMNS, *DFS_COLUMNS])
        for p in patients:
            months, event = p.observed_dfs()
            writer.writerow(
                [
                    p.case_id,
                    *(p.clinical[c] for c in CLINICAL_FEATURES),
                    p.regimen,
                    p.pcr,
                    f"{months:.1f}",
                    event,
                ]
            )


def dataset_json(n: int, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "description": "moefl synthetic rectal MRI cohort (T2W + ADC on the T2W grid)",
        "channel_names": {"0": "T2", "1": "ADC"},
        "labels": {"background": 0, "tumour": 1},
        "numTraining": n,
        "file_ending": ".nii.gz",
    }


def write_images(
    jobs: list[tuple[Patient, Scanner, Geometry, str]],
    workers: int | None,
    progress: Progress | None,
) -> dict[str, tuple[float, float]]:
    """Generate and write every case; case id -> (tumour, core) volume in ml."""
    volumes: dict[str, tuple[float, float]] = {}
    if not jobs:
        return volumes
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if progress:
        progress(0, len(jobs))
    if n_workers == 1:
        results: Any = map(write_case, jobs)
        for i, (case_id, vol, core) in enumerate(results, 1):
            volumes[case_id] = (vol, core)
            if progress:
                progress(i, len(jobs))
    else:
        with ProcessPoolExecutor(n_workers) as pool:
            for i, (case_id, vol, core) in enumerate(
                pool.map(write_case, jobs, chunksize=2), 1
            ):
                volumes[case_id] = (vol, core)
                if progress:
                    progress(i, len(jobs))
    return volumes


def write_oracle(
    folder: Path, patients: list[Patient], volumes: dict[str, tuple[float, float]]
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / POTENTIAL_OUTCOMES).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "case_id",
                "site",
                "cohort",
                "received",
                *(f"p_{r}" for r in REGIMENS),
                *(f"pCR_{r}" for r in REGIMENS),
                *(f"dfs_months_{r}" for r in REGIMENS),
                *(f"dfs_event_{r}" for r in REGIMENS),
            ]
        )
        for p in patients:
            w.writerow(
                [
                    p.case_id,
                    p.site,
                    p.cohort,
                    p.regimen,
                    *(f"{v:.6f}" for v in p.prob),
                    *(int(v) for v in p.outcomes),
                    *(f"{v:.1f}" for v in p.dfs_months),
                    *(int(v) for v in p.dfs_event),
                ]
            )
    with (folder / "latents.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "case_id",
                "site",
                "cohort",
                "biology",
                "size",
                "hypoxia",
                "core_fraction",
                "clinical_risk",
                "tumour_adc_mean",
                "heterogeneity",
                "target_volume_ml",
                "mask_volume_ml",
                "core_volume_ml",
            ]
        )
        for p in patients:
            vol, core = volumes.get(p.case_id, (None, None))
            w.writerow(
                [
                    p.case_id,
                    p.site,
                    p.cohort,
                    f"{p.biology:.5f}",
                    f"{p.size:.5f}",
                    f"{p.hypoxia:.5f}",
                    f"{p.core_fraction:.4f}",
                    f"{p.risk:.3f}",
                    f"{p.adc_mean:.4f}",
                    f"{p.heterogeneity:.4f}",
                    f"{np.exp(p.log_volume_ml):.3f}",
                    "" if vol is None else f"{vol:.3f}",
                    "" if core is None else f"{core:.3f}",
                ]
            )
