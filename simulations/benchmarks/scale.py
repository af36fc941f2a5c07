"""Benchmark: how a simulated federation's time and memory grow with sites.

A benchmark, not a test: it prints what it measured and writes JSON.

    python -m simulations.benchmarks.scale --cohort demo_run/cohort   # 3/10/30 sites
    python -m simulations.benchmarks.scale --quick                    # tiny cohort

Two series on one synthetic cohort's retrospective patients:

- sites: the same patients dealt to 3, 10 and 30 sites (constant total). Each
  new site draws its patients from one original centre (so it keeps that
  scanner and ADC unit); centres get sites in proportion to their size and
  deal their patients round-robin within each regimen. At 3 sites this is the
  original cohort.
- patients per site: 3 sites with the first k patients of each centre, for
  growing k.

Each configuration runs ``rounds`` rounds (training and the federated
evaluation every round) in its own process, so its memory is its own; the
parent samples the resident memory of that process and everything it starts
(Ray's processes included). Round 1 loads and caches each site's data; later
rounds are warm.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from client.data.site_config import write_site_yaml
from shared_model.layout import COHORT_RECORD, SITE_CONFIGS, SITE_DATASETS, site_yamls
from shared_model.messages import COUNT_KEYS, SHARED
from shared_model.plan import PLAN_FILE
from simulations.benchmarks.common import (
    MemorySampler,
    benchmark_parser,
    finish,
    write_json,
)


def _read_site(yaml_path: Path) -> tuple[dict[str, Any], Path, list[dict[str, str]]]:
    raw = yaml.safe_load(yaml_path.read_text())
    dataset = (yaml_path.parent / raw["dataset_dir"]).resolve()
    with (dataset / "clinical.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return raw, dataset, rows


def _allocate(sizes: dict[str, int], n_sites: int) -> dict[str, int]:
    """Sites per centre in proportion to its patients (largest remainder), >= 1."""
    if n_sites < len(sizes):
        raise ValueError(f"{n_sites} sites cannot keep {len(sizes)} centres apart")
    total = sum(sizes.values())
    exact = {c: n_sites * s / total for c, s in sizes.items()}
    alloc = {c: max(1, int(x)) for c, x in exact.items()}
    order = sorted(sizes, key=lambda c: exact[c] - int(exact[c]), reverse=True)
    i = 0
    while sum(alloc.values()) < n_sites:
        alloc[order[i % len(order)]] += 1
        i += 1
    while sum(alloc.values()) > n_sites:
        big = max((c for c in alloc if alloc[c] > 1), key=lambda c: alloc[c])
        alloc[big] -= 1
    return alloc


def partition_cohort(
    source: Path,
    dest: Path,
    *,
    n_sites: int | None = None,
    per_site: int | None = None,
    seed: int = 0,
    min_cases: int = 2,
) -> list[Path]:
    """Re-deal a cohort's retrospective patients to new sites; return their YAMLs.

    ``n_sites``: all patients, dealt to that many sites (see the module doc).
    ``per_site``: one site per centre with its first ``per_site`` patients
    (in a seeded shuffle). Images are symbolic links to the source's files
    (each site YAML names the source's dataset folder under ``image_roots``);
    each new site has its own clinical table, ``dataset.json`` and run folder
    (so its own split). ``dest`` gets the source's ``plan.json`` and a
    ``cohort.json`` that names the source.
    """
    source, dest = Path(source).resolve(), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    (dest / SITE_CONFIGS).mkdir(parents=True)
    shutil.copy(source / PLAN_FILE, dest / PLAN_FILE)
    centres = {p.stem: _read_site(p) for p in site_yamls(source)}
    rng = np.random.default_rng(seed)
    if n_sites is not None:
        alloc = _allocate({c: len(v[2]) for c, v in centres.items()}, n_sites)
    else:
        alloc = dict.fromkeys(centres, 1)
    yamls = []
    for centre, (raw, dataset, rows) in centres.items():
        rows = [rows[i] for i in rng.permutation(len(rows))]
        if per_site is not None:
            if per_site > len(rows):
                raise ValueError(f"{centre} has {len(rows)} patients, not {per_site}")
            rows = rows[:per_site]
        dealt = _deal_by_regimen(rows, alloc[centre])
        meta = json.loads((dataset / "dataset.json").read_text())
        for k, part in enumerate(dealt):
            name = f"{centre}_{k:02d}" if len(dealt) > 1 else centre
            _write_linked_dataset(dest / SITE_DATASETS / name, part, dataset, meta)
            site_yaml = dest / SITE_CONFIGS / f"{name}.yaml"
            write_site_yaml(
                site_yaml,
                {
                    "site_name": name,
                    "role": "train",
                    "dataset_dir": f"../sites/{name}",
                    "adc_unit": raw["adc_unit"],
                    "run_dir": f"../runs/{name}",
                    "min_cases": min_cases,
                    "image_roots": [str(dataset.resolve())],  # the links' targets
                },
            )
            yamls.append(site_yaml)
    summary = json.loads((source / COHORT_RECORD).read_text())
    summary |= {
        "partition_of": str(source),
        "n_sites": len(yamls),
        "per_site": per_site,
        "n_retrospective": sum(
            len(list((dest / SITE_DATASETS / p.stem / "imagesTr").iterdir())) // 2
            for p in yamls
        ),
    }
    (dest / COHORT_RECORD).write_text(json.dumps(summary, indent=1))
    return sorted(yamls)


def _deal_by_regimen(
    rows: list[dict[str, str]], n_parts: int
) -> list[list[dict[str, str]]]:
    """Deal the patients to ``n_parts`` sites in turn, regimen by regimen, so
    each site gets its share of every regimen."""
    by_regimen: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_regimen[row["regimen"]].append(row)
    dealt: list[list[dict[str, str]]] = [[] for _ in range(n_parts)]
    i = 0
    for regimen in sorted(by_regimen):
        for row in by_regimen[regimen]:
            dealt[i % len(dealt)].append(row)
            i += 1
    return dealt


def _write_linked_dataset(
    folder: Path, part: list[dict[str, str]], dataset: Path, meta: dict[str, Any]
) -> None:
    """A site's dataset folder: links to the source's images and labels, its
    own clinical table and ``dataset.json``."""
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    for row in sorted(part, key=lambda r: r["case_id"]):
        cid = row["case_id"]
        for ch in ("0000", "0001"):
            img = f"{cid}_{ch}{meta['file_ending']}"
            (folder / "imagesTr" / img).symlink_to(dataset / "imagesTr" / img)
        lab = dataset / "labelsTr" / f"{cid}{meta['file_ending']}"
        if lab.exists():
            (folder / "labelsTr" / lab.name).symlink_to(lab)
    with (folder / "clinical.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(part[0]))
        writer.writeheader()
        writer.writerows(sorted(part, key=lambda r: r["case_id"]))
    (folder / "dataset.json").write_text(
        json.dumps({**meta, "numTraining": len(part)}, indent=1)
    )


def run_one(folder: Path, rounds: int, quick: bool) -> dict[str, Any]:
    """One configuration's simulated federation (in this process)."""
    from simulations.simulate import run_simulated_federation

    overrides: dict[str, Any] = {"num-server-rounds": rounds, "seed": 0}
    if quick:
        overrides |= {"base-filters": 4, "max-filters": 32}
    t0 = time.perf_counter()
    record = run_simulated_federation(folder, overrides=overrides)
    wall = time.perf_counter() - t0
    rounds_s = [r["seconds"] for r in record["rounds"]]
    first = record["rounds"][0]
    return {
        "sites": len(first["sites"]),
        "patients_train": sum(m[COUNT_KEYS[SHARED]] for m in first["sites"].values()),
        "round_seconds": rounds_s,
        "wall_seconds": round(wall, 1),
        "site_train_seconds": [
            round(sum(m["seconds"] for m in r["sites"].values()), 2)
            for r in record["rounds"]
        ],
        "val_auc": record["rounds"][-1].get("evaluate", {}).get("auc"),
    }


def measure(folder: Path, rounds: int, quick: bool) -> dict[str, Any]:
    """Run one configuration in a child process and sample its memory."""
    cmd = [
        sys.executable,
        "-m",
        "simulations.benchmarks.scale",
        "--one",
        str(folder),
        "--rounds",
        str(rounds),
    ] + (["--quick"] if quick else [])
    result_path = folder / "scale_one.json"
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    with MemorySampler(root=proc.pid) as mem:
        code = proc.wait()
    if code != 0 or not result_path.is_file():
        raise RuntimeError(f"{' '.join(cmd)} failed with exit status {code}")
    result: dict[str, Any] = json.loads(result_path.read_text())
    result["peak_rss_total_mib"] = mem.peak_total_mib
    result["peak_rss_process_mib"] = mem.peak_process_mib
    return result


def run_scale(
    out: Path,
    *,
    cohort: Path | None,
    quick: bool,
    sites: list[int],
    per_site: list[int],
    rounds: int,
) -> dict[str, Any]:
    from simulations.synth import synthesize

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cohort is None:
        cohort = out / "source"
        if not (cohort / COHORT_RECORD).is_file():
            synthesize(cohort, preset="tiny" if quick else "demo", seed=0, force=True)
    sizes = {p.stem: len(_read_site(p)[2]) for p in site_yamls(Path(cohort))}
    smallest = min(sizes, key=lambda c: sizes[c])
    if per_site and max(per_site) > sizes[smallest]:
        raise SystemExit(
            f"--per-site {max(per_site)}: centre {smallest} of {cohort} has only "
            f"{sizes[smallest]} patients; choose values up to {sizes[smallest]}"
        )
    result: dict[str, Any] = {"source": str(Path(cohort).resolve()), "rounds": rounds}
    for label, values, key in (
        ("by_sites", sites, "n_sites"),
        ("by_patients_per_site", per_site, "per_site"),
    ):
        rows = []
        for value in values:
            folder = out / f"{label}_{value}"
            partition_cohort(cohort, folder / "cohort", **{key: value})
            print(f"{label} = {value}: running {rounds} rounds ...", flush=True)
            row = {key: value, **measure(folder, rounds, quick)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        result[label] = rows
    return result


def table(result: dict[str, Any]) -> str:
    lines = [
        "| sites | train patients | per site | round 1 s | warm round s | "
        "sites' own training s (warm) | peak RSS, all processes (MiB) | "
        "largest process (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in ("by_sites", "by_patients_per_site"):
        for row in result.get(label, []):
            r = row["round_seconds"]
            warm = sum(r[1:]) / len(r[1:]) if len(r) > 1 else r[0]
            own = row["site_train_seconds"]
            own_warm = sum(own[1:]) / len(own[1:]) if len(own) > 1 else own[0]
            total = row["peak_rss_total_mib"]
            single = row["peak_rss_process_mib"]
            lines.append(
                f"| {row['sites']} | {row['patients_train']} | "
                f"{row['patients_train'] / row['sites']:.1f} | {r[0]:.1f} | {warm:.1f} | "
                f"{own_warm:.1f} | {'n/a' if total is None else f'{total:.0f}'} | "
                f"{'n/a' if single is None else f'{single:.0f}'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, "scale", "tiny cohort, fewer sites")
    parser.add_argument("--sites", type=int, nargs="*")
    parser.add_argument("--per-site", type=int, nargs="*")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    if args.one is not None:
        write_json(
            args.one / "scale_one.json", run_one(args.one, args.rounds, args.quick)
        )
        return
    sites = args.sites or ([3, 10] if args.quick else [3, 10, 30])
    per_site = args.per_site or ([4, 7, 10] if args.quick else [8, 16, 32, 48])
    result = run_scale(
        args.out,
        cohort=args.cohort,
        quick=args.quick,
        sites=sites,
        per_site=per_site,
        rounds=args.rounds,
    )
    finish(args, "scale", table(result), result)


if __name__ == "__main__":
    main()
