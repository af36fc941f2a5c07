"""Benchmark: what one hostile site can do to a federation.

A benchmark, not a test: it prints what it measured and writes JSON.

    python -m simulations.benchmarks.hostile              # the catalogue (a minute)
    python -m simulations.benchmarks.hostile --demo       # + demo-cohort runs (~1 h)
    python -m simulations.benchmarks.hostile --quick      # the catalogue only

Part 1 runs the coordinator's real loop (:func:`server.server_app.run_federation`,
three rounds, a tiny network, evaluation every round) against three honest
sites and one hostile node registered as ``mallory``
(:mod:`simulations.hostile`), once per kind of hostile reply, and prints what
became of each: whether the run finished, whether the reply was excluded (with
the run record's reason), bounded or accepted, the largest move of the model
in a round against the round's bound, and how far the final model ends from
the all-honest run's. Then the scaled-update sweep (the attacker's honest
update times 2 ... 1e30, every round) and the 100,000-patient declaration, each
with the default bounds and with them off (``update-bound=0``,
``max-site-share=1``: the rule before bounded influence).

Part 2 (``--demo``) trains real federations on the demo cohort with Flower's
simulation: all honest with the bounds off, all honest with the default
bounds, and one of the three sites (west_china) sending its update scaled
every round with the default bounds and with them off; it scores each on the
held-out test cohort (AUC with its 95 % interval) and reports the mean round
times.
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shared_model.layout import ORACLE
from shared_model.messages import COUNT_KEYS, SHARED
from simulations.benchmarks.common import benchmark_parser, finish

OFF = {"update-bound": 0.0, "max-site-share": 1.0}
"""The bounds off: the aggregation before bounded influence."""


def catalogue(work: Path) -> dict[str, Any]:
    """Part 1: every kind, the sweep and the declaration (see the docstring)."""
    from shared_model.plan import PLAN_FILE, PRESET_PLANS
    from simulations.hostile import ATTACKER, Hostile
    from simulations.hostile_kinds import HOSTILE, SCALES, metrics, scaled_kind
    from simulations.hostile_run import judge, play

    plan = work / PLAN_FILE
    PRESET_PLANS["tiny"].save(plan)

    def honest(tag: str, **override: Any) -> Any:
        from safetensors.numpy import load

        run_dir = work / f"honest_{tag}"
        record, _ = play(None, run_dir, plan, **override)
        assert record["status"] == "finished", record
        return load((run_dir / "model.safetensors").read_bytes())

    reference = {"default": honest("default"), "off": honest("off", **OFF)}

    def one(h: Hostile, tag: str, **override: Any) -> dict[str, Any]:
        run_dir = work / f"{tag}_{len(list(work.iterdir()))}"
        t0 = time.perf_counter()
        record, grid = play(h, run_dir, plan, **override)
        ref = reference["off" if override else "default"]
        verdict = asdict(judge(h, record, run_dir, grid, ref))
        verdict["seconds"] = round(time.perf_counter() - t0, 2)
        if h.name.startswith("declares 100,000"):
            verdict["attacker_share"] = _share(record, ATTACKER)
        shutil.rmtree(run_dir, ignore_errors=True)
        return verdict

    kinds = [one(h, "kind") for h in HOSTILE.values()]
    sweep = [
        {
            "factor": f,
            "default": one(scaled_kind(f), "scaled"),
            "off": one(scaled_kind(f), "scaled_off", **OFF),
        }
        for f in SCALES
    ]
    big = Hostile(
        "declares 100,000 patients in round 1",
        "train",
        metrics(n_shared=100_000, n_nCRT=100_000),
        "bounded",
    )
    declaration = {"default": one(big, "declared"), "off": one(big, "declared", **OFF)}
    return {"kinds": kinds, "sweep": sweep, "declaration": declaration}


def aggregation_cost(repeats: int = 15) -> dict[str, Any]:
    """What the bounds cost a round: the coordinator's aggregation of three
    sites' updates of the demo network (every group trained), timed with the
    default bounds and with them off (median of ``repeats``)."""
    import numpy as np

    from server.strategy import GroupedStrategy
    from shared_model.federation_config import FederationConfig
    from shared_model.messages import GROUPS, SiteTrainReply, TrainReply
    from shared_model.model import build_model
    from shared_model.model_config import model_config_for
    from shared_model.parameter_groups import parameter_groups
    from shared_model.plan import PRESET_PLANS

    fed = FederationConfig(training="joint")
    model = build_model(model_config_for(fed, PRESET_PLANS["demo"]))
    groups = parameter_groups(model)
    current = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    replies = [
        SiteTrainReply(
            site,
            TrainReply(counts=dict.fromkeys(GROUPS, 20 + 10 * i)),
            {
                k: (v + rng.normal(0, 1e-3, v.shape)).astype(v.dtype)
                for k, v in current.items()
            },
        )
        for i, site in enumerate(("a", "b", "c"))
    ]
    out: dict[str, Any] = {
        "parameters": int(sum(v.size for v in current.values())),
        "sites": len(replies),
    }
    for tag, override in (("default", {}), ("off", OFF)):
        strategy = GroupedStrategy(
            FederationConfig.from_run_config({"training": "joint", **override}), groups
        )
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            strategy.aggregate_replies(1, list(replies), current)
            times.append(time.perf_counter() - t0)
        out[f"{tag}_ms"] = round(1000 * statistics.median(times), 1)
    out["added_ms"] = round(out["default_ms"] - out["off_ms"], 1)
    return out


def _share(record: dict[str, Any], site: str) -> float | None:
    """The attacker's weight share of the shared group in round 1 (from the
    capped shares when the cap applied, else from the declared counts)."""
    if not record.get("rounds"):
        return None
    first = record["rounds"][0]
    capped = (first.get("bounds") or {}).get("capped_shares", {}).get("shared")
    if capped and site in capped:
        return float(capped[site])
    sites = first.get("sites", {})
    key = COUNT_KEYS[SHARED]
    total = sum(m[key] for m in sites.values())
    return sites[site][key] / total if site in sites and total else None


RUNS = ("honest-off", "honest", "attacked", "attacked-off")
"""The demo federations: all honest with the bounds off and with the default
bounds; one site scaling its update with the default bounds and with them off."""


def demo(
    out: Path,
    cohorts: str | None,
    seeds: list[int],
    factor: float,
    runs_wanted: tuple[str, ...] = RUNS,
) -> Any:
    """Part 2: real federations on the demo cohort, scored on the test cohort.
    ``cohorts``: a path template with ``{seed}`` for existing cohorts (another
    benchmark's, e.g. the advice benchmark's, whose federation is then the
    honest run with the default bounds)."""
    from multisite.evaluation import run_evaluation
    from simulations.benchmarks.common import prepare_cohort
    from simulations.benchmarks.quality import summarise
    from simulations.hostile_run import scaling_client_app
    from simulations.simulate import run_simulated_federation

    every = {
        "honest-off": ("honest, bounds off", OFF, None),
        "honest": ("honest, default bounds", {}, None),
        "attacked": (f"west_china x{factor:g}, default bounds", {}, factor),
        "attacked-off": (f"west_china x{factor:g}, bounds off", OFF, factor),
    }
    runs = {every[k][0]: every[k][1:] for k in runs_wanted}
    result: dict[str, Any] = {}
    for seed in seeds:
        cohort_dir, train_yamls, prosp_yamls, test_yamls = prepare_cohort(
            out / f"seed{seed}",
            None if cohorts is None else Path(cohorts.format(seed=seed)),
            "demo",
            seed,
            print,
        )
        for name, (override, scale) in runs.items():
            run_dir = out / f"seed{seed}" / name.replace(" ", "_").replace(",", "")
            if run_dir.exists():
                shutil.rmtree(run_dir)
            t0 = time.perf_counter()
            record = run_simulated_federation(
                cohort_dir.parent,
                preset="demo",
                seed=seed,
                overrides={
                    "num-server-rounds": 8,
                    "run-dir": str(run_dir),
                    **override,
                },
                echo=print,
                client_app=None
                if scale is None
                else scaling_client_app("west_china", scale),
            )
            seconds = time.perf_counter() - t0
            report = run_evaluation(
                run_dir,
                train_yamls + prosp_yamls,
                run_dir / "evaluation",
                test_yamls=test_yamls,
                oracle=cohort_dir / ORACLE,
            )
            result.setdefault(name, {})[seed] = _demo_row(
                summarise(report)["test"], record, seconds
            )
    return result


def _demo_row(
    test: dict[str, Any], record: dict[str, Any], seconds: float
) -> dict[str, Any]:
    """One federation's test-cohort quality, advice rule, round times and how
    often an update was clipped."""
    by_stage: dict[str, list[float]] = {}
    for r in record["rounds"][1:]:  # the first round pays the start-up
        by_stage.setdefault(r["stage"], []).append(r["seconds"])
    clipped = sum(
        bool((r.get("bounds") or {}).get("clipped")) for r in record["rounds"]
    )
    fit = (record.get("advice") or {}).get("fit") or {}
    return {
        "test_auc": test["auc"],
        "share_of_oracle_gain": test["share_of_oracle_gain"],
        "dice": test.get("dice"),
        "rule": (record.get("advice") or {}).get("rule_in_words"),
        "newton_sums_scaled": fit.get("bounded"),
        "round_seconds": {s: round(statistics.mean(v), 2) for s, v in by_stage.items()},
        "rounds_with_a_clipped_update": clipped,
        "train_seconds": round(seconds, 1),
    }


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and (abs(x) >= 1e4 or 0 < abs(x) < 1e-3):
        return f"{x:.2e}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def table(result: dict[str, Any]) -> str:
    """The benchmark's tables."""
    cat = result["catalogue"]
    lines = [
        "Hostile replies (one of four registered nodes; 3-round runs, evaluation every "
        "round; default bounds)",
        "| kind | expected | outcome | run finished | move / bound | distance | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += _catalogue_lines(cat)
    cost = result.get("aggregation_cost")
    if cost:
        lines += [
            "",
            f"What the bounds cost a round: aggregating {cost['sites']} sites' updates "
            f"of the demo network ({cost['parameters']:,} parameters) takes "
            f"{cost['default_ms']} ms with the default bounds and {cost['off_ms']} ms "
            f"without ({cost['added_ms']} ms added per round).",
        ]
    if "demo" in result:
        lines += _demo_lines(result["demo"])
    return "\n".join(lines)


def _catalogue_lines(cat: dict[str, Any]) -> list[str]:
    """The catalogue's rows, its tally, the scaled-update sweep and the
    declaration table."""
    lines = []
    for v in cat["kinds"]:
        lines.append(
            f"| {v['kind']} | {v['expect']} | {v['outcome']} | "
            f"{'yes' if v['finished'] else 'NO'} | {_f(v['move_over_bound'], 2)} | "
            f"{_f(v['distance'])} | {v['reason'][:90].replace('|', '/')} |"
        )
    kinds = cat["kinds"]
    ended = sum(not v["finished"] for v in kinds)
    over = sum(v["move_over_bound"] > 1 + 1e-6 for v in kinds if v["finished"])
    silent = sum(v["outcome"] != v["expect"] for v in kinds)
    lines += [
        "",
        f"{len(kinds)} kinds: {ended} ended the run, {over} moved the model beyond "
        f"the bound, {silent} came to something other than expected.",
        "",
        "Scaled update, every round (distance: final model from the all-honest "
        "run's, over that run's own distance from the initial model)",
        "| factor | default: outcome | default: move / bound | default: distance "
        "| bounds off: distance |",
        "|---|---|---|---|---|",
    ]
    for row in cat["sweep"]:
        d, o = row["default"], row["off"]
        lines.append(
            f"| {row['factor']:g} | {d['outcome']} | {_f(d['move_over_bound'], 2)} | "
            f"{_f(d['distance'])} | {_f(o['distance'])} |"
        )
    dec = cat["declaration"]
    lines += [
        "",
        "100,000 patients declared in round 1",
        "| rule | attacker's share of the shared group | distance |",
        "|---|---|---|",
        f"| default (max-site-share 0.5) | {_f(dec['default'].get('attacker_share'))} "
        f"| {_f(dec['default']['distance'])} |",
        f"| bounds off | {_f(dec['off'].get('attacker_share'))} | "
        f"{_f(dec['off']['distance'])} |",
    ]
    return lines


def _demo_lines(demo: dict[str, Any]) -> list[str]:
    """The demo runs' table: test-cohort quality, round times, clipping and
    advice per run and seed."""
    lines = [
        "",
        "Demo cohort (Flower simulation, 8 segmentation rounds, then the heads), "
        "held-out test cohort",
        "| run | seed | test AUC (95 % CI) | Dice | share of oracle gain (95 % CI) | "
        "segmentation round s | head round s | rounds with a clipped update | "
        "Newton sums scaled (site: smallest factor) | advice |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, seeds in demo.items():
        for seed, r in seeds.items():
            auc = r["test_auc"] or {}
            ci = auc.get("ci") or [None, None]
            share = r["share_of_oracle_gain"] or {}
            sci = share.get("ci") or [None, None]
            scaled = ", ".join(
                f"{s}: {_f(v, 3)}"
                for s, v in (r.get("newton_sums_scaled") or {}).items()
            )
            lines.append(
                f"| {name} | {seed} | {_f(auc.get('value'))} ({_f(ci[0])}-"
                f"{_f(ci[1])}) | {_f(r.get('dice'), 3)} | "
                f"{_f(share.get('value'), 2)} ({_f(sci[0], 2)} to {_f(sci[1], 2)}) | "
                f"{_f(r['round_seconds'].get('segmentation'), 1)} | "
                f"{_f(r['round_seconds'].get('heads'), 1)} | "
                f"{r['rounds_with_a_clipped_update']} | {scaled or 'none'} | "
                f"{r.get('rule') or '-'} |"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, "hostile", "the catalogue only")
    parser.add_argument("--demo", action="store_true", help="also the demo runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--factor", type=float, default=50.0)
    parser.add_argument(
        "--runs", nargs="+", choices=RUNS, default=list(RUNS), help="demo runs"
    )
    parser.add_argument(
        "--cohorts",
        help="existing cohorts, a path with {seed} (e.g. another benchmark's)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="moefl-hostile-") as tmp:
        result: dict[str, Any] = {"catalogue": catalogue(Path(tmp))}
    result["aggregation_cost"] = aggregation_cost()
    if args.demo and not args.quick:
        result["demo"] = demo(
            args.out, args.cohorts, args.seeds, args.factor, tuple(args.runs)
        )
    finish(args, "hostile", table(result), result)


if __name__ == "__main__":
    main()
