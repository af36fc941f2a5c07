"""The demo job behind ``make demo``: a synthetic federation, end to end.

Makes the ``demo`` cohort (reused when already there with the same preset and
seed), runs the preflight check on every site, then a simulated federation of
the three retrospective sites.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client.checks.preflight import run_check
from shared_model.layout import COHORT_RECORD, ORACLE, PROSPECTIVE, TEST, site_yamls
from simulations.response import WORLD_VERSION
from simulations.synth import synthesize


def run_demo(
    out: Path,
    *,
    preset: str = "demo",
    seed: int = 0,
    rounds: int = 8,
    echo: Callable[[str], None] = lambda s: None,
    progress: Callable[[str, int, int], None] | None = None,
) -> bool:
    """Make (or reuse) the cohort under ``out/cohort``, check every site, run
    ``rounds`` federated rounds in simulation under ``out/federated``, evaluate
    the model on the validation, prospective and held-out test cohorts (with
    the oracle's true policy value and share of its gain beside the estimates)
    and write the report. ``progress(label, done, total)``: the cohort's
    generation and the evaluation, patient by patient.

    Returns:
        True when every site passes its check (and the federation finished).
    """
    cohort_dir = Path(out) / "cohort"
    summary = _make_or_reuse_cohort(cohort_dir, preset, seed, echo, progress)
    aucs = summary["aucs"]
    echo(
        f"  clinical-only AUC (5-fold CV) {aucs['clinical_logreg_auc_cv']}, oracle AUC "
        f"{aucs['oracle_auc']}"
    )
    if "scoreboard" in summary:
        from simulations.scoreboard import format_scoreboard

        echo(format_scoreboard(summary["scoreboard"]))
    yamls = site_yamls(cohort_dir) + site_yamls(cohort_dir, PROSPECTIVE)
    tests = site_yamls(cohort_dir, TEST)
    all_ok = _check_sites(cohort_dir, yamls + tests, echo)
    if not all_ok or rounds == 0:
        return all_ok
    _federate_and_evaluate(
        Path(out), preset, seed, rounds, yamls, tests, echo, progress
    )
    return True


def _make_or_reuse_cohort(
    cohort_dir: Path,
    preset: str,
    seed: int,
    echo: Callable[[str], None],
    progress: Callable[[str, int, int], None] | None,
) -> dict[str, Any]:
    """The cohort's summary; the cohort is made again unless the one there has
    the same preset, seed and world version, with images."""
    summary_path = cohort_dir / COHORT_RECORD
    reuse = False
    if summary_path.is_file():
        summary: dict[str, Any] = json.loads(summary_path.read_text())
        reuse = (
            summary.get("preset") == preset
            and summary.get("seed") == seed
            and summary.get("world_version") == WORLD_VERSION
            and not summary.get("tables_only")
        )
    if reuse:
        echo(f"reusing the {preset} cohort in {cohort_dir}")
        return summary
    echo(f"generating the {preset} cohort in {cohort_dir} ...")
    result = synthesize(
        cohort_dir,
        preset=preset,
        seed=seed,
        force=True,
        progress=None
        if progress is None
        else lambda done, total: progress(f"cohort {preset}", done, total),
    )
    summary = result.summary
    echo(
        f"  {summary['n_retrospective']} retrospective + {summary['n_prospective']} "
        f"prospective + {summary.get('n_test', 0)} test cases in "
        f"{result.seconds:.1f} s"
    )
    return summary


def _check_sites(
    cohort_dir: Path, paths: list[Path], echo: Callable[[str], None]
) -> bool:
    """Run the preflight check on every site YAML; whether all passed."""
    all_ok = True
    for path in paths:
        report = run_check(path)
        all_ok &= report.ok
        n = report.summary.get("usable_cases", 0)
        echo(
            f"  check {path.relative_to(cohort_dir)}: {'ok' if report.ok else 'FAILED'} "
            f"({n} usable cases, {len(report.errors)} errors, "
            f"{len(report.warnings)} warnings)"
        )
    return all_ok


def _federate_and_evaluate(
    out: Path,
    preset: str,
    seed: int,
    rounds: int,
    yamls: list[Path],
    tests: list[Path],
    echo: Callable[[str], None],
    progress: Callable[[str, int, int], None] | None,
) -> None:
    """A fresh simulated federation, its evaluation on every cohort, the report."""
    from simulations.simulate import format_run_summary, run_simulated_federation

    cohort_dir = out / "cohort"
    federated = out / "federated"
    if federated.exists():
        import shutil

        shutil.rmtree(federated)
    record = run_simulated_federation(
        out,
        preset=preset,
        seed=seed,
        overrides={"num-server-rounds": rounds},
        echo=echo,
    )
    echo(format_run_summary(record))
    echo(f"run folder: {federated} (metrics.json, checkpoints/, model.safetensors)")
    from multisite.evaluation import run_evaluation
    from multisite.evaluation_text import headline
    from server.report import build_report

    echo(
        "evaluating the federated model (validation, prospective and test cohorts) ..."
    )
    evaluation = run_evaluation(
        federated,
        yamls,
        federated / "evaluation",
        test_yamls=tests,
        oracle=cohort_dir / ORACLE,
        echo=echo,
        progress=progress,
    )
    echo(headline(evaluation))
    md, page = build_report(federated)
    echo(f"report: {page} (and {md.name}, with its figures)")
