"""Write a synthetic multi-centre cohort to disk (``moefl synth``).

Layout written under ``OUT``::

    sites/DatasetNNN_<Site>/            nnU-Net raw dataset + clinical.csv, per site
    site_configs/<site>.yaml            a ready site YAML per retrospective site
    prospective/sites/...               the prospective cohort, same format
    prospective/site_configs/<site>.yaml
    test/sites/..., test/site_configs/  the held-out test cohort (every centre,
                                        the new one included): for quality
                                        claims only, never for training or
                                        threshold choice
    oracle/potential_outcomes.csv       true pCR probability, outcome and DFS
                                        per regimen (all three cohorts)
    oracle/latents.csv                  hidden tumour latents (never read by training)
    cohort.json                         counts, rates, geometry, AUCs, the
                                        oracle's scoreboard per cohort

The oracle folder sits apart from the site folders: nothing a site or the
federation reads points into it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from client.data.site_config import write_site_yaml
from shared_model.clinical import (
    CLINICAL_COLUMNS,
    CLINICAL_FEATURES,
    DFS_COLUMNS,
    REGIMENS,
)
from shared_model.errors import MoeflError
from shared_model.layout import (
    COHORT_RECORD,
    ORACLE,
    POTENTIAL_OUTCOMES,
    PROSPECTIVE,
    SITE_CONFIGS,
    SITE_DATASETS,
    TEST,
    cohort_part,
)
from shared_model.plan import PLAN_FILE, PRESET_PLANS
from simulations.cohort import Patient, build_cohort
from simulations.cohort_summary import compute_signal_aucs, dfs_summary, regimen_rates
from simulations.phantom import generate_case, scanner_grids
from simulations.response import WORLD_VERSION
from simulations.scoreboard import compute_scoreboard
from simulations.sites import (
    NCT_SITE,
    PRESETS,
    PUBLIC_STREAM,
    SITES,
    Geometry,
    Scanner,
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
OUTPUT_ENTRIES = (
    SITE_DATASETS,
    SITE_CONFIGS,
    PROSPECTIVE,
    TEST,
    ORACLE,
    COHORT_RECORD,
    PLAN_FILE,
)


@dataclass(frozen=True)
class SynthResult:
    """What :func:`synthesize` wrote and measured."""

    out: Path
    summary: dict[str, Any]
    seconds: float


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _write_case(
    args: tuple[Patient, Scanner, Geometry, str],
) -> tuple[str, float, float]:
    patient, scanner, geometry, dataset_dir = args
    case = generate_case(patient, scanner, geometry)
    root = Path(dataset_dir)
    _save_nifti(
        case.t2, case.affine, root / "imagesTr" / f"{patient.case_id}_0000.nii.gz"
    )
    _save_nifti(
        case.adc, case.affine, root / "imagesTr" / f"{patient.case_id}_0001.nii.gz"
    )
    _save_nifti(
        case.label, case.affine, root / "labelsTr" / f"{patient.case_id}.nii.gz"
    )
    return patient.case_id, case.tumour_volume_ml, case.core_volume_ml


def _write_clinical(patients: list[Patient], path: Path) -> None:
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


def _dataset_json(n: int, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "description": "moefl synthetic rectal MRI cohort (T2W + ADC on the T2W grid)",
        "channel_names": {"0": "T2", "1": "ADC"},
        "labels": {"background": 0, "tumour": 1},
        "numTraining": n,
        "file_ending": ".nii.gz",
    }


def _geometry_summary(scanner: Scanner, geometry: Geometry) -> dict[str, Any]:
    t2, adc = scanner_grids(scanner, geometry, np.zeros(3))
    t2_sp = np.sqrt((t2.affine[:3, :3] ** 2).sum(0))
    adc_sp = np.sqrt((adc.affine[:3, :3] ** 2).sum(0))
    return {
        "field_strength_t": scanner.field_t,
        "t2w_shape": list(t2.shape),
        "t2w_spacing_mm": [round(float(s), 3) for s in t2_sp],
        "adc_acquired_spacing_mm": [round(float(s), 3) for s in adc_sp],
        "adc_stored_on": "t2w grid (trilinear)",
        "adc_unit": scanner.adc_unit,
        "axcodes": scanner.axcodes,
        "oblique_deg": scanner.oblique_deg,
        "t2w_gain": scanner.t2_gain,
        "t2w_noise": scanner.noise,
        "bias_amplitude": scanner.bias,
    }


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        ours = [e for e in OUTPUT_ENTRIES if (out / e).exists()]
        others = [p.name for p in out.iterdir() if p.name not in OUTPUT_ENTRIES]
        if not force:
            raise MoeflError(
                f"{out} is not empty; pass --force to replace a previous `moefl synth` "
                f"output there, or choose an empty folder"
            )
        if others:
            raise MoeflError(
                f"{out} holds files that `moefl synth` did not write ({sorted(others)[:5]}); "
                "refusing to replace it even with --force: choose another folder"
            )
        for e in ours:
            target = out / e
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def synthesize(
    out: Path,
    *,
    preset: str = "demo",
    seed: int = 0,
    tables_only: bool = False,
    test_size: int | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> SynthResult:
    """Generate the cohort of ``preset`` under ``out``.

    Args:
        out: output folder; must be empty unless ``force`` (then only a previous
            synth output there is replaced).
        preset: "tiny", "demo" or "paper".
        seed: the cohort (tables and images) is a deterministic function of it.
        tables_only: write clinical tables, oracle and cohort.json only.
        test_size: patients in the held-out test cohort (default: the preset's,
            tiny 30, demo 400, paper 1000); the other cohorts do not change.
        workers: image-writing processes (default: the machine's cores).
        force: replace a previous synth output in ``out``.
        progress: called as ``progress(done, total)`` after each case.

    Returns:
        The summary that was written to ``cohort.json``.
    """
    import time

    if preset not in PRESETS:
        raise MoeflError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if test_size is not None and not 0 <= test_size <= 100_000:
        raise MoeflError(f"--test-size must be between 0 and 100000, not {test_size}")
    start = time.perf_counter()
    cfg = PRESETS[preset]
    out = Path(out)
    _prepare_out(out, force)
    world_seed = (
        int(np.random.SeedSequence([seed, PUBLIC_STREAM]).generate_state(1)[0])
        if cfg.public
        else seed
    )
    world = build_cohort(cfg, world_seed, test_size=test_size)
    PRESET_PLANS[preset].save(out / PLAN_FILE)

    jobs: list[tuple[Patient, Scanner, Geometry, str]] = []
    site_summaries: dict[str, dict[str, Any]] = {}
    for cohort, patients in world.cohorts().items():
        base = cohort_part(out, cohort)
        for site_name in cfg.counts(cohort, test_size):
            members = [p for p in patients if p.site == site_name]
            if not members:
                continue
            spec = SITES[site_name]
            folder = spec.dataset_folder(cohort)
            dataset_dir = base / SITE_DATASETS / folder
            (dataset_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
            (dataset_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
            _write_clinical(members, dataset_dir / "clinical.csv")
            key = site_name if cohort == "retrospective" else f"{site_name}/{cohort}"
            site_summaries[key] = {
                "cohort": cohort,
                "dataset": folder,
                "n": len(members),
                "by_regimen": regimen_rates(members),
                "geometry": _geometry_summary(spec.scanner, cfg.geometry),
            }
            if tables_only:
                shutil.rmtree(dataset_dir / "imagesTr")
                shutil.rmtree(dataset_dir / "labelsTr")
                continue
            (dataset_dir / "dataset.json").write_text(
                json.dumps(_dataset_json(len(members), folder), indent=2) + "\n"
            )
            cfg_dir = base / SITE_CONFIGS
            cfg_dir.mkdir(parents=True, exist_ok=True)
            role = "train" if cohort == "retrospective" else "evaluate"
            run_rel = (
                f"../runs/{site_name}"
                if cohort == "retrospective"
                else f"../runs/{site_name}_{cohort}"
            )
            write_site_yaml(
                cfg_dir / f"{site_name}.yaml",
                {
                    "site_name": site_name,
                    "role": role,
                    "dataset_dir": f"../sites/{folder}",
                    "adc_unit": spec.scanner.adc_unit,
                    "run_dir": run_rel,
                    "min_cases": cfg.min_cases if role == "train" else 1,
                },
                comment=f"Site config written by `moefl synth` ({cohort} cohort). "
                "Paths are relative\nto this file. Schema: site_configs/README.md "
                "in the moefl repository.",
            )
            jobs.extend(
                (p, spec.scanner, cfg.geometry, str(dataset_dir)) for p in members
            )

    volumes = _write_images(jobs, workers, progress)
    all_patients = [p for group in world.cohorts().values() for p in group]
    _write_oracle(out / ORACLE, all_patients, volumes)
    retro, prosp = world.retrospective, world.prospective
    summary: dict[str, Any] = {
        "preset": preset,
        "seed": seed,
        "public": cfg.public,
        "world_version": WORLD_VERSION,
        "tables_only": tables_only,
        "n_retrospective": len(retro),
        "n_prospective": len(prosp),
        "n_test": len(world.test),
        "nct_site": NCT_SITE,
        **{
            f"{cohort}_by_regimen": regimen_rates(patients)
            for cohort, patients in world.cohorts().items()
        },
        "sites": site_summaries,
        "clinical_prevalence": {
            f"{k}={v}": round(float(np.mean([p.clinical[k] == v for p in retro])), 3)
            for k, values in CLINICAL_FEATURES.items()
            for v in values
        },
    }
    if not cfg.public:  # a public cohort is for segmentation pretraining only
        summary["aucs"] = compute_signal_aucs(retro, prosp, seed)
        summary["scoreboard"] = compute_scoreboard(world)
        summary["dfs"] = dfs_summary(world)
    if volumes:
        all_vol = np.array([v[0] for v in volumes.values()])
        summary["tumour_volume_ml"] = {
            "median": round(float(np.median(all_vol)), 2),
            "p10": round(float(np.percentile(all_vol, 10)), 2),
            "p90": round(float(np.percentile(all_vol, 90)), 2),
        }
    seconds = time.perf_counter() - start
    summary["generation_seconds"] = round(seconds, 1)
    (out / COHORT_RECORD).write_text(json.dumps(summary, indent=2) + "\n")
    log.info("synthetic cohort %s written to %s in %.1f s", preset, out, seconds)
    return SynthResult(out=out, summary=summary, seconds=seconds)


def _write_images(
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
        results: Any = map(_write_case, jobs)
        for i, (case_id, vol, core) in enumerate(results, 1):
            volumes[case_id] = (vol, core)
            if progress:
                progress(i, len(jobs))
    else:
        with ProcessPoolExecutor(n_workers) as pool:
            for i, (case_id, vol, core) in enumerate(
                pool.map(_write_case, jobs, chunksize=2), 1
            ):
                volumes[case_id] = (vol, core)
                if progress:
                    progress(i, len(jobs))
    return volumes


def _write_oracle(
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
