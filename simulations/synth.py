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

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.data.site_config import write_site_yaml
from shared_model.clinical import CLINICAL_FEATURES
from shared_model.errors import MoeflError
from shared_model.layout import (
    COHORT_RECORD,
    ORACLE,
    PROSPECTIVE,
    SITE_CONFIGS,
    SITE_DATASETS,
    TEST,
    cohort_part,
)
from shared_model.plan import PLAN_FILE, PRESET_PLANS
from simulations.cohort import Patient, World, build_cohort
from simulations.cohort_summary import compute_signal_aucs, dfs_summary, regimen_rates
from simulations.phantom import scanner_grids
from simulations.response import WORLD_VERSION
from simulations.scoreboard import compute_scoreboard
from simulations.sites import (
    NCT_SITE,
    PRESETS,
    PUBLIC_STREAM,
    SITES,
    Geometry,
    Preset,
    Scanner,
    SiteSpec,
)
from simulations.synth_files import (
    Progress,
    dataset_json,
    write_clinical,
    write_images,
    write_oracle,
)

log = logging.getLogger(__name__)

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


Job = tuple[Patient, Scanner, Geometry, str]


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

    _check_arguments(preset, test_size)
    start = time.perf_counter()
    cfg = PRESETS[preset]
    out = Path(out)
    _prepare_out(out, force)
    world = build_cohort(cfg, _world_seed(cfg, seed), test_size=test_size)
    PRESET_PLANS[preset].save(out / PLAN_FILE)

    jobs: list[Job] = []
    site_summaries: dict[str, dict[str, Any]] = {}
    for cohort, patients in world.cohorts().items():
        base = cohort_part(out, cohort)
        for site_name in cfg.counts(cohort, test_size):
            members = [p for p in patients if p.site == site_name]
            if not members:
                continue
            key = site_name if cohort == "retrospective" else f"{site_name}/{cohort}"
            site_summaries[key], site_jobs = _write_site(
                base, cohort, site_name, members, cfg, tables_only
            )
            jobs.extend(site_jobs)

    volumes = write_images(jobs, workers, progress)
    all_patients = [p for group in world.cohorts().values() for p in group]
    write_oracle(out / ORACLE, all_patients, volumes)
    summary = _summary(world, cfg, preset, seed, tables_only, site_summaries, volumes)
    seconds = time.perf_counter() - start
    summary["generation_seconds"] = round(seconds, 1)
    (out / COHORT_RECORD).write_text(json.dumps(summary, indent=2) + "\n")
    log.info("synthetic cohort %s written to %s in %.1f s", preset, out, seconds)
    return SynthResult(out=out, summary=summary, seconds=seconds)


def _check_arguments(preset: str, test_size: int | None) -> None:
    if preset not in PRESETS:
        raise MoeflError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if test_size is not None and not 0 <= test_size <= 100_000:
        raise MoeflError(f"--test-size must be between 0 and 100000, not {test_size}")


def _world_seed(cfg: Preset, seed: int) -> int:
    """The seed of the drawn world: a public cohort draws from its own stream."""
    if not cfg.public:
        return seed
    return int(np.random.SeedSequence([seed, PUBLIC_STREAM]).generate_state(1)[0])


def _write_site(
    base: Path,
    cohort: str,
    site_name: str,
    members: list[Patient],
    cfg: Preset,
    tables_only: bool,
) -> tuple[dict[str, Any], list[Job]]:
    """Write one site's dataset folder and site YAML; its summary and image jobs."""
    spec = SITES[site_name]
    folder = spec.dataset_folder(cohort)
    dataset_dir = base / SITE_DATASETS / folder
    (dataset_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dataset_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    write_clinical(members, dataset_dir / "clinical.csv")
    summary = {
        "cohort": cohort,
        "dataset": folder,
        "n": len(members),
        "by_regimen": regimen_rates(members),
        "geometry": _geometry_summary(spec.scanner, cfg.geometry),
    }
    if tables_only:
        shutil.rmtree(dataset_dir / "imagesTr")
        shutil.rmtree(dataset_dir / "labelsTr")
        return summary, []
    (dataset_dir / "dataset.json").write_text(
        json.dumps(dataset_json(len(members), folder), indent=2) + "\n"
    )
    _write_site_config(base / SITE_CONFIGS, cohort, site_name, spec, folder, cfg)
    jobs = [(p, spec.scanner, cfg.geometry, str(dataset_dir)) for p in members]
    return summary, jobs


def _write_site_config(
    cfg_dir: Path,
    cohort: str,
    site_name: str,
    spec: SiteSpec,
    folder: str,
    cfg: Preset,
) -> None:
    """The ready site YAML: retrospective sites train, the others evaluate."""
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


def _summary(
    world: World,
    cfg: Preset,
    preset: str,
    seed: int,
    tables_only: bool,
    site_summaries: dict[str, dict[str, Any]],
    volumes: dict[str, tuple[float, float]],
) -> dict[str, Any]:
    """What ``cohort.json`` records (all but the generation time)."""
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
    return summary
