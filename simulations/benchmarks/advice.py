"""Benchmark: is the federated model's advice worth giving, over several seeds?

A benchmark, not a test: it prints what it measured and writes JSON.

    python -m simulations.benchmarks.advice --seeds 0 1 2 3 4          # demo, ~1 h
    python -m simulations.benchmarks.advice --preset paper-demo --seeds 0 1 2
    python -m simulations.benchmarks.advice --quick                     # tiny, 1 seed

For each seed it makes the cohort, runs ``make demo``'s federation (the
defaults: 8 segmentation rounds, the heads' Newton fit, the rule chosen on
the validation split), and scores the held-out test cohort with ``moefl
evaluate``: AUC with its DeLong interval, the calibration slope, and the share
of the oracle's gain with its interval under the checkpoint's own rule. The
same test patients are then advised under other rules from their stored
scores and designs (no rescoring): the switch rule at each fixed ``q`` with
and without the support guard, TNT for everyone, the study's argmax and the
margin rule, each with its share of the oracle's gain. Beside them, the
learnable share: what per-regimen regressions on the world's noise-free
readouts reach with the same switch rule (:func:`simulations.scoreboard.learnable_share`).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.layout import COHORT_RECORD, ORACLE, POTENTIAL_OUTCOMES
from simulations.benchmarks.common import benchmark_parser, finish

WHAT_IFS = (
    "switch:0.8",
    "switch:0.9",
    "switch:0.95",
    "switch:0.9@30",
    "fixed:TNT",
    "argmax@30",
    "margin@30",
)
"""Rules scored besides the checkpoint's own (``@30``: the support guard at 30
patients; the switch rules without it allow every expert with patients)."""


def _oracle(cohort: Path) -> dict[str, list[float]]:
    import csv

    from shared_model.clinical import REGIMENS

    with open(cohort / ORACLE / POTENTIAL_OUTCOMES, newline="") as f:
        return {
            r["case_id"]: [float(r[f"p_{g}"]) for g in REGIMENS]
            for r in csv.DictReader(f)
        }


def what_if_shares(
    checkpoint: Path, cohort: Path, test_yamls: list[Path]
) -> dict[str, Any]:
    """Each WHAT_IFS rule's share of the oracle's gain on the test cohort, from
    one scoring pass (probabilities and designs kept in memory)."""
    import torch

    from client.data.dataset import SiteDataset
    from client.data.site_config import load_site_config
    from client.data.site_data import list_cases
    from client.scoring.evaluation import scoring_rule
    from client.scoring.inference import score_dataset
    from shared_model.checkpoint import load_checkpoint
    from shared_model.policy import recommend
    from shared_model.policy_value import OracleSums

    model, plan = load_checkpoint(checkpoint)
    scores = []
    for y in test_yamls:
        cfg = load_site_config(y)
        cases = list_cases(cfg.dataset_dir, require_outcome=False)
        ds = SiteDataset(cases, plan, adc_scale=cfg.adc_scale, train=False, whole=True)
        scores += score_dataset(model, ds, plan, device=torch.device("cpu"))
    truth = _oracle(cohort)
    p = np.array([truth[s.case_id] for s in scores])
    probs = np.array([s.probs for s in scores])
    received = np.array([s.regimen for s in scores])
    design = (
        None
        if any(s.design is None for s in scores)
        else np.array([s.design for s in scores])
    )
    out: dict[str, Any] = {}
    for name in WHAT_IFS:
        rule_text, _, guard = name.partition("@")
        rule, _ = scoring_rule(
            checkpoint,
            what_if=rule_text,
            min_expert_support=int(guard) if guard else 0,
        )
        rec = recommend(probs, rule, received, design)
        report = OracleSums.from_probabilities(p, rec).report()
        share = (report or {}).get("share_of_oracle_gain") or {}
        out[name] = {
            "share": share.get("value"),
            "ci": share.get("ci"),
            "switched_from_tnt": int((rec != 1).sum()),
        }
    return out


def pooled(
    folder: Path,
    train_yamls: list[Path],
    all_yamls: list[Path],
    test_yamls: list[Path],
    cohort: Path,
    quick: bool,
) -> dict[str, Any]:
    """The pooled comparator under the same head fit and rule choice: every
    training site's patients in one place, 8 epochs of segmentation (the
    federation's 8 rounds of one local epoch), then the Newton head and the
    rule chosen on the validation splits."""
    from client.training.engine import TrainConfig
    from multisite.evaluation import run_evaluation
    from multisite.training import find_plan, run_training
    from simulations.benchmarks.quality import summarise

    t0 = time.perf_counter()
    cfg = TrainConfig(
        optimizer="adamw",
        lr=1e-3,
        batch_size=4,
        epochs=2 if quick else 8,
        augment=True,
        seed=0,
    )
    run_training(
        train_yamls,
        folder / "pooled",
        cfg=cfg,
        plan=find_plan(train_yamls, None),
        image_only=False,
        head_fit="newton",
        echo=print,
    )
    report = run_evaluation(
        folder / "pooled",
        all_yamls,
        folder / "pooled_evaluation",
        test_yamls=test_yamls,
        oracle=cohort / ORACLE,
    )
    return {
        "test": summarise(report)["test"],
        "rule_in_words": report["rule"].get("in_words"),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def run_seed(
    out: Path, preset: str, seed: int, quick: bool, with_pooled: bool = False
) -> dict[str, Any]:
    """One seed: cohort, federation, evaluation, what-ifs (and the pooled
    comparator)."""
    from multisite.evaluation import run_evaluation
    from simulations.benchmarks.common import prepare_cohort
    from simulations.benchmarks.quality import summarise
    from simulations.simulate import run_simulated_federation

    folder = out / f"{preset}_seed{seed}"
    t0 = time.perf_counter()
    cohort, train_yamls, prosp_yamls, test_yamls = prepare_cohort(
        folder, None, preset, seed, print
    )
    made = time.perf_counter() - t0
    run_dir = folder / "federated"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    record = run_simulated_federation(
        folder,
        preset=preset,
        seed=seed,
        overrides={"num-server-rounds": 2 if quick else 8, "run-dir": str(run_dir)},
        echo=print,
    )
    trained = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = run_evaluation(
        run_dir,
        train_yamls + prosp_yamls,
        folder / "evaluation",
        test_yamls=test_yamls,
        oracle=cohort / ORACLE,
    )
    evaluated = time.perf_counter() - t0
    test = summarise(report)["test"]
    advice = record.get("advice") or {}
    board = json.loads((cohort / COHORT_RECORD).read_text())["scoreboard"]
    comparator = (
        pooled(
            folder, train_yamls, train_yamls + prosp_yamls, test_yamls, cohort, quick
        )
        if with_pooled
        else None
    )
    return {
        "seed": seed,
        "pooled": comparator,
        "test": test,
        "rule": advice.get("rule"),
        "rule_in_words": advice.get("rule_in_words"),
        "fit": {
            k: (advice.get("fit") or {}).get(k)
            for k in ("lam", "newton_steps", "recalibration", "expert_support")
        },
        "what_if": what_if_shares(run_dir, cohort, test_yamls),
        "learnable_share": board.get("learnable_share", {}).get("test"),
        "seconds": {
            "cohort": round(made, 1),
            "federation": round(trained, 1),
            "evaluation": round(evaluated, 1),
        },
    }


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.mean(got) if got else None


def table(result: dict[str, Any]) -> str:
    seeds = result["seeds"]

    def f(x: Any, d: int = 3) -> str:
        return "-" if x is None else f"{x:.{d}f}"

    lines = [
        f"{result['preset']}: the federated model's advice on the held-out test cohort",
        "| seed | rule chosen | test AUC (95 % CI) | calibration slope | share of the "
        "oracle's gain (95 % CI) | learnable share (q 0.9) |",
        "|---|---|---|---|---|---|",
    ]
    for r in seeds:
        t = r["test"]
        auc = t.get("auc") or {}
        share = t.get("share_of_oracle_gain") or {}
        ci = share.get("ci") or (None, None)
        aci = auc.get("ci") or (None, None)
        lines.append(
            f"| {r['seed']} | {r['rule_in_words']} | {f(auc.get('value'))} "
            f"({f(aci[0])}-{f(aci[1])}) | {f(t.get('calibration_slope'), 2)} | "
            f"{f(share.get('value'), 2)} ({f(ci[0], 2)} to {f(ci[1], 2)}) | "
            f"{(r.get('learnable_share') or {}).get('0.9', '-')} |"
        )
    shares = [(r["test"].get("share_of_oracle_gain") or {}).get("value") for r in seeds]
    aucs = [(r["test"].get("auc") or {}).get("value") for r in seeds]
    slopes = [r["test"].get("calibration_slope") for r in seeds]
    known = [s for s in shares if s is not None]
    worst = f(min(known), 2) if known else "-"
    calibrated = sum(1 for s in slopes if s is not None and 0.8 <= s <= 1.2)
    lines += [
        f"mean share {f(_mean(shares), 2)}, worst {worst}; mean AUC {f(_mean(aucs))}; "
        f"slopes in 0.8-1.2 on {calibrated} of {len(slopes)}",
        "",
        "The same test patients advised under other rules (share of the oracle's gain; "
        "patients switched away from TNT)",
        "| rule | " + " | ".join(f"seed {r['seed']}" for r in seeds) + " | mean |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    if all(r.get("pooled") for r in seeds):
        fed = [
            (r["test"].get("share_of_oracle_gain") or {}).get("value") for r in seeds
        ]
        pool = [
            (r["pooled"]["test"].get("share_of_oracle_gain") or {}).get("value")
            for r in seeds
        ]
        diffs = [
            a - b
            for a, b in zip(fed, pool, strict=True)
            if a is not None and b is not None
        ]
        lines.insert(
            -4,
            "pooled (same head fit and rule choice): share "
            + ", ".join(f(p, 2) for p in pool)
            + "; AUC "
            + ", ".join(
                f((r["pooled"]["test"].get("auc") or {}).get("value")) for r in seeds
            )
            + f"; federated minus pooled share, mean {f(_mean(diffs), 2)}",
        )
    for name in WHAT_IFS:
        vals = [r["what_if"][name]["share"] for r in seeds]
        cells = [
            f"{f(r['what_if'][name]['share'], 2)} ({r['what_if'][name]['switched_from_tnt']})"
            for r in seeds
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {f(_mean(vals), 2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, "advice", "tiny cohort, one seed, 2 rounds")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--pooled", action="store_true", help="also the pooled comparator"
    )
    args = parser.parse_args(argv)
    preset = "tiny" if args.quick else args.preset
    seeds = [args.seeds[0]] if args.quick else args.seeds
    args.out.mkdir(parents=True, exist_ok=True)
    done = []
    for seed in seeds:
        done.append(run_seed(args.out, preset, seed, args.quick, args.pooled))
        partial = {"preset": preset, "seeds": done}
        (args.out / "advice_partial.json").write_text(
            json.dumps(partial, default=float)
        )
        print(table(partial), flush=True)
    finish(
        args,
        "advice",
        table({"preset": preset, "seeds": done}),
        {"preset": preset, "seeds": done},
    )


if __name__ == "__main__":
    main()
