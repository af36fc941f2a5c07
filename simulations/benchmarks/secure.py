"""Benchmark: what secure aggregation costs, in Flower's simulation and (quick)
in the local TLS deployment.

A benchmark, not a test: it prints what it measured and writes JSON.

    python -m simulations.benchmarks.secure --quick     # tiny cohort, 1 minute
    python -m simulations.benchmarks.secure --quick --deployed   # and deployed, 12 min
    python -m simulations.benchmarks.secure             # demo cohort, 18 min

Three runs with the same settings on their own copies of one cohort: plain,
secure aggregation (``secure-aggregation``), and secure aggregation with
distributed DP (``client-dp-noise-multiplier`` added by the sites). All clip
each site's update to the same ``client-dp-clip`` (the plain run at the
server), large enough not to bind. Reported per run: each round's seconds
(the coordinator's, from the first wave to the saved checkpoint) and the warm
mean (rounds after the first, which prepares the sites' volumes), the message
waves per round, the bytes each site sent per round, and the quantization
bound; the secure run's largest weight difference from the plain run after
round 1. The full version runs the demo's whole job (segmentation rounds, the
Newton fit of the heads, evaluation) plain and secure and compares their
held-out test AUC; ``--quick`` instead runs the tiny cohort's joint rounds,
and ``--deployed`` adds plain and secure runs deployed (SuperLink with TLS,
three SuperNodes in Flower's ClientApp processes).
Run it alone: on two cores anything else running is in the numbers.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from server.run_folder import read_run_record
from simulations.benchmarks.common import benchmark_parser, finish

CLIP = 1000.0
QUICK: dict[str, Any] = {
    "training": "joint",
    "base-filters": 4,
    "max-filters": 32,
    "local-steps": 2,
    "evaluate-every": 0,
}
MODES: dict[str, dict[str, Any]] = {
    "plain": {},
    "secure": {"secure-aggregation": True},
    "secure_ddp": {
        "secure-aggregation": True,
        "client-dp-noise-multiplier": 0.3,
        "client-dp-clip": 1.0,
    },
}


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    rounds = record["rounds"]
    seconds = [float(r["seconds"]) for r in rounds]
    up = [
        statistics.mean(s["bytes_up"] for s in r["sites"].values())
        for r in rounds
        if r["sites"]
    ]
    secure = [r.get("secure_aggregation") or {} for r in rounds]
    return {
        "seconds": seconds,
        "warm_mean": round(statistics.mean(seconds[1:]), 2)
        if len(seconds) > 1
        else None,
        "waves": secure[0].get("waves", 1),
        "bytes_up_per_site": round(statistics.mean(up)) if up else None,
        "quantization_bound": secure[0].get("quantization_bound"),
        "clipped": sorted(
            {s for r in rounds for s in (r.get("bounds") or {}).get("clipped", {})}
        ),
    }


def _round1(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run / "checkpoints" / "round_001.safetensors"))


def _difference(plain: Path, other: Path) -> dict[str, float]:
    """Round 1's largest weight difference from the plain run, apart from the
    groups one site trains (withheld under secure aggregation by default)."""
    a, b = _round1(plain), _round1(other)
    keys = [k for k in a if ".nCT." not in k]
    diff = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in keys)
    scale = max(float(np.max(np.abs(a[k]))) for k in keys)
    return {"max_abs": diff, "max_weight": scale}


def run_simulations(
    cohort: Path, out: Path, quick: bool, rounds: int, echo: Any = print
) -> dict[str, Any]:
    """The three runs in Flower's simulation; with ``quick`` joint rounds on
    small widths, else the demo's whole job with its test evaluation."""
    from simulations.simulate import run_simulated_federation

    result: dict[str, Any] = {}
    for mode, extra in MODES.items():
        if not quick and mode == "secure_ddp":
            continue  # its noise changes the model: timed in --quick
        root = out / mode
        shutil.copytree(cohort, root / "cohort", ignore=shutil.ignore_patterns("runs"))
        overrides: dict[str, Any] = {
            "num-server-rounds": rounds,
            "client-dp-clip": CLIP,
            **extra,
        }  # the same clip for plain and secure, large enough not to bind
        if quick:
            overrides |= QUICK
        echo(f"{mode} ...")
        t0 = time.perf_counter()
        run_simulated_federation(
            root, preset="tiny" if quick else "demo", overrides=overrides
        )
        result[mode] = _summary(read_run_record(root / "federated"))
        result[mode]["run_seconds"] = round(time.perf_counter() - t0, 1)
        if not quick:
            result[mode]["test_auc"] = _test_auc(root)
        echo(f"  {result[mode]}")
    for mode in result:
        if mode == "secure":  # distributed DP's noise is the point, not an error
            result[mode]["round1_vs_plain"] = _difference(
                out / "plain" / "federated", out / mode / "federated"
            )
    return result


def _test_auc(root: Path) -> dict[str, Any] | None:
    from multisite.evaluation import run_evaluation
    from shared_model.layout import PROSPECTIVE, TEST, site_yamls

    cohort = root / "cohort"
    report = run_evaluation(
        root / "federated",
        site_yamls(cohort) + site_yamls(cohort, PROSPECTIVE),
        root / "federated" / "evaluation",
        test_yamls=site_yamls(cohort, TEST),
    )
    auc = report.get("test", {}).get("overall", {}).get("auc")
    return None if auc is None else {"auc": auc["auc"], "ci": auc["ci"]}


def run_deployments(
    cohort: Path, out: Path, rounds: int, echo: Any = print
) -> dict[str, Any]:
    """Plain and secure rounds deployed (TLS, three SuperNodes, Flower's
    ClientApp processes)."""
    from simulations.benchmarks.deployed import run_deployed

    result = {}
    for mode in ("plain", "secure"):
        echo(f"deployed {mode} ...")
        extra = {"client-dp-clip": CLIP, **MODES[mode]}
        seconds = run_deployed(
            cohort,
            out / f"deployed_{mode}",
            rounds,
            True,
            pinned=False,
            extra=extra,
            echo=echo,
        )[0]
        result[mode] = {
            "seconds": seconds,
            "warm_mean": round(statistics.mean(seconds[1:]), 2),
            "waves": 4 if mode == "secure" else 1,
        }
    return result


def report(result: dict[str, Any]) -> str:
    lines = [
        "| run | rounds (s) | warm mean (s) | x plain | waves | bytes up / site | "
        "quantization bound | round 1 vs plain (max abs) | test AUC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for where in ("simulation", "deployment"):
        runs = result.get(where) or {}
        base = (runs.get("plain") or {}).get("warm_mean")
        for mode, r in runs.items():
            ratio = r["warm_mean"] / base if base and r["warm_mean"] else float("nan")
            diff = (r.get("round1_vs_plain") or {}).get("max_abs")
            auc = r.get("test_auc")
            auc_text = (
                ""
                if auc is None
                else f"{auc['auc']:.4f} ({auc['ci'][0]:.3f}-{auc['ci'][1]:.3f})"
            )
            lines.append(
                f"| {where}: {mode} | {', '.join(f'{s:.1f}' for s in r['seconds'])} | "
                f"{r['warm_mean']} | {ratio:.2f} | {r['waves']} | "
                f"{r.get('bytes_up_per_site', '')} | {r.get('quantization_bound', '')} | "
                f"{'' if diff is None else f'{diff:.2e}'} | "
                f"{auc_text} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from simulations.synth import synthesize

    parser = benchmark_parser(__doc__, "secure", "tiny cohort, joint rounds")
    parser.add_argument(
        "--rounds", type=int, default=0, help="default: 4 quick, 8 full"
    )
    parser.add_argument(
        "--deployed", action="store_true", help="with --quick: deployed too"
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (4 if args.quick else 8)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cohort = args.cohort
    if cohort is None:
        cohort = out / "cohort"
        synthesize(cohort, preset="tiny" if args.quick else "demo", seed=0, force=True)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"rounds": rounds, "quick": args.quick, "clip": CLIP}
    result["simulation"] = run_simulations(Path(cohort), out, args.quick, rounds)
    if args.quick and args.deployed:
        result["deployment"] = run_deployments(Path(cohort), out, rounds)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    finish(args, "secure", report(result), result)


if __name__ == "__main__":
    main()
