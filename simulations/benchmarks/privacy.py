"""Benchmark: what sample-level DP-SGD costs, in time and in validation AUC.

A benchmark, not a test: it prints what it measured and writes JSON.

    python -m simulations.benchmarks.privacy step          # engine step time, DP vs not
    python -m simulations.benchmarks.privacy auc --cohort DIR --epsilons 1 4 8
    python -m simulations.benchmarks.privacy auc --quick   # tiny cohort, 2 rounds

``step`` times :func:`client.training.engine.train_local` itself (the code a site runs)
at the demo patch (16 x 64 x 64, CPU widths 8..256), 4 patients per step
without DP and 4 expected patients per step with DP (Poisson sampling,
functorch per-sample gradients, noise 1.0, clip 1.0), on random tensors.

``auc`` runs the simulated federation once per budget (every site gets the
same target epsilon, delta 1e-5, clip 1.0) and once without DP, on the same
cohort, split and settings, and reports the final federated validation AUC,
Dice and each site's epsilon. Each demo-cohort run takes 10-20 minutes on
two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from shared_model.layout import ORACLE, TEST, site_yamls
from simulations.benchmarks.common import machine


def step_times(steps: int, repeats: int) -> dict[str, Any]:
    """Seconds per local step of train_local with and without DP."""
    from client.privacy.dp_sgd import PrivateRound, dp_generator
    from client.privacy.rounds import DPRound
    from client.training.engine import TrainConfig, train_local
    from shared_model.model import build_model
    from shared_model.model_config import ModelConfig
    from shared_model.plan import PRESET_PLANS

    plan = PRESET_PLANS["demo"]
    n = 64
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        mask = torch.zeros(1, *plan.patch_size)
        d, h, w = plan.patch_size
        mask[:, d // 4 : 3 * d // 4, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
        items.append(
            {
                "image": torch.randn(2, *plan.patch_size, generator=g),
                "label": mask,
                "clinical": torch.zeros(15),
                "regimen": torch.tensor(i % 3),
                "pcr": torch.tensor(float(i % 2)),
                "case_id": f"B{i}",
            }
        )
    cfg = ModelConfig.from_plan(plan)
    out: dict[str, Any] = {"patch": list(plan.patch_size), "batch": 4}
    for label, dp in (
        ("no_dp", None),
        ("dp", DPRound(1.0, 1.0, 4 / n, steps, n)),
    ):
        times = []
        for r in range(repeats + 1):  # the first run warms up
            torch.manual_seed(r)
            model = build_model(cfg)
            t0 = time.perf_counter()
            res = train_local(
                model,
                items,
                TrainConfig(optimizer="adamw", lr=1e-3, max_steps=steps, seed=r),
                device=torch.device("cpu"),
                dp=PrivateRound(dp, dp_generator(r), secure_mode=False) if dp else None,
            )
            if r:
                times.append((time.perf_counter() - t0) / res.steps)
        out[label] = {"seconds_per_step": statistics.median(times), "runs": times}
    out["ratio"] = out["dp"]["seconds_per_step"] / out["no_dp"]["seconds_per_step"]
    return out


def auc_runs(
    cohort: Path | None,
    out: Path,
    epsilons: list[float],
    rounds: int,
    baseline: bool,
    quick: bool,
) -> list[dict[str, Any]]:
    """One simulated federation per budget (and one without DP)."""
    from server.run_folder import privacy_spent
    from simulations.simulate import run_simulated_federation

    preset = "tiny" if quick else "demo"
    # Joint training: DP-SGD trains the whole model in every round (private head
    # training over cached features is not available, so staged runs refuse DP).
    overrides: dict[str, Any] = {"num-server-rounds": rounds, "training": "joint"}
    if quick:
        overrides |= {"base-filters": 4, "max-filters": 32}
    settings: list[float | None] = [*epsilons] + ([None] if baseline else [])
    results = []
    for eps in settings:
        label = "no_dp" if eps is None else f"eps_{eps:g}"
        folder = out / label
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        if cohort is not None:
            (folder / "cohort").symlink_to(cohort.resolve())
        privacy = (
            None
            if eps is None
            else {"target_epsilon": eps, "delta": 1e-5, "max_grad_norm": 1.0}
        )
        t0 = time.perf_counter()
        record = run_simulated_federation(
            folder, preset=preset, overrides=overrides, privacy=privacy, echo=print
        )
        ev = record["rounds"][-1].get("evaluate", {})
        row = {
            "setting": label,
            "target_epsilon": eps,
            "auc": ev.get("auc"),
            "auc_by_regimen": ev.get("auc_by_regimen"),
            "dice": ev.get("dice"),
            "n_val": ev.get("n"),
            "seconds": round(time.perf_counter() - t0, 1),
            "privacy": privacy_spent(record),
            "test": _test_quality(folder),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
    return results


def _test_quality(folder: Path) -> dict[str, Any] | None:
    """The run's final model on the held-out test cohort: AUC with its 95 %
    interval, Dice, and the share of the oracle's gain (None without one)."""
    from multisite.evaluation import run_evaluation

    cohort = folder / "cohort"
    tests = site_yamls(cohort, TEST)
    if not tests:
        return None
    report = run_evaluation(
        folder / "federated",
        site_yamls(cohort),
        folder / "federated" / "evaluation",
        test_yamls=tests,
        oracle=cohort / ORACLE,
    )
    test = report["test"]
    truth = test["policy_value"].get("oracle") or {}
    return {
        "n": test["n"],
        "auc": test["overall"]["auc"],
        "dice": test["dice"],
        "share_of_oracle_gain": truth.get("share_of_oracle_gain"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p_step = sub.add_parser("step", help="train_local step time with and without DP")
    p_step.add_argument("--steps", type=int, default=8)
    p_step.add_argument("--repeats", type=int, default=2)
    p_auc = sub.add_parser("auc", help="validation AUC against epsilon")
    p_auc.add_argument("--cohort", type=Path, help="an existing demo cohort")
    p_auc.add_argument("--out", type=Path, default=Path("runs/bench_privacy"))
    p_auc.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 4.0, 8.0])
    p_auc.add_argument("--rounds", type=int, default=8)
    p_auc.add_argument("--no-baseline", action="store_true")
    p_auc.add_argument("--quick", action="store_true", help="tiny cohort, 2 rounds")
    for p in (p_step, p_auc):
        p.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.what == "step":
        result: Any = step_times(args.steps, args.repeats)
        print(
            f"train_local at the demo patch, B=4: no DP "
            f"{result['no_dp']['seconds_per_step']:.3f} s/step, DP "
            f"{result['dp']['seconds_per_step']:.3f} s/step, ratio {result['ratio']:.2f}"
        )
    else:
        rounds = 2 if args.quick else args.rounds
        args.out.mkdir(parents=True, exist_ok=True)
        result = auc_runs(
            args.cohort,
            args.out,
            args.epsilons,
            rounds,
            not args.no_baseline,
            args.quick,
        )
        from shared_model.federated_metrics import format_share

        print(
            f"{'setting':>8} {'val AUC':>7} {'Dice':>6} {'test AUC (95% CI)':>22} "
            f"{'share of oracle gain':>22}  epsilon spent per site"
        )
        for row in result:
            spent = ", ".join(
                f"{s} {p['epsilon']:.2f}" for s, p in sorted(row["privacy"].items())
            )
            auc = "n/a" if row["auc"] is None else f"{row['auc']:.3f}"
            dice = "n/a" if row["dice"] is None else f"{row['dice']:.3f}"
            t = row.get("test") or {}
            a, sh = t.get("auc"), t.get("share_of_oracle_gain")
            t_auc = (
                "n/a"
                if not a
                else f"{a['auc']:.3f} ({a['ci'][0]:.2f}-{a['ci'][1]:.2f})"
            )
            t_sh = format_share(sh)
            print(
                f"{row['setting']:>8} {auc:>7} {dice:>6} {t_auc:>22} {t_sh:>22}  "
                f"{spent or '-'}"
            )
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "result": result}, indent=2)
        )


if __name__ == "__main__":
    main()
