"""Benchmark: what federation buys, against the alternatives a site has.

A benchmark, not a test: it prints what it measured and writes JSON.

    python -m simulations.benchmarks.quality --cohort demo_run/cohort   # 8 rounds/epochs
    python -m simulations.benchmarks.quality --quick                    # tiny cohort, 2
    python -m simulations.benchmarks.quality --preset paper             # GPU-sized

On one synthetic cohort and one persistent split per site it trains

- federated: the simulated federation (``moefl simulate``), ``rounds`` rounds
  of one local epoch each;
- pooled: every site's training split in one place (``moefl train`` with
  several sites), the centralised upper bound;
- local-only: each site alone (``moefl train`` with one site);

all with the federation's optimiser (AdamW, lr 1e-3, poly decay over the whole
run), batch 4 and augmentation, so every patient is seen ``rounds`` times by
every model: comparable compute. Then it scores every model with
``moefl evaluate`` on the same patients: the validation cohort (the union of
the training sites' validation splits), the prospective cohort (the
``evaluate`` sites) and the held-out test cohort (the quality claim, with
95 % intervals), with the oracle's true policy value and each model's share of
the oracle's gain over the best fixed regimen. The clinical-only
comparator (logistic regression with regimen interactions on the pooled
training splits) is scored on the same patients.

Each model's folder is kept under ``--out``; ``--reuse`` keeps existing models
and their scores instead of training and scoring them again.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared_model.federated_metrics import format_share
from shared_model.layout import ORACLE
from shared_model.site_evaluation import COHORTS, EVALUATION, read_evaluation
from simulations.benchmarks.common import benchmark_parser, finish, prepare_cohort

Echo = Callable[[str], None]

UNGUARDED = "federated_unguarded"
"""The federated model scored with ``min-expert-support`` 0: what the support
guard costs or saves."""

VARIANTS: dict[str, dict[str, Any]] = {
    "independent": {"experts": "independent", "head-fit": "rounds"},
    "joint": {"training": "joint"},
    "study": {"training": "joint", "features": "stem", "experts": "independent"},
    "image_only": {"use-clinical": False},
}
"""Federated variants the benchmark can add (``--variants``): the study's
independent experts, joint (multi-task) training, the study's model, and the
image-only network (no clinical input)."""


def _auc(block: dict[str, Any]) -> dict[str, Any] | None:
    auc = block.get("auc")
    if not auc or auc.get("auc") is None:
        return None
    return {"value": auc["auc"], "ci": auc.get("ci")}


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """AUC (overall with CI, per regimen, per site) and Dice per cohort."""
    out: dict[str, Any] = {}
    for cohort in COHORTS:
        if cohort not in report:
            continue
        r = report[cohort]
        pv = r.get("policy_value") or {}
        calibration = r["overall"].get("calibration") or {}
        out[cohort] = {
            "n": r["n"],
            "calibration_slope": calibration.get("slope"),
            "calibration_intercept": calibration.get("intercept"),
            "recommended": pv.get("recommended"),
            "auc": _auc(r["overall"]),
            "auc_by_regimen": {k: _auc(v) for k, v in r["regimens"].items()},
            "auc_by_site": {k: _auc(v) for k, v in r["sites"].items()},
            "dice": r.get("dice"),
            "brier": r["overall"].get("brier"),
            "policy_dr": (pv.get("dr") or {}).get("value"),
            "policy_oracle": (pv.get("oracle") or {}).get("value"),
            "share_of_oracle_gain": (pv.get("oracle") or {}).get(
                "share_of_oracle_gain"
            ),
        }
    return out


def run_quality(
    out: Path,
    *,
    cohort: Path | None = None,
    quick: bool = False,
    preset: str = "demo",
    rounds: int = 8,
    head_rounds: int = 20,
    variants: tuple[str, ...] = (),
    seed: int = 0,
    local: bool = True,
    reuse: bool = False,
    echo: Echo = print,
) -> dict[str, Any]:
    """Train (or reuse) every model and score each on the same patients.

    ``cohort``: an existing cohort; else one of ``preset`` (``tiny`` with
    ``quick``) is made under ``out/cohort`` from ``seed``. ``local``: also train
    the local-only models.
    """
    from client.data.site_config import load_site_config
    from multisite.training import find_plan

    preset = "tiny" if quick else preset
    out = Path(out)
    cohort_dir, train_yamls, prosp_yamls, test_yamls = prepare_cohort(
        out, cohort, preset, seed, echo
    )
    all_yamls = train_yamls + prosp_yamls
    oracle = cohort_dir / ORACLE
    widths = {"base_filters": 4, "max_filters": 32} if quick else {}
    plan = find_plan(train_yamls, None)
    cfg = _train_config(rounds)
    seconds: dict[str, float] = {}

    def have(name: str) -> bool:
        return reuse and (out / name / "model.safetensors").is_file()

    federations: dict[str, dict[str, Any]] = {"federated": {}}
    federations |= {f"federated_{v}": VARIANTS[v] for v in variants}
    for name, variant in federations.items():
        if not have(name):
            seconds[name] = _federate(
                out, name, preset, rounds, head_rounds, variant, widths, echo
            )
    centralised = [("pooled", train_yamls)] + [
        (f"local_{load_site_config(y).site_name}", [y])
        for y in (train_yamls if local else [])
    ]
    for name, yamls in centralised:
        if not have(name):
            seconds[name] = _train_centrally(
                yamls, out / name, cfg, plan, widths, head_rounds, echo
            )

    models: dict[str, dict[str, Any]] = {}
    scored = [*federations, *(n for n, _ in centralised), "clinical_only"]
    for name in [*scored, UNGUARDED]:
        folder = name.removesuffix(UNGUARDED.removeprefix("federated"))
        checkpoint = out / ("federated" if name == "clinical_only" else folder)
        scores = out / "evaluation" / name / EVALUATION
        if reuse and scores.is_file() and have(checkpoint.name):
            echo(f"reusing the scores of {name} ({scores})")
            models[name] = summarise(read_evaluation(scores.parent))
            continue
        echo(f"scoring {name} ...")
        models[name] = _score(
            name, checkpoint, all_yamls, test_yamls, out, oracle, seconds.get(name)
        )
    return {
        "preset": preset,
        "cohort": str(cohort_dir.resolve()),
        "rounds_or_epochs": rounds,
        "head_rounds": head_rounds,
        "cohort_seed": seed if cohort is None else "given",
        "train_config": cfg.to_dict(),
        "widths": widths or "plan defaults (8..256)",
        "models": models,
    }


def _score(
    name: str,
    checkpoint: Path,
    yamls: list[Path],
    test_yamls: list[Path],
    out: Path,
    oracle: Path,
    train_seconds: float | None,
) -> dict[str, Any]:
    """Evaluate one model on every cohort; its summary and training time."""
    from multisite.evaluation import run_evaluation

    report = run_evaluation(
        checkpoint,
        yamls,
        out / "evaluation" / name,
        test_yamls=test_yamls,
        oracle=oracle if oracle.is_dir() else None,
        clinical_only=name == "clinical_only",
        min_expert_support=0 if name == UNGUARDED else None,
    )
    row = summarise(report)
    if train_seconds is not None:
        row["train_seconds"] = round(train_seconds, 1)
    return row


def _train_config(epochs: int) -> Any:
    """The federation's optimiser (AdamW, lr 1e-3, poly decay), batch 4 and
    augmentation, for the centrally trained models."""
    from client.training.engine import TrainConfig

    return TrainConfig(
        optimizer="adamw", lr=1e-3, batch_size=4, epochs=epochs, augment=True, seed=0
    )


def _federate(
    out: Path,
    name: str,
    preset: str,
    rounds: int,
    head_rounds: int,
    variant: dict[str, Any],
    widths: dict[str, int],
    echo: Echo,
) -> float:
    """A fresh simulated federation of ``variant`` under ``out/name``; its
    seconds."""
    from simulations.simulate import run_simulated_federation

    if (out / name).exists():
        shutil.rmtree(out / name)
    t0 = time.perf_counter()
    run_simulated_federation(
        out,
        preset=preset,
        overrides={
            "num-server-rounds": rounds,
            "head-rounds": head_rounds,
            "run-dir": str(out / name),
            **variant,
            **{k.replace("_", "-"): v for k, v in widths.items()},
        },
        echo=echo,
    )
    return time.perf_counter() - t0


def _train_centrally(
    yamls: list[Path],
    folder: Path,
    cfg: Any,
    plan: Any,
    widths: dict[str, int],
    head_rounds: int,
    echo: Echo,
) -> float:
    """The pooled or a local-only model of ``yamls`` under ``folder``; its
    seconds."""
    from client.training.heads import HeadConfig
    from multisite.training import run_training

    t0 = time.perf_counter()
    run_training(
        yamls,
        folder,
        cfg=cfg,
        plan=plan,
        model_overrides=widths or None,
        image_only=False,
        head=HeadConfig(epochs=head_rounds * 10, lr=0.001, seed=0),
        echo=echo,
    )
    return time.perf_counter() - t0


def _fmt_auc(a: dict[str, Any] | None, ci: bool = True) -> str:
    if a is None:
        return "n/a"
    if ci and a.get("ci"):
        return f"{a['value']:.3f} ({a['ci'][0]:.2f}-{a['ci'][1]:.2f})"
    return f"{a['value']:.3f}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def table(result: dict[str, Any]) -> str:
    """Markdown table: one row per model and cohort."""
    lines = [
        "| model | cohort | n | AUC (95% CI) | nCRT | TNT | nCT | Dice | Brier | "
        "calibration slope / intercept | advised nCRT / TNT / nCT | "
        "pCR under its advice: DR / oracle | share of the oracle's gain (95% CI) "
        "| train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["models"].items():
        for cohort in COHORTS:
            c = row.get(cohort)
            if c is None:
                continue
            reg = c["auc_by_regimen"]
            dice = (
                "n/a"
                if c["dice"] is None or name == "clinical_only"
                else f"{c['dice']:.3f}"
            )
            secs = row.get("train_seconds")
            shown = "-" if secs is None or cohort != "validation" else f"{secs:.0f}"
            lines.append(
                f"| {name} | {cohort} | {c['n']} | {_fmt_auc(c['auc'])} | "
                + " | ".join(
                    _fmt_auc(reg.get(r), ci=False) for r in ("nCRT", "TNT", "nCT")
                )
                + f" | {dice} | {_num(c['brier'])} | "
                f"{_num(c.get('calibration_slope'))} / "
                f"{_num(c.get('calibration_intercept'))} | "
                + " / ".join(
                    str((c.get("recommended") or {}).get(r, "-"))
                    for r in ("nCRT", "TNT", "nCT")
                )
                + f" | {_num(c['policy_dr'])} / "
                f"{_num(c['policy_oracle'])} | {format_share(c.get('share_of_oracle_gain'))} "
                f"| {shown} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, "quality", "tiny cohort, 2 rounds")
    parser.add_argument(
        "--preset", default="demo", help="cohort to make when --cohort is not given"
    )
    parser.add_argument("--rounds", type=int, default=8, help="rounds = epochs")
    parser.add_argument(
        "--head-rounds", type=int, default=20, help="staged: head rounds (x10 epochs)"
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        default=[],
        choices=sorted(VARIANTS),
        help="federated variants to add",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of a new cohort")
    parser.add_argument(
        "--no-local", action="store_true", help="skip the local-only models"
    )
    parser.add_argument("--reuse", action="store_true", help="score existing models")
    args = parser.parse_args(argv)
    result = run_quality(
        args.out,
        cohort=args.cohort,
        quick=args.quick,
        preset=args.preset,
        rounds=2 if args.quick else args.rounds,
        head_rounds=3 if args.quick else args.head_rounds,
        variants=tuple(args.variants),
        seed=args.seed,
        local=not args.no_local,
        reuse=args.reuse,
    )
    finish(args, "quality", table(result), result)


if __name__ == "__main__":
    main()
