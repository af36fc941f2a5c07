"""Simulation commands: a synthetic cohort, a federation on one machine, the
main job (the demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import fail, privacy_option, progress_bar
from shared_model.errors import MoeflError
from shared_model.plan import PLAN_FILE


def synth(
    out: Annotated[
        Path,
        typer.Argument(
            help="Output folder (empty, or a previous synth output with --force)."
        ),
    ],
    preset: Annotated[
        str,
        typer.Option(
            help="tiny | demo | paper; public | public-tiny: a public pretraining "
            "cohort (own random stream, no site holds its patients)"
        ),
    ] = "demo",
    seed: Annotated[int, typer.Option(help="Seed: same seed, same cohort.")] = 0,
    tables_only: Annotated[
        bool,
        typer.Option(
            "--tables-only",
            help="Clinical tables, oracle and cohort.json only (no images).",
        ),
    ] = False,
    test_size: Annotated[
        int | None,
        typer.Option(
            help="Patients in the held-out test cohort OUT/test (default: the "
            "preset's: tiny 30, demo 400, paper 1000)."
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option(help="Image-writing processes (0 = all cores).")
    ] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a previous synth output in OUT.")
    ] = False,
) -> None:
    """Generate a synthetic multi-centre rectal MRI cohort in nnU-Net raw format."""
    from simulations.scoreboard import format_scoreboard
    from simulations.synth import synthesize

    with progress_bar() as update:
        try:
            result = synthesize(
                out,
                preset=preset,
                seed=seed,
                tables_only=tables_only,
                test_size=test_size,
                workers=workers or None,
                force=force,
                progress=lambda done, total: update(f"synth {preset}", done, total),
            )
        except MoeflError as e:
            fail(e)
    s = result.summary
    typer.echo(
        f"wrote {s['n_retrospective']} retrospective + {s['n_prospective']} "
        f"prospective + {s['n_test']} test cases to {out} in {result.seconds:.1f} s"
    )
    if s["public"]:
        typer.echo(
            "  a public pretraining cohort (own random stream): train a backbone "
            f"with `moefl pretrain {out}`"
        )
        return
    for regimen, v in s["retrospective_by_regimen"].items():
        typer.echo(f"  {regimen:5s} n={v['n']:4d}  pCR {v['pcr_rate']:.1%}")
    aucs = s["aucs"]
    typer.echo(
        f"  clinical-only logistic AUC (5-fold CV) {aucs['clinical_logreg_auc_cv']}, "
        f"oracle AUC {aucs['oracle_auc']}"
    )
    typer.echo(format_scoreboard(s["scoreboard"]))


def simulate(
    preset: Annotated[
        str, typer.Option(help="Synthetic cohort preset (made if missing).")
    ] = "demo",
    out: Annotated[
        Path, typer.Option(help="Folder for cohort/ and federated/.")
    ] = Path("runs/simulation"),
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    run_config: Annotated[
        str,
        typer.Option(
            help="Flower-style overrides: \"strategy='fedprox' local-epochs=2\"."
        ),
    ] = "",
    seed: Annotated[int, typer.Option()] = 0,
    dp_epsilon: Annotated[
        float | None,
        typer.Option(
            help="Every site trains with DP-SGD under this budget (target epsilon)."
        ),
    ] = None,
    dp_delta: Annotated[float, typer.Option(help="Delta of that budget.")] = 1e-5,
    dp_clip: Annotated[
        float, typer.Option(help="Per-patient gradient clip (max_grad_norm).")
    ] = 1.0,
    backbone: Annotated[
        Path | None,
        typer.Option(
            help="A pretrained public backbone (`moefl pretrain`): the federation "
            "trains the heads alone over it (with --dp-epsilon: under DP)."
        ),
    ] = None,
) -> None:
    """Run the whole federation on this machine with Flower's simulation runtime."""
    from shared_model.federation_config import parse_run_config
    from simulations.simulate import run_simulated_federation

    try:
        overrides = parse_run_config(run_config)
        if rounds is not None:
            overrides["num-server-rounds"] = rounds
        if backbone is not None:
            overrides["backbone"] = str(backbone.resolve())
        privacy = None
        if dp_epsilon is not None:
            privacy = privacy_option(dp_epsilon, dp_delta, dp_clip)
        record = run_simulated_federation(
            out,
            preset=preset,
            seed=seed,
            overrides=overrides,
            privacy=privacy,
            echo=typer.echo,
        )
    except MoeflError as e:
        fail(e)
    from simulations.simulate import format_run_summary

    typer.echo(format_run_summary(record))


def demo(
    out: Annotated[Path, typer.Option(help="Folder of the demo run.")] = Path(
        "demo_run"
    ),
    preset: Annotated[str, typer.Option(help="Cohort preset.")] = "demo",
    seed: Annotated[int, typer.Option()] = 0,
    rounds: Annotated[
        int, typer.Option(help="Federated rounds (0: cohort and checks only).")
    ] = 8,
) -> None:
    """The main job on the built-in synthetic default: cohort, site checks, federation."""
    from simulations.demo import run_demo

    try:
        with progress_bar() as update:
            ok = run_demo(
                out,
                preset=preset,
                seed=seed,
                rounds=rounds,
                echo=typer.echo,
                progress=update,
            )
    except MoeflError as e:
        fail(e)
    raise typer.Exit(code=0 if ok else 1)


def plan(
    sites: Annotated[
        list[Path], typer.Argument(help="Site YAMLs (or folders of them) to plan for.")
    ],
    out: Annotated[Path, typer.Option(help="The plan.json to write.")] = Path(
        PLAN_FILE
    ),
    simulate: Annotated[
        bool,
        typer.Option(
            "--simulate",
            help="Ask the sites over Flower's simulation runtime (the planning "
            "query a federation sends; DP sites noise their fingerprints) instead "
            "of reading their data here.",
        ),
    ] = False,
    memory_gb: Annotated[
        float, typer.Option(help="GPU memory a patch may take (nnU-Net: 8).")
    ] = 8.0,
) -> None:
    """One plan for the sites from their aggregate fingerprints (nnU-Net's
    rules); writes plan.json and plan_fingerprint.json beside it."""
    from cli.common import yamls_in
    from shared_model.errors import ConfigError

    try:
        yamls = yamls_in(sites)
        if simulate:
            record = _simulated_planning(yamls, out, memory_gb)
        else:
            record = _local_planning(yamls, memory_gb)
    except (MoeflError, ValueError) as e:
        fail(e if isinstance(e, MoeflError) else ConfigError(str(e)))
    from server.planning import save_plan
    from shared_model.plan import Plan

    result = Plan.from_dict(record["plan"])
    save_plan(out, result, record)
    typer.echo(
        f"wrote {out}: spacing {result.spacing} mm, patch {result.patch_size}, ADC "
        f"clip {result.adc_clip} ({sum(record['cases'].values())} cases at "
        f"{len(record['sites'])} sites); fingerprint in "
        f"{out.parent / 'plan_fingerprint.json'}"
    )
    for site, reason in record.get("excluded", {}).items():
        typer.echo(f"  excluded {site}: {reason}")


def _local_planning(yamls: list[Path], memory_gb: float) -> dict:
    """The planning record from site data readable on this machine (exact)."""
    from client.checks.fingerprint import site_fingerprint
    from client.data.site_config import load_site_config
    from server.planning import plan_record

    configs = [load_site_config(y) for y in yamls]
    _, record = plan_record(
        {c.site_name: site_fingerprint(c) for c in configs}, memory_gb
    )
    return record


def _simulated_planning(yamls: list[Path], out: Path, memory_gb: float) -> dict:
    """The planning record of a plan-only federation in Flower's simulation."""
    import json
    import os
    import tempfile

    from simulations.simulate import run_flower_simulation

    with tempfile.TemporaryDirectory(prefix="moefl-plan-") as tmp:
        sites_dir = Path(tmp) / "sites"
        sites_dir.mkdir()
        for y in yamls:  # the partitions take the YAMLs in name order
            os.symlink(y.resolve(), sites_dir / y.name)
        run_dir = Path(tmp) / "run"
        run_flower_simulation(
            {
                "sites-dir": str(sites_dir),
                "run-dir": str(run_dir),
                "plan-only": True,
                "plan-memory-gb": memory_gb,
                "min-sites": len(yamls),
            },
            len(yamls),
        )
        path = run_dir / "plan_fingerprint.json"
        if not path.is_file():
            raise MoeflError(f"the planning query wrote no plan for {out}; see the log")
        return dict(json.loads(path.read_text()))
