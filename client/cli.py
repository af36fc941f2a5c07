"""The ``moefl`` command line: thin wrappers over functions that tests call.

Each command parses its arguments, calls one library function, prints the
result and exits non-zero on failure. A :class:`MoeflError` is printed as a
plain message (no traceback): it already says what to fix.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from shared_model.errors import ConfigError, MoeflError

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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from simulations.scoreboard import format_scoreboard
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
                test_size=test_size,
                workers=workers or None,
                force=force,
                progress=progress,
            )
        except MoeflError as e:
            _fail(e)
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


@app.command()
def check(
    site_yaml: Annotated[Path, typer.Argument(help="The site YAML to check.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON.")
    ] = False,
    run_config: Annotated[
        str,
        typer.Option(
            help="The federation's run config (Flower-style, e.g. \"backbone="
            "'b.safetensors' head-rounds=20\"): a DP site's feasibility is "
            "worked out for it (default: the run config's defaults)."
        ),
    ] = "",
) -> None:
    """Preflight a site's data and config; exit 0 when clean, 1 on errors."""
    from client.checks import format_report, run_check
    from shared_model.federation_config import FederationConfig

    try:
        fed = FederationConfig.from_run_config(parse_run_config(run_config))
    except MoeflError as e:
        _fail(e)
    report = run_check(site_yaml, fed)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(format_report(report))
    raise typer.Exit(code=0 if report.ok else 1)


@app.command(context_settings={"allow_extra_args": True})
def train(
    ctx: typer.Context,
    sites: Annotated[
        list[Path],
        typer.Option(
            "--sites", help="Site YAML(s): one = local-only, several = pooled."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Run folder.")],
    epochs: Annotated[int, typer.Option(help="Passes over the training patients.")] = 8,
    batch_size: Annotated[int, typer.Option(help="Patients per step.")] = 4,
    lr: Annotated[float, typer.Option(help="Initial learning rate.")] = 0.01,
    optimizer: Annotated[str, typer.Option(help="sgd (nnU-Net) | adamw")] = "sgd",
    pos_weight: Annotated[
        float, typer.Option(help="BCE weight of pCR=1 cases (>1 favours sensitivity).")
    ] = 1.0,
    base_filters: Annotated[
        int, typer.Option(help="First-level filters (nnU-Net: 32).")
    ] = 8,
    max_filters: Annotated[int, typer.Option(help="Filter cap (nnU-Net: 320).")] = 256,
    plan: Annotated[
        Path | None,
        typer.Option(
            help="plan.json (default: the synthetic cohort's, else the demo plan)."
        ),
    ] = None,
    image_only: Annotated[
        bool,
        typer.Option(
            "--image-only/--no-image-only", help="Also train the image-only comparator."
        ),
    ] = True,
    augment: Annotated[bool, typer.Option("--augment/--no-augment")] = True,
    device: Annotated[
        str | None, typer.Option(help="Override the site's device.")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    training: Annotated[
        str,
        typer.Option(
            help="staged: segmentation for --epochs, then the pCR heads over "
            "cached tumour features for --head-epochs; joint: the study's "
            "multi-task training."
        ),
    ] = "staged",
    head_epochs: Annotated[
        int, typer.Option(help="Staged: epochs of head training.")
    ] = 200,
    head_lr: Annotated[
        float, typer.Option(help="Staged: AdamW rate of the heads.")
    ] = 0.001,
) -> None:
    """Local-only (one site) or pooled (several sites) training with comparators.

    Several sites may follow one --sites: `--sites a.yaml b.yaml c.yaml`.
    """
    from client.engine import TrainConfig
    from client.heads import HeadConfig
    from client.train import find_plan, run_training
    from shared_model.loss import LossConfig

    sites = _site_yamls(sites, ctx)
    try:
        cfg = TrainConfig(
            optimizer=optimizer,
            lr=lr,
            batch_size=batch_size,
            epochs=epochs,
            augment=augment,
            seed=seed,
            loss=LossConfig(pos_weight=pos_weight),
        )
        run = run_training(
            sites,
            out,
            cfg=cfg,
            plan=find_plan(sites, plan),
            model_overrides={"base_filters": base_filters, "max_filters": max_filters},
            image_only=image_only,
            device=device,
            training=training,
            head=HeadConfig(
                epochs=head_epochs, lr=head_lr, pos_weight=pos_weight, seed=seed
            ),
            echo=typer.echo,
        )
    except MoeflError as e:
        _fail(e)
    m = run.metrics
    typer.echo(
        f"model: val AUC {_fmt(m['final']['auc'])}, Dice {_fmt(m['final']['dice'])}; "
        + ", ".join(f"{k} AUC {_fmt(v['auc'])}" for k, v in m["comparators"].items())
    )
    typer.echo(f"wrote {run.out}/model.safetensors and metrics.json")


@app.command()
def pretrain(
    public: Annotated[
        list[Path],
        typer.Argument(
            help="The public data: a public synthetic cohort folder (`moefl synth "
            "--preset public`), its site_configs folder, or public site YAMLs."
        ),
    ],
    out: Annotated[Path, typer.Option(help="The backbone file to write.")] = Path(
        "backbone.safetensors"
    ),
    epochs: Annotated[int, typer.Option(help="Passes over the public cases.")] = 8,
    batch_size: Annotated[int, typer.Option(help="Cases per step.")] = 4,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (poly decay).")] = 1e-3,
    base_filters: Annotated[int, typer.Option(help="As the federation's.")] = 8,
    max_filters: Annotated[int, typer.Option(help="As the federation's.")] = 256,
    plan: Annotated[
        Path | None,
        typer.Option(help="The federation's plan.json (default: the cohort's)."),
    ] = None,
    source: Annotated[
        str, typer.Option(help="What the data is, recorded in the artifact.")
    ] = "",
    device: Annotated[str | None, typer.Option(help="Override the device.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train the segmentation backbone on public data (for DP federations)."""
    import json

    from client.engine import TrainConfig
    from client.pretrain import pretrain as run_pretrain
    from client.train import find_plan

    try:
        folders = [
            p / "site_configs" if (p / "site_configs").is_dir() else p for p in public
        ]
        yamls = _yamls_in(folders)
        cohort = public[0] / "cohort.json"
        if not source and cohort.is_file():
            info = json.loads(cohort.read_text())
            if not info.get("public"):
                raise ConfigError(
                    f"{public[0]} is a site cohort, not a public one: a backbone "
                    "for DP sites must not see their patients; use `moefl synth "
                    "--preset public`"
                )
            source = f"synthetic public cohort ({info['preset']}, seed {info['seed']})"
        result = run_pretrain(
            yamls,
            out,
            cfg=TrainConfig(
                optimizer="adamw",
                lr=lr,
                batch_size=batch_size,
                epochs=epochs,
                augment=True,
                seed=seed,
            ),
            plan=find_plan(yamls, plan),
            source=source or "public data (unnamed)",
            model_overrides={"base_filters": base_filters, "max_filters": max_filters},
            device=device,
            echo=typer.echo,
        )
    except MoeflError as e:
        _fail(e)
    typer.echo(
        f"wrote {result.path}: sha256 {result.sha256}, val Dice {_fmt(result.dice)} "
        f"({result.n_train} training cases, {result.seconds:.0f} s)"
    )


@app.command("import-msd")
def import_msd_cmd(
    task: Annotated[
        Path,
        typer.Argument(help="An MSD task folder with T2 and ADC (Task05_Prostate)."),
    ],
    out: Annotated[Path, typer.Argument(help="Where the public site is written.")],
    site_name: Annotated[str, typer.Option(help="The public site's name.")] = (
        "msd_prostate"
    ),
) -> None:
    """Import a public MSD dataset (T2W + ADC) as a site for `moefl pretrain`."""
    from client.public_data import import_msd

    try:
        result = import_msd(task, out, site_name=site_name)
    except MoeflError as e:
        _fail(e)
    typer.echo(
        f"imported {len(result.cases)} cases into {result.dataset_dir} (ADC unit "
        f"{result.adc_unit}); site YAML {result.site_yaml}"
    )
    for case, why in result.skipped.items():
        typer.echo(f"  skipped {case}: {why}")
    typer.echo(
        f"next: moefl check {result.site_yaml}; moefl pretrain {result.site_yaml} --plan "
        "<the federation's plan.json>"
    )


def _site_yamls(sites: list[Path], ctx: typer.Context) -> list[Path]:
    """``--sites a.yaml b.yaml ...``: the option's value plus the YAMLs after it."""
    extra = [Path(a) for a in ctx.args]
    if any(a.suffix not in (".yaml", ".yml") for a in extra):
        _fail(MoeflError(f"unexpected arguments {ctx.args}; site configs end in .yaml"))
    return [*sites, *extra]


def _yamls_in(paths: list[Path]) -> list[Path]:
    """Each path as given, or the ``*.yaml`` files of a folder (sorted)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob("*.yaml"))
            if not found:
                raise ConfigError(f"{p}: no site YAML (*.yaml) in this folder")
            out.extend(found)
        else:
            out.append(p)
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@app.command()
def predict(
    checkpoint: Annotated[
        Path,
        typer.Argument(help="Folder with model.safetensors, config.json, plan.json."),
    ],
    t2w: Annotated[Path, typer.Option("--t2w", help="T2-weighted NIfTI.")],
    adc: Annotated[Path, typer.Option("--adc", help="ADC NIfTI on the T2W grid.")],
    clinical: Annotated[
        list[str],
        typer.Option(
            "--clinical", help="KEY=VALUE, repeat for cT, cN, EMVI, CRM, LLN, location."
        ),
    ],
    adc_unit: Annotated[
        str, typer.Option(help="Unit of the stored ADC: 1e-3 or 1e-6.")
    ] = "1e-3",
    mask_out: Annotated[
        Path | None, typer.Option(help="Write the predicted mask here (input grid).")
    ] = None,
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Segment one patient and print pCR probability under each regimen as JSON."""
    from client.predict import parse_clinical_args, predict_case, save_mask

    try:
        values = parse_clinical_args(clinical)
        result = predict_case(
            checkpoint,
            t2=t2w,
            adc=adc,
            clinical=values,
            adc_unit=adc_unit,
            device=device,
        )
        if mask_out is not None:
            save_mask(result.mask, t2w, mask_out)
    except MoeflError as e:
        _fail(e)
    typer.echo(json.dumps(result.to_dict(), indent=2))


@app.command("evaluate", context_settings={"allow_extra_args": True})
def evaluate_cmd(
    ctx: typer.Context,
    checkpoint: Annotated[
        Path,
        typer.Argument(help="Folder with model.safetensors, config.json, plan.json."),
    ],
    sites: Annotated[
        list[Path],
        typer.Option(
            "--sites",
            help="Site YAMLs: training sites give their validation split, "
            "evaluate sites (prospective) all their cases. Repeat or list.",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder for metrics.json.")],
    test: Annotated[
        list[Path],
        typer.Option(
            "--test",
            help="The held-out test cohort: a folder of evaluate-site YAMLs "
            "(e.g. COHORT/test/site_configs) or one YAML; repeat for more. "
            "Scored at the validation threshold; never used to choose anything.",
        ),
    ] = [],  # noqa: B006
    oracle: Annotated[
        Path | None,
        typer.Option(
            help="Simulation only: the cohort's oracle/ folder (adds the true "
            "value of the advice and its share of the oracle's gain)."
        ),
    ] = None,
    margin: Annotated[
        float, typer.Option(help="Recommendation margin on predicted pCR.")
    ] = 0.05,
    min_expert_support: Annotated[
        int,
        typer.Option(
            help="Never recommend a regimen whose expert the checkpoint records as "
            "trained on fewer patients (summed over sites)."
        ),
    ] = 30,
    target_sensitivity: Annotated[float, typer.Option()] = 0.8,
    device: Annotated[str | None, typer.Option()] = None,
    clinical_only: Annotated[
        bool,
        typer.Option(
            help="Score the clinical-only comparator (logistic regression fitted "
            "on the training sites' pooled training splits) instead of the network."
        ),
    ] = False,
    against: Annotated[
        str | None,
        typer.Option(
            help="Paired comparison (exact McNemar) against another checkpoint "
            "folder, or `clinical` for the clinical-only comparator."
        ),
    ] = None,
) -> None:
    """Evaluate a model: metrics with intervals, recommendations, policy value."""
    from client.evaluation import headline, run_evaluation
    from shared_model.policy import RecommendationRule

    sites = _site_yamls(sites, ctx)
    try:
        if not 0 < target_sensitivity <= 1:
            raise ConfigError("--target-sensitivity must be in (0, 1]")
        try:
            rule = RecommendationRule(margin=margin)
        except ValueError as e:
            raise ConfigError(f"--margin: {e}") from e
        report = run_evaluation(
            checkpoint,
            sites,
            out,
            test_yamls=_yamls_in(test),
            oracle=oracle,
            min_expert_support=min_expert_support,
            rule=rule,
            target_sensitivity=target_sensitivity,
            device=device,
            clinical_only=clinical_only,
            against=against,
            echo=typer.echo,
        )
    except MoeflError as e:
        _fail(e)
    typer.echo(headline(report))
    typer.echo(f"wrote {out / 'metrics.json'}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A federated run folder.")],
    compare: Annotated[
        list[str],
        typer.Option(
            "--compare",
            help="NAME=FOLDER of another model's `moefl evaluate` output (repeat).",
        ),
    ] = [],  # noqa: B006
) -> None:
    """Write report.md and report.html (with PNG figures) into a run folder."""
    from client.report import build_report

    try:
        comparators = {}
        for item in compare:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                raise ConfigError(f"--compare {item!r}: expected NAME=FOLDER")
            comparators[name] = Path(folder)
        md, page = build_report(run_dir, comparators)
    except MoeflError as e:
        _fail(e)
    typer.echo(f"wrote {md} and {page}")


def parse_run_config(text: str) -> dict[str, Any]:
    """Flower-style ``"key=value key2='text'"`` into a dict (numbers, booleans, text)."""
    import shlex

    out: dict[str, Any] = {}
    for item in shlex.split(text):
        if "=" not in item:
            raise MoeflError(f"--run-config item {item!r}: expected key=value")
        key, value = item.split("=", 1)
        parsed: Any = value
        if value.lower() in ("true", "false"):
            parsed = value.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    parsed = kind(value)
                    break
                except ValueError:
                    continue
        out[key.strip()] = parsed
    return out


@app.command()
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
    from simulations.simulate import run_simulated_federation

    try:
        overrides = parse_run_config(run_config)
        if rounds is not None:
            overrides["num-server-rounds"] = rounds
        if backbone is not None:
            overrides["backbone"] = str(backbone.resolve())
        privacy = None
        if dp_epsilon is not None:
            privacy = _privacy_option(dp_epsilon, dp_delta, dp_clip)
        record = run_simulated_federation(
            out,
            preset=preset,
            seed=seed,
            overrides=overrides,
            privacy=privacy,
            echo=typer.echo,
        )
    except MoeflError as e:
        _fail(e)
    from simulations.simulate import format_run_summary

    typer.echo(format_run_summary(record))


def _privacy_option(epsilon: float, delta: float, clip: float) -> dict[str, float]:
    """The ``privacy`` section for ``--dp-*`` options, checked like a site YAML's."""
    from client.site_config import parse_privacy

    problems: list[Any] = []
    raw = {"target_epsilon": epsilon, "delta": delta, "max_grad_norm": clip}
    if parse_privacy(raw, problems) is None:
        option = {
            "privacy.target_epsilon": "--dp-epsilon",
            "privacy.delta": "--dp-delta",
        }
        raise ConfigError(
            "; ".join(
                f"{option.get(p.key, '--dp-clip')}: {p.message}" for p in problems
            )
        )
    return raw


@app.command()
def certs(
    out: Annotated[
        Path, typer.Argument(help="Folder for ca.crt, ca.key, server.pem, server.key.")
    ],
    host: Annotated[
        list[str],
        typer.Option("--host", help="IP or DNS name of the SuperLink (repeat)."),
    ] = ["127.0.0.1", "localhost"],  # noqa: B006
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
) -> None:
    """Coordinator: a CA and the SuperLink's TLS certificate."""
    from server.deploy import make_certificates

    try:
        paths = make_certificates(out, hosts=host, days=days)
    except MoeflError as e:
        _fail(e)
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")
    typer.echo(f"give {paths['ca_cert']} to every site; keep {paths['ca_key']} offline")


@app.command()
def site_key(
    out: Annotated[Path, typer.Argument(help="Folder for <site>.key and <site>.pub.")],
    site: Annotated[str, typer.Argument(help="The site's name (as in its YAML).")],
) -> None:
    """Site: an authentication key pair (send only the .pub to the coordinator)."""
    from server.deploy import make_site_key

    try:
        private, public = make_site_key(out, site)
    except MoeflError as e:
        _fail(e)
    typer.echo(
        f"wrote {private} (keep it on this site) and {public} (send to the coordinator)"
    )


@app.command()
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
    from client.demo import run_demo

    try:
        ok = run_demo(out, preset=preset, seed=seed, rounds=rounds, echo=typer.echo)
    except MoeflError as e:
        _fail(e)
    raise typer.Exit(code=0 if ok else 1)


if __name__ == "__main__":  # pragma: no cover
    app()
