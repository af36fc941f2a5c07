"""Benchmark: what Flower costs over the same training done in a plain loop.

A benchmark, not a test: it prints what it measured and writes JSON.

    python -m simulations.benchmarks.overhead --cohort demo_run/cohort   # 3 rounds
    python -m simulations.benchmarks.overhead --quick                    # tiny cohort

Runs the same rounds twice on one cohort, in one process, with training only
(``evaluate-every 0``):

- plain loop: the server's start (:func:`server.server_app.start_federation`),
  the site's own round (:func:`client.node.site_round.train_round`, what the
  ClientApp calls) for each site in turn in this process, and the strategy's
  aggregation of the typed replies
  (:meth:`server.strategy.GroupedStrategy.aggregate_replies`); no Flower
  runtime (no Ray, no messages, no serialisation);
- federated: the same rounds in Flower's simulation runtime
  (``moefl simulate``), where each site runs in a Ray worker and every message
  crosses process boundaries.

It reports seconds per round for both (round 1 loads and caches each site's
data; later rounds are warm), their ratio, the simulation's fixed start-up and
shut-down, and the final weights' largest difference between the two runs. It
also reports the bytes a round moves per site (Flower's wire encoding of each
message, protobuf, before gRPC framing and TLS) against the raw float32 bytes
of the whole model, and what the per-group upload saves at a site without nCT
patients.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.layout import site_yamls
from simulations.benchmarks.common import benchmark_parser, finish

Echo = Callable[[str], None]


def wire_bytes(content: Any) -> int:
    """Size of a message's content in Flower's protobuf encoding."""
    from flwr.common.serde import recorddict_to_proto

    return int(recorddict_to_proto(content).ByteSize())


def plain_loop(
    cohort: Path, run_dir: Path, overrides: dict[str, Any]
) -> dict[str, Any]:
    """The rounds of a federation without Flower's runtime (see module doc)."""
    from flwr.app import RecordDict

    from client.node.site_round import train_round
    from server.federation_start import start_federation
    from shared_model.federation_config import FederationConfig
    from wire.records import arrays_to_record, request_record, train_reply_content

    yamls = site_yamls(cohort)
    fed = FederationConfig.from_run_config(
        {
            "cohort-dir": str(cohort.resolve()),
            "run-dir": str(run_dir.resolve()),
            "min-sites": len(yamls),
            **overrides,
        }
    )
    begin = start_federation(fed)
    arrays, strategy = begin.arrays, begin.strategy
    nodes = [
        {"partition-id": i, "num-partitions": len(yamls)} for i in range(len(yamls))
    ]
    rounds, sizes = [], {}
    for rnd in range(1, fed.num_server_rounds + 1):
        t0 = time.perf_counter()
        request = dataclasses.replace(begin.request, server_round=rnd)
        replies = [train_round(request, arrays, node) for node in nodes]
        outcome = strategy.aggregate_replies(rnd, replies, arrays)
        rounds.append(time.perf_counter() - t0)
        if rnd == 1:
            down = RecordDict(
                {"arrays": arrays_to_record(arrays), "config": request_record(request)}
            )
            for r in replies:
                sizes[r.site] = {
                    "wire_down": wire_bytes(down),
                    "wire_up": wire_bytes(train_reply_content(r)),
                    "array_bytes_up": int(sum(a.nbytes for a in r.arrays.values())),
                    "groups_up": sorted(
                        g
                        for g, names in strategy.groups.items()
                        if any(n in r.arrays for n in names)
                    ),
                }
        arrays = outcome.arrays
    return {"round_seconds": rounds, "sizes": sizes, "arrays": arrays}


def run_overhead(
    out: Path,
    *,
    cohort: Path | None = None,
    quick: bool = False,
    rounds: int = 3,
    echo: Echo = print,
) -> dict[str, Any]:
    """Plain loop, then the simulated federation, on the same cohort and settings."""
    from safetensors.numpy import load_file

    from simulations.simulate import run_simulated_federation
    from simulations.synth import synthesize

    preset = "tiny" if quick else "demo"
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cohort_dir = out / "cohort"
    if cohort is not None:
        cohort_dir.symlink_to(Path(cohort).resolve())
    else:
        echo(f"making the {preset} cohort in {cohort_dir} ...")
        synthesize(cohort_dir, preset=preset, seed=0, force=True)
    # joint: every round trains the whole network, the costliest kind of round
    overrides: dict[str, Any] = {
        "num-server-rounds": rounds,
        "training": "joint",
        "evaluate-every": 0,
        "seed": 0,
        **({"base-filters": 4, "max-filters": 32} if quick else {}),
    }
    echo(f"plain loop: {rounds} rounds without Flower's runtime ...")
    loop = plain_loop(cohort_dir, out / "loop", overrides)
    echo(f"federated: the same {rounds} rounds in Flower's simulation ...")
    t0 = time.perf_counter()
    record = run_simulated_federation(out, preset=preset, overrides=overrides)
    wall = time.perf_counter() - t0
    fed_rounds = [r["seconds"] for r in record["rounds"]]
    final = load_file(str(out / "federated" / "model.safetensors"))
    diff = max(
        float(np.max(np.abs(final[k] - v))) if v.size else 0.0
        for k, v in loop["arrays"].items()
        if k in final
    )
    raw = int(sum(v.nbytes for v in loop["arrays"].values()))
    first = record["rounds"][0]["sites"]
    sites = {}
    for site, size in loop["sizes"].items():
        m = first[site]
        sites[site] = {
            **size,
            "bytes_down": m["bytes_down"],
            "bytes_up": m["bytes_up"],
            "train_seconds_in_round_1": m["seconds"],
            "saved_by_groups": raw - size["array_bytes_up"],
        }

    def warm(xs: list[float]) -> float:
        return statistics.mean(xs[1:]) if len(xs) > 1 else xs[0]

    result = {
        "preset": preset,
        "rounds": rounds,
        "sites": len(sites),
        "plain_loop_round_seconds": [round(x, 2) for x in loop["round_seconds"]],
        "federated_round_seconds": fed_rounds,
        "federated_wall_seconds": round(wall, 1),
        "federated_fixed_seconds": round(wall - sum(fed_rounds), 1),
        "ratio_round_1": fed_rounds[0] / loop["round_seconds"][0],
        "ratio_warm_rounds": warm(fed_rounds) / warm(loop["round_seconds"]),
        "ratio_whole_run": wall / sum(loop["round_seconds"]),
        "final_weights_max_abs_diff": diff,
        "raw_model_bytes": raw,
        "per_site": sites,
    }
    return result


def report(result: dict[str, Any]) -> str:
    lines = [
        f"{result['sites']} sites, {result['rounds']} rounds, training only",
        "seconds per round: plain loop "
        + ", ".join(f"{x:.1f}" for x in result["plain_loop_round_seconds"])
        + "; Flower simulation "
        + ", ".join(f"{x:.1f}" for x in result["federated_round_seconds"]),
        f"ratio Flower / plain: round 1 {result['ratio_round_1']:.3f}, warm rounds "
        f"{result['ratio_warm_rounds']:.3f}, whole run incl. start-up "
        f"{result['ratio_whole_run']:.3f} (start-up + shut-down "
        f"{result['federated_fixed_seconds']:.1f} s)",
        f"final weights, largest difference between the two runs: "
        f"{result['final_weights_max_abs_diff']:.3g}",
        f"raw model (float32 state): {result['raw_model_bytes']:,} bytes",
        "| site | groups uploaded | down (wire) | up (wire) | up arrays | saved by groups |",
        "|---|---|---|---|---|---|",
    ]
    for site, s in sorted(result["per_site"].items()):
        lines.append(
            f"| {site} | {', '.join(s['groups_up'])} | {s['wire_down']:,} | "
            f"{s['wire_up']:,} | {s['array_bytes_up']:,} | {s['saved_by_groups']:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, "overhead", "tiny cohort, 2 rounds")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    result = run_overhead(
        args.out,
        cohort=args.cohort,
        quick=args.quick,
        rounds=2 if args.quick else args.rounds,
    )
    finish(args, "overhead", report(result), result)


if __name__ == "__main__":
    main()
