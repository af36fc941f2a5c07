"""Benchmark: the federated plan of the paper preset against nnU-Net's pooled plan.

A benchmark, not a test: it prints what it measured and writes JSON.

    python -m simulations.benchmarks.planning            # paper preset, 760 cases
    python -m simulations.benchmarks.planning --quick    # 20 cases per site

nnU-Net v2 is a development dependency (``make venv`` installs it).

Target: the plan moefl derives from the training sites' merged fingerprints
equals nnU-Net v2's 3d_fullres plan of the same cases pooled, within
tolerance (target spacing within 10 % per axis, patch within one stride step
per axis).

1. A geometry-only copy of the preset's training sites (``--seed``): every
   case a NIfTI with exactly the shape and affine ``moefl synth`` gives it
   (:func:`simulations.phantom.case_grids`, the grid the phantom is imaged on)
   and the dtype the site exports, filled with a constant (T2W 100, ADC 1.0 x
   10^-3 mm^2/s) so nnU-Net's crop to the non-zero region keeps the whole
   image, a 5-voxel ball as the tumour mask (nnU-Net needs foreground), and
   the site folder, clinical table and site YAML ``moefl synth`` writes. The
   plan depends on the images' geometry alone (spacing, shape, orientation,
   the crop), and the copy is 28 MB where the rendered sites are 3.1 GB
   (0.7-1.2 M voxels a case; rendering them takes 9 minutes on two cores).
   ``--rendered`` renders them as ``moefl synth`` does instead: a check of
   the copy (the same plans, measured 2026-11-30).
2. moefl's exact plan: :func:`plan_from_fingerprint` of the merged
   :func:`site_fingerprint` of the sites (what ``moefl plan`` computes).
3. moefl's plan under DP: each site releases :meth:`Fingerprint.noised` at
   ``privacy.fingerprint_epsilon`` (delta 1e-5, noise from
   :func:`fingerprint_noise`), merged: ``--noise-seeds`` seeds shown, and
   ``--tally-seeds`` counted; and the plan from the DP-coarsened histograms
   without noise (what the coarsening alone does).
4. nnU-Net 2.8.1's own fingerprint extraction and default planner (8 GB) on
   the sites' cases pooled (:mod:`simulations.benchmarks.nnunet_reference`),
   and on each site alone (``--no-sites``: skip).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from client.data.site_config import SiteConfig, load_site_config, write_site_yaml
from shared_model.layout import SITE_CONFIGS, SITE_DATASETS
from simulations.benchmarks.common import MemorySampler, finish, process_tree
from simulations.benchmarks.nnunet_reference import (
    nnunet_settings,
)
from simulations.benchmarks.planning_plans import plans_alone, pooled_plans
from simulations.benchmarks.planning_table import planning_table
from simulations.cohort import Patient, build_cohort
from simulations.phantom import case_grids
from simulations.sites import PRESETS, SITES, Geometry, Scanner
from simulations.synth_files import (
    dataset_json,
    save_nifti,
    write_clinical,
    write_images,
)

T2_VALUE = 100
ADC_VALUE = 1.0  # 10^-3 mm^2/s
BLOB_RADIUS = 5  # voxels


def _blob(shape: tuple[int, int, int]) -> np.ndarray:
    """A ball of :data:`BLOB_RADIUS` voxels (the slice axis: 2) at the centre."""
    idx = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape, np.float32) - 1) / 2
    scale = np.array([1.0, 1.0, 2.5], np.float32)[:, None, None, None]
    r2 = (((idx - centre[:, None, None, None]) / scale) ** 2).sum(0)
    return (r2 <= BLOB_RADIUS**2).astype(np.uint8)


def _write_geometry_case(
    patient: Patient, scanner: Scanner, geometry: Geometry, dataset_dir: Path
) -> tuple[tuple[int, int, int], tuple[float, ...]]:
    """One case of the geometry-only copy; returns its shape and spacing."""
    grid, _ = case_grids(patient, scanner, geometry)
    t2 = np.full(grid.shape, T2_VALUE, np.int16)
    if scanner.adc_unit == "1e-6":
        adc: np.ndarray = np.full(grid.shape, round(ADC_VALUE * 1000), np.int16)
    else:
        adc = np.full(grid.shape, ADC_VALUE, np.float32)
    images = dataset_dir / "imagesTr"
    save_nifti(t2, grid.affine, images / f"{patient.case_id}_0000.nii.gz")
    save_nifti(adc, grid.affine, images / f"{patient.case_id}_0001.nii.gz")
    label = dataset_dir / "labelsTr" / f"{patient.case_id}.nii.gz"
    save_nifti(_blob(grid.shape), grid.affine, label)
    spacing = np.linalg.norm(grid.affine[:3, :3], axis=0)
    return grid.shape, tuple(round(float(s), 4) for s in spacing)


def write_sites(
    out: Path,
    preset: str,
    seed: int,
    cases: int | None,
    *,
    rendered: bool = False,
    workers: int = 1,
) -> tuple[list[SiteConfig], dict[str, Any]]:
    """The geometry-only copy of ``preset``'s training sites under ``out``
    (module docstring, step 1); ``cases``: at most that many per site (the
    first by case id). ``rendered``: the phantom's images instead, as ``moefl
    synth`` writes them (``workers`` processes). Returns the site configs and
    what was written."""
    cfg = PRESETS[preset]
    world = build_cohort(cfg, seed)
    configs, written = [], {}
    for site_name in cfg.retrospective:
        spec = SITES[site_name]
        members = sorted(
            (p for p in world.retrospective if p.site == site_name),
            key=lambda p: p.case_id,
        )[:cases]
        folder = spec.dataset_folder("retrospective")
        dataset_dir = out / SITE_DATASETS / folder
        (dataset_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
        (dataset_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
        write_clinical(members, dataset_dir / "clinical.csv")
        (dataset_dir / "dataset.json").write_text(
            json.dumps(dataset_json(len(members), folder), indent=2) + "\n"
        )
        shapes, spacings = set(), set()
        if rendered:
            jobs = [(p, spec.scanner, cfg.geometry, str(dataset_dir)) for p in members]
            write_images(jobs, workers, None)
        for p in members:
            if rendered:
                grid, _ = case_grids(p, spec.scanner, cfg.geometry)
                spacing = np.linalg.norm(grid.affine[:3, :3], axis=0)
                shape = grid.shape
                spacing_mm = tuple(round(float(s), 4) for s in spacing)
            else:
                shape, spacing_mm = _write_geometry_case(
                    p, spec.scanner, cfg.geometry, dataset_dir
                )
            shapes.add(shape)
            spacings.add(spacing_mm)
        yaml_path = write_site_yaml(
            out / SITE_CONFIGS / f"{site_name}.yaml",
            {
                "site_name": site_name,
                "role": "train",
                "dataset_dir": f"../sites/{folder}",
                "adc_unit": spec.scanner.adc_unit,
                "run_dir": f"../runs/{site_name}",
                "min_cases": 1,
            },
            comment="A synthetic site for the planning benchmark.",
        )
        configs.append(load_site_config(yaml_path))
        written[site_name] = {
            "cases": len(members),
            "voxel_shapes": sorted(list(s) for s in shapes),
            "voxel_spacings_mm": sorted(list(s) for s in spacings),
            "axcodes": spec.scanner.axcodes,
            "oblique_deg": spec.scanner.oblique_deg,
            "adc_unit": spec.scanner.adc_unit,
        }
    return configs, written


class PssSampler(MemorySampler):
    """:class:`MemorySampler` with proportional set sizes: nnU-Net lists a
    dataset's files in 12 forked processes, whose copy-on-write pages a sum of
    resident set sizes counts once per process; ``peak_total_mib`` here is the
    largest sum of PSS (shared pages divided among their processes)."""

    def __init__(self, root: int | None = None, interval: float = 0.5) -> None:
        self.peak_pss_mib = 0.0
        super().__init__(root, interval)

    def sample(self) -> None:
        super().sample()
        total = 0
        for pid in process_tree(self.root):
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        self.peak_pss_mib = max(self.peak_pss_mib, total / 1024)


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    cases = 20 if args.quick and args.cases is None else args.cases
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; choose an empty or new folder")
    args.out.mkdir(parents=True, exist_ok=True)
    # nnU-Net reads its folders when first imported: set them first
    os.environ.update(nnunet_settings(args.out / "nnunet"))
    log = args.out / "nnunet.log"

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    memory = PssSampler()
    with memory:
        t0 = time.perf_counter()
        configs, written = write_sites(
            args.out / "cohort",
            args.preset,
            args.seed,
            cases,
            rendered=args.rendered,
            workers=args.workers,
        )
        seconds["write_sites"] = round(time.perf_counter() - t0, 1)
        pooled = pooled_plans(args, configs, log, seconds)
        sites: dict[str, Any] = {}
        if not args.no_sites:
            sites = plans_alone(args, configs, pooled.fingerprints, log, seconds)
    seconds["total"] = round(time.perf_counter() - start, 1)

    result: dict[str, Any] = {
        "preset": args.preset,
        "seed": args.seed,
        "images": "rendered" if args.rendered else "geometry-only",
        "cases_per_site_cap": cases,
        "n_cases": pooled.merged.n_cases,
        "sites_written": written,
        "pooled": pooled.summary(),
        "dp": pooled.dp,
        "sites": sites,
        "seconds": seconds,
        "peak_pss_mib": round(memory.peak_pss_mib),
        "peak_rss_sum_mib": round(memory.peak_total_mib or 0.0),
        "peak_process_mib": round(memory.peak_process_mib or 0.0),
    }
    args.json = args.json or args.out / "planning.json"
    finish(args, "planning", planning_table(result), result)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, help="at most this many cases per site")
    parser.add_argument(
        "--quick", action="store_true", help="20 cases per site (a minute or two)"
    )
    parser.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 0.5])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--noise-seeds", type=int, default=5, help="DP plans shown in full"
    )
    parser.add_argument(
        "--tally-seeds",
        type=int,
        default=1000,
        help="DP plans counted (within tolerance, equal to the exact plan)",
    )
    parser.add_argument(
        "--no-sites", action="store_true", help="skip nnU-Net's plan of each site alone"
    )
    parser.add_argument(
        "--rendered",
        action="store_true",
        help="the phantom's images as `moefl synth` renders them, not the "
        "geometry-only copy (a check of the copy; slow at full size)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="processes for nnU-Net's fingerprint and for rendering",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_planning"))
    parser.add_argument(
        "--json", type=Path, help="write the results here (OUT/planning.json)"
    )
    return parser


if __name__ == "__main__":
    main()
