"""The ``moefl`` command line: thin wrappers over functions that tests call.

Each command parses its arguments, calls one library function, prints the
result and exits non-zero on failure. A :class:`MoeflError` is printed as a
plain message (no traceback): it already says what to fix.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from shared_model.errors import MoeflError

app = typer.Typer(
    help="Federated UNet-MoE-Cli: synthetic cohorts, site checks, training, simulation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(error: MoeflError) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(code=2)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@app.command()
def synth(
    out: Annotated[
        Path,
        typer.Argument(
            help="Output folder (empty, or a previous synth output with --force)."
        ),
    ],
    preset: Annotated[str, typer.Option(help="tiny | demo | paper")] = "demo",
    seed: Annotated[int, typer.Option(help="Seed: same seed, same cohort.")] = 0,
    tables_only: Annotated[
        bool,
        typer.Option(
            "--tables-only",
            help="Clinical tables, oracle and cohort.json only (no images).",
        ),
    ] = False,
    workers: Annotated[
        int, typer.Option(help="Image-writing processes (0 = all cores).")
    ] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a previous synth output in OUT.")
    ] = False,
) -> None:
    """Generate a synthetic multi-centre rectal MRI cohort in nnU-Net raw format."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from simulations.synth import synthesize

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(f"synth {preset}", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            result = synthesize(
                out,
                preset=preset,
                seed=seed,
                tables_only=tables_only,
                workers=workers or None,
                force=force,
                progress=progress,
            )
        except MoeflError as e:
            _fail(e)
    s = result.summary
    typer.echo(
        f"wrote {s['n_retrospective']} retrospective + {s['n_prospective']} "
        f"prospective cases to {out} in {result.seconds:.1f} s"
    )
    for regimen, v in s["retrospective_by_regimen"].items():
        typer.echo(f"  {regimen:5s} n={v['n']:4d}  pCR {v['pcr_rate']:.1%}")
    aucs = s["aucs"]
    typer.echo(
        f"  clinical-only logistic AUC (5-fold CV) {aucs['clinical_logreg_auc_cv']}, "
        f"oracle AUC {aucs['oracle_auc']}"
    )


@app.command()
def check(
    site_yaml: Annotated[Path, typer.Argument(help="The site YAML to check.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON.")
    ] = False,
) -> None:
    """Preflight a site's data and config; exit 0 when clean, 1 on errors."""
    from client.checks import format_report, run_check

    report = run_check(site_yaml)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(format_report(report))
    raise typer.Exit(code=0 if report.ok else 1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder of the demo run.")] = Path(
        "demo_run"
    ),
    preset: Annotated[str, typer.Option(help="Cohort preset.")] = "demo",
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """The main job on the built-in synthetic default: cohort, then site checks."""
    from client.demo import run_demo

    try:
        ok = run_demo(out, preset=preset, seed=seed, echo=typer.echo)
    except MoeflError as e:
        _fail(e)
    raise typer.Exit(code=0 if ok else 1)


if __name__ == "__main__":  # pragma: no cover
    app()
