"""Benchmark: DP on the heads over a public backbone, against no DP.

A benchmark, not a test: it prints what it measured and writes JSON.

    python -m simulations.benchmarks.dp_heads --seed 0                # demo cohort
    python -m simulations.benchmarks.dp_heads --quick                 # tiny, 3 rounds
    python -m simulations.benchmarks.dp_heads --cohort DIR --epsilons 8 4 1

On one synthetic cohort (made from ``--seed`` unless ``--cohort`` is given) it

1. makes a public pretraining cohort (``moefl synth --preset public``, same
   seed, its own random stream) and pretrains the backbone on it
   (``moefl pretrain``, ``--pretrain-epochs``);
2. runs the staged federation over that frozen backbone for ``--head-rounds``
   head rounds without DP and with every site under DP at each target epsilon
   (delta 1e-5, clip 1.0; the sites derive their noise from their budget);
3. scores every model with ``moefl evaluate`` on the validation, prospective
   and held-out test cohorts (AUC with 95 % interval, share of the oracle's
   gain over the best fixed regimen);
4. checks that each site's epsilon in metrics.json equals its ledger and does
   not exceed its budget, and times the head rounds (the first round, which
   computes the feature cache, apart).

``--reference FILE``: a quality benchmark JSON of the same cohort, whose
``federated`` row (the staged model with a backbone the federation trained)
is shown as the non-DP staged model.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.run_folder import read_run_record
from shared_model.federated_metrics import format_share
from shared_model.layout import COHORT_RECORD, ORACLE, site_yamls
from simulations.benchmarks.common import benchmark_parser, finish, prepare_cohort
from simulations.benchmarks.quality import _fmt_auc, summarise

Echo = Callable[[str], None]
DELTA = 1e-5
CLIP = 1.0


def _ledger_check(run: Path) -> dict[str, Any]:
    """Each DP site's epsilon: the run record's last report against its ledger."""
    from client.privacy.ledger import PrivacyLedger

    record = read_run_record(run)
    reported: dict[str, dict[str, float]] = {}
    for rnd in record["rounds"]:
        for site, m in {**rnd["sites"], **rnd["declined"]}.items():
            if m.get("privacy"):
                reported[site] = m["privacy"]
    out = {}
    for site, p in sorted(reported.items()):
        ledger = PrivacyLedger.for_site(run / "sites" / site)
        eps = ledger.epsilon(DELTA)
        out[site] = {
            "metrics_epsilon": p["epsilon"],
            "ledger_epsilon": eps,
            "target": p["target_epsilon"],
            "noise_multiplier": p.get("noise_multiplier"),
            "equal": abs(eps - p["epsilon"]) < 1e-6,
            "within_budget": eps <= p["target_epsilon"] + 1e-9,
        }
    return out


def _round_seconds(run: Path) -> dict[str, float | None]:
    """Whole rounds (with the federated evaluation, which DP sites withhold)
    and the slowest site's training handler, rounds after the first."""
    rounds = read_run_record(run)["rounds"]
    later = [r["seconds"] for r in rounds[1:]]
    site = [
        max(m["seconds"] for m in r["sites"].values()) for r in rounds[1:] if r["sites"]
    ]
    return {
        "first": rounds[0]["seconds"] if rounds else None,
        "later_median": statistics.median(later) if later else None,
        "site_train_median": statistics.median(site) if site else None,
    }


def _add_feature_stats(backbone: Path, public_dir: Path, plan: Any) -> None:
    """Give a backbone written before feature statistics existed its public
    statistics (its weights and digest are unchanged)."""
    import torch

    from client.data.site_config import load_site_config
    from client.training.pretrain import public_feature_stats
    from shared_model.backbone import apply_backbone, load_backbone, save_backbone
    from shared_model.model import build_model
    from shared_model.model_config import ModelConfig

    found = load_backbone(backbone)
    if found.feature_centre:
        return
    model = build_model(ModelConfig.from_dict(found.model_config))
    apply_backbone(model, found)
    configs = [load_site_config(y) for y in site_yamls(public_dir)]
    stats = public_feature_stats(model, configs, plan, torch.device("cpu"))
    save_backbone(
        model, backbone, plan=plan, trained_on=found.trained_on, feature_stats=stats
    )


def run_dp_heads(
    out: Path,
    *,
    cohort: Path | None,
    quick: bool,
    seed: int,
    epsilons: tuple[float, ...],
    head_rounds: int,
    pretrain_epochs: int,
    overrides: dict[str, Any],
    reference: Path | None,
    echo: Echo = print,
) -> dict[str, Any]:
    from multisite.training import find_plan
    from simulations.synth import synthesize

    preset, public = ("tiny", "public-tiny") if quick else ("demo", "public")
    out = Path(out)
    cohort_dir, train_yamls, prosp_yamls, test_yamls = prepare_cohort(
        out, cohort, preset, seed, echo
    )
    public_dir = out / "public"
    if not (public_dir / COHORT_RECORD).is_file():
        echo(f"making the {public} cohort in {public_dir} ...")
        synthesize(public_dir, preset=public, seed=seed, force=True)
    plan = find_plan(train_yamls, None)
    backbone = out / "backbone.safetensors"
    if not backbone.is_file():
        pretrain_info = _pretrain_backbone(
            site_yamls(public_dir),
            backbone,
            plan=plan,
            epochs=pretrain_epochs,
            source=f"synthetic public cohort ({public}, seed {seed})",
            seed=seed,
            echo=echo,
        )
    else:
        pretrain_info = {"reused": str(backbone)}
        _add_feature_stats(backbone, public_dir, plan)
    runs: dict[str, float | None] = {"public_backbone": None}
    runs |= {f"dp_eps{e:g}": e for e in epsilons}
    models: dict[str, dict[str, Any]] = {}
    for name, eps in runs.items():
        models[name] = _federate_and_score(
            out,
            name,
            eps,
            preset=preset,
            seed=seed,
            backbone=backbone,
            head_rounds=head_rounds,
            overrides=overrides,
            yamls=train_yamls + prosp_yamls,
            test_yamls=test_yamls,
            oracle=cohort_dir / ORACLE,
            echo=echo,
        )
    result: dict[str, Any] = {
        "preset": preset,
        "cohort_seed": seed if cohort is None else "given",
        "head_rounds": head_rounds,
        "pretrain": {"epochs": pretrain_epochs, **pretrain_info},
        "overrides": overrides,
        "delta": DELTA,
        "clip": CLIP,
        "models": models,
    }
    if reference is not None:
        ref = json.loads(Path(reference).read_text())["result"]["models"]
        if "federated" in ref:
            result["reference"] = {
                "file": str(reference),
                "federated": ref["federated"],
            }
    return result


def _pretrain_backbone(
    yamls: list[Path],
    backbone: Path,
    *,
    plan: Any,
    epochs: int,
    source: str,
    seed: int,
    echo: Echo,
) -> dict[str, Any]:
    """Pretrain the segmentation backbone on the public cohort's sites; what
    the benchmark records of it."""
    from client.training.engine import TrainConfig
    from client.training.pretrain import pretrain

    t0 = time.perf_counter()
    pretrained = pretrain(
        yamls,
        backbone,
        cfg=TrainConfig(
            optimizer="adamw",
            lr=1e-3,
            batch_size=4,
            epochs=epochs,
            augment=True,
            seed=seed,
        ),
        plan=plan,
        source=source,
        echo=echo,
    )
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "val_dice": pretrained.dice,
        "n_train": pretrained.n_train,
        "sha256": pretrained.sha256,
    }


def _federate_and_score(
    out: Path,
    name: str,
    eps: float | None,
    *,
    preset: str,
    seed: int,
    backbone: Path,
    head_rounds: int,
    overrides: dict[str, Any],
    yamls: list[Path],
    test_yamls: list[Path],
    oracle: Path,
    echo: Echo,
) -> dict[str, Any]:
    """A fresh federation under ``out/name`` (every site under DP-SGD at
    ``eps``, or none when None), scored on every cohort, with its time and,
    under DP, the sites' ledgers checked."""
    from multisite.evaluation import run_evaluation
    from simulations.simulate import run_simulated_federation

    run = out / name
    if run.exists():
        shutil.rmtree(run)
    t0 = time.perf_counter()
    run_simulated_federation(
        out,
        preset=preset,
        seed=seed,
        overrides={
            "backbone": str(backbone.resolve()),
            "head-rounds": head_rounds,
            "run-dir": str(run.resolve()),
            **overrides,
        },
        privacy=(
            None
            if eps is None
            else {"target_epsilon": eps, "delta": DELTA, "max_grad_norm": CLIP}
        ),
        echo=echo,
    )
    seconds = time.perf_counter() - t0
    echo(f"scoring {name} ...")
    report = run_evaluation(
        run,
        yamls,
        out / "evaluation" / name,
        test_yamls=test_yamls,
        oracle=oracle,
    )
    row = summarise(report)
    row["train_seconds"] = round(seconds, 1)
    row["round_seconds"] = _round_seconds(run)
    if eps is not None:
        row["epsilon"] = eps
        row["ledger"] = _ledger_check(run)
    return row


def table(result: dict[str, Any]) -> str:
    """Markdown: test-cohort AUC, share of the oracle's gain, epsilon, time."""
    lines = [
        "| model | validation AUC | test AUC (95% CI) | test Dice | share of the "
        "oracle's gain (test) | advised nCRT / TNT / nCT | epsilon (ledger = "
        "metrics) | head round s (first / later; site training) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = dict(result["models"])
    if "reference" in result:
        rows = {"staged, federated backbone (no DP)": result["reference"]["federated"]}
        rows |= result["models"]
    for name, row in rows.items():
        val, test = row.get("validation", {}), row.get("test", {})
        ledger = row.get("ledger") or {}
        eps = (
            "-"
            if not ledger
            else f"{max(v['ledger_epsilon'] for v in ledger.values()):.2f} of "
            f"{row['epsilon']:g} ("
            + ("equal" if all(v["equal"] for v in ledger.values()) else "DIFFER")
            + ")"
        )
        secs = row.get("round_seconds") or {}
        timing = (
            "-"
            if not secs
            else f"{secs.get('first') or 0:.0f} / {secs.get('later_median') or 0:.1f}"
            f"; {secs.get('site_train_median') or 0:.2f}"
        )
        lines.append(
            f"| {name} | {_fmt_auc(val.get('auc'), ci=False)} | "
            f"{_fmt_auc(test.get('auc'))} | "
            f"{'n/a' if test.get('dice') is None else format(test['dice'], '.3f')} | "
            f"{format_share(test.get('share_of_oracle_gain'))} | "
            + " / ".join(
                str((test.get("recommended") or {}).get(r, "-"))
                for r in ("nCRT", "TNT", "nCT")
            )
            + f" | {eps} | {timing} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, "dp_heads", "tiny cohort, 3 head rounds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cohorts")
    parser.add_argument("--epsilons", type=float, nargs="*", default=[8.0, 4.0, 1.0])
    parser.add_argument("--head-rounds", type=int, default=20)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument(
        "--run-config",
        default="head-type='linear' head-fit='rounds' evaluate-every=0",
        help="Flower-style overrides for every federation (default: the linear "
        "head, no in-round evaluation: every model is scored afterwards, and the "
        "rounds' times compare like with like)",
    )
    parser.add_argument("--reference", type=Path, help="quality JSON of this cohort")
    args = parser.parse_args(argv)
    from shared_model.federation_config import parse_run_config

    result = run_dp_heads(
        args.out,
        cohort=args.cohort,
        quick=args.quick,
        seed=args.seed,
        epsilons=tuple(args.epsilons),
        head_rounds=3 if args.quick else args.head_rounds,
        pretrain_epochs=2 if args.quick else args.pretrain_epochs,
        overrides=parse_run_config(args.run_config),
        reference=args.reference,
    )
    finish(args, "dp_heads", table(result), result)


if __name__ == "__main__":
    main()
