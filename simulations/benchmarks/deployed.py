"""Benchmark: a deployed round against the simulated round with the same settings.

A benchmark, not a test: it prints what it measured and writes JSON.

    python -m simulations.benchmarks.deployed --cohort demo_run/cohort   # 4 rounds
    python -m simulations.benchmarks.deployed --quick                    # tiny cohort

The same joint run (every round trains the whole network for a fixed number of
local steps, then evaluates) three ways on one cohort, each on its own copy of
the sites (so no run finds another's caches):

- simulated: Flower's simulation runtime (``moefl simulate``);
- deployed, Flower's ClientApp processes: a SuperLink with TLS and node
  authentication on 127.0.0.1, three registered SuperNodes in their default
  ``--isolation subprocess`` (a fresh ``flwr-clientapp`` process per message);
- deployed, pinned: the same SuperNodes in ``--isolation process`` with app
  pinning's launcher (``moefl pinned-clientapp``), whose task processes fork
  from a fork server that has imported PyTorch, MONAI and Flower.

The pinned deployment then runs again on the same sites (a second run: the
sites' preprocessed volumes are on disk), to compare its first round with its
warm rounds. Reported: each round's seconds (the coordinator's, from sending
the round's messages to saving its checkpoint), the warm mean (rounds after the
first) and its ratio to the simulated warm mean. Run it alone: on two cores
anything else running is in the numbers.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from server.run_folder import RUN_RECORD, read_run_record
from shared_model.layout import SITE_CONFIGS, SITE_DATASETS
from shared_model.plan import PLAN_FILE
from simulations.benchmarks.common import benchmark_parser, finish

Echo = Callable[[str], None]
SITES = ("sah_sysu", "sysucc", "west_china")


def _run_config(
    cohort: Path,
    run_dir: Path,
    rounds: int,
    quick: bool,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        **(extra or {}),
        "num-server-rounds": rounds,
        "training": "joint",
        "local-steps": 2,
        "evaluate-every": 1,
        "min-sites": len(SITES),
        "round-timeout": 900,
        "plan": str((cohort / PLAN_FILE).resolve()),
        "run-dir": str(run_dir),
        "seed": 0,
        **({"base-filters": 4, "max-filters": 32} if quick else {}),
    }


def _flower_config(config: dict[str, Any]) -> str:
    """A run config as ``flwr run --run-config`` takes it."""
    parts = []
    for k, v in config.items():
        if isinstance(v, str):
            parts.append(f"{k}='{v}'")
        elif isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def _sites_copy(cohort: Path, dst: Path, approved: str | None) -> dict[str, Path]:
    """A private copy of the cohort's training sites; their YAMLs (approving the
    app ``approved`` when given) by site name."""
    import yaml

    from client.data.site_config import write_site_yaml

    shutil.copytree(cohort / SITE_DATASETS, dst / SITE_DATASETS)
    yamls = {}
    (dst / SITE_CONFIGS).mkdir()
    for site in SITES:
        raw = yaml.safe_load((cohort / SITE_CONFIGS / f"{site}.yaml").read_text())
        raw["dataset_dir"] = str(
            dst / SITE_DATASETS / Path(str(raw["dataset_dir"])).name
        )
        raw["run_dir"] = str(dst / "runs" / site)
        if approved:
            raw["approved_apps"] = [approved]
        yamls[site] = dst / SITE_CONFIGS / f"{site}.yaml"
        write_site_yaml(yamls[site], raw)
    return yamls


def _rounds(record: dict[str, Any]) -> list[float]:
    return [float(r["seconds"]) for r in record.get("rounds", [])]


def run_simulated(cohort: Path, root: Path, rounds: int, quick: bool) -> list[float]:
    from simulations.simulate import run_flower_simulation

    yamls = _sites_copy(cohort, root, None)
    config = _run_config(cohort, root / "run", rounds, quick)
    config["sites-dir"] = str(next(iter(yamls.values())).parent)
    run_flower_simulation(config, len(yamls))
    return _rounds(read_run_record(root / "run"))


def run_deployed(
    cohort: Path,
    root: Path,
    rounds: int,
    quick: bool,
    *,
    pinned: bool,
    runs: int = 1,
    site_threads: int = 0,
    extra: Mapping[str, Any] | None = None,
    echo: Echo = print,
) -> list[list[float]]:
    """``runs`` runs of one deployment on one copy of the sites; each run's
    round seconds. ``extra``: more run-config keys."""
    from client.node.app_approval import app_hash
    from server.deploy import make_site_key
    from simulations.local_deployment import ROOT, LocalDeployment

    root.mkdir(parents=True)
    yamls = _sites_copy(cohort, root, app_hash(ROOT) if pinned else None)
    dep = LocalDeployment(root)
    if site_threads:  # PyTorch's threads per site process (0: its default)
        dep.env["OMP_NUM_THREADS"] = str(site_threads)
    out = []
    try:
        dep.superlink()
        for site, site_yaml in yamls.items():
            _, pub = make_site_key(root / "keys", site)
            reg = dep.flwr("supernode", "register", str(pub), "test", "--name", site)
            if reg.returncode != 0:
                raise RuntimeError(reg.stdout + reg.stderr)
            dep.supernode(site, root / "keys" / f"{site}.key", site_yaml, pinned=pinned)
        for k in range(runs):
            run_dir = root / f"run{k}"
            config = _flower_config(_run_config(cohort, run_dir, rounds, quick, extra))
            launcher = subprocess.run(
                [str(Path(dep.env["PATH"].split(":")[0]) / "flwr"), "run", str(ROOT)]
                + ["test", "--run-config", config, "--stream"],
                env={**dep.env, "FLWR_HOME": str(dep.cli_home)},
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=900 * (rounds + 1),
                check=False,
            )
            metrics = run_dir / RUN_RECORD
            record = read_run_record(run_dir) if metrics.exists() else {}
            if record.get("status") != "finished":
                raise RuntimeError(
                    f"deployed run {k} did not finish: {record.get('error')}\n"
                    + launcher.stdout[-2000:]
                    + dep.log("superlink")[-2000:]
                )
            out.append(_rounds(record))
            echo(f"  run {k}: rounds {out[-1]} s")
    finally:
        dep.stop()
    return out


def _warm(seconds: list[float]) -> float:
    return statistics.mean(seconds[1:]) if len(seconds) > 1 else float("nan")


def run_benchmark(
    out: Path,
    *,
    cohort: Path | None,
    quick: bool,
    rounds: int,
    site_threads: int = 0,
    echo: Echo = print,
) -> dict[str, Any]:
    from simulations.synth import synthesize

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cohort_dir = out / "cohort"
    if cohort is not None:
        cohort_dir.symlink_to(Path(cohort).resolve())
    else:
        preset = "tiny" if quick else "demo"
        echo(f"making the {preset} cohort in {cohort_dir} ...")
        synthesize(cohort_dir, preset=preset, seed=0, force=True)
    result: dict[str, Any] = {
        "rounds": rounds,
        "quick": quick,
        "site_threads": site_threads,
    }
    t0 = time.perf_counter()
    echo("simulated ...")
    result["simulated"] = {
        "rounds": run_simulated(cohort_dir, out / "sim", rounds, quick)
    }
    echo("deployed, Flower's ClientApp processes ...")
    flower = run_deployed(
        cohort_dir, out / "flower", rounds, quick, pinned=False, echo=echo
    )
    result["deployed_flower"] = {"rounds": flower[0]}
    echo("deployed, pinned (fork server), two runs on the same sites ...")
    pinned = run_deployed(
        cohort_dir,
        out / "pinned",
        rounds,
        quick,
        pinned=True,
        runs=2,
        site_threads=site_threads,
        echo=echo,
    )
    result["deployed_pinned"] = {"rounds": pinned[0]}
    result["deployed_pinned_second_run"] = {"rounds": pinned[1]}
    base = _warm(result["simulated"]["rounds"])
    for entry in result.values():
        if isinstance(entry, dict) and "rounds" in entry:
            entry["warm_mean"] = round(_warm(entry["rounds"]), 2)
            entry["warm_ratio"] = round(_warm(entry["rounds"]) / base, 2)
            entry["first"] = entry["rounds"][0]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def report(result: dict[str, Any]) -> str:
    lines = [
        "| run | round 1 (s) | warm rounds (s) | warm mean (s) | x simulated |",
        "|---|---|---|---|---|",
    ]
    names = {
        "simulated": "simulated",
        "deployed_flower": "deployed, Flower's ClientApp processes",
        "deployed_pinned": "deployed, pinned (fork server)",
        "deployed_pinned_second_run": "deployed, pinned, second run",
    }
    for key, name in names.items():
        e = result[key]
        warm = ", ".join(f"{s:.1f}" for s in e["rounds"][1:])
        lines.append(
            f"| {name} | {e['first']:.1f} | {warm} | {e['warm_mean']:.1f} | "
            f"{e['warm_ratio']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, "deployed", "tiny cohort, small widths")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--site-threads",
        type=int,
        default=0,
        help="PyTorch threads per deployed site process (OMP_NUM_THREADS; 0: "
        "PyTorch's default, every core, so three sites on one machine oversubscribe it)",
    )
    args = parser.parse_args(argv)
    result = run_benchmark(
        args.out,
        cohort=args.cohort,
        quick=args.quick,
        rounds=args.rounds,
        site_threads=args.site_threads,
    )
    finish(args, "deployed", report(result), result)


if __name__ == "__main__":
    main()
