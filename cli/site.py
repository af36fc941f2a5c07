"""Site commands: a hospital checks its data, trains locally, pretrains a
backbone on public data, scores patients, evaluates a model, makes its key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.common import fail, progress_bar, site_yamls, yamls_in
from shared_model.errors import ConfigError, MoeflError
from shared_model.federated_metrics import format_metric
from shared_model.federation_config import FederationConfig
from shared_model.layout import COHORT_RECORD, PREPROCESSED, SITE_CONFIGS

if TYPE_CHECKING:
    from client.training.engine import TrainConfig
    from multisite.training import TrainRun


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
    prepare: Annotated[
        bool,
        typer.Option(
            "--prepare",
            help="When the check passes, preprocess every case once into the "
            "site's store (run_dir/preprocessed) for the federation's plan.",
        ),
    ] = False,
    plan: Annotated[
        Path | None,
        typer.Option(help="With --prepare: the federation's plan.json."),
    ] = None,
) -> None:
    """Preflight a site's data and config; exit 0 when clean, 1 on errors."""
    from client.checks.preflight import format_report, run_check
    from shared_model.federation_config import parse_run_config

    try:
        fed = FederationConfig.from_run_config(parse_run_config(run_config))
    except MoeflError as e:
        fail(e)
    report = run_check(site_yaml, fed)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(format_report(report))
    if prepare and report.ok:
        _prepare(site_yaml, plan)
    raise typer.Exit(code=0 if report.ok else 1)


def _prepare(site_yaml: Path, plan_path: Path | None) -> None:
    """``moefl check --prepare``: the site's store, with a progress bar."""
    from client.data.dataset import prepare_site
    from client.data.site_config import load_site_config
    from client.data.volume_store import VolumeStore
    from multisite.training import find_plan

    try:
        config = load_site_config(site_yaml)
        plan = find_plan([site_yaml], plan_path)
        with progress_bar() as update:
            fresh, kept = prepare_site(
                config,
                plan,
                progress=lambda d, t: update(f"preprocessing {config.site_name}", d, t),
            )
    except MoeflError as e:
        fail(e)
    folder = VolumeStore(config.run_dir / PREPROCESSED, plan, config.adc_scale).folder
    typer.echo(f"prepared {fresh} cases ({kept} already stored) in {folder}")


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
    ] = FederationConfig.base_filters,
    max_filters: Annotated[
        int, typer.Option(help="Filter cap (nnU-Net: 320).")
    ] = FederationConfig.max_filters,
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
    ] = FederationConfig.head_lr,
    head_fit: Annotated[
        str,
        typer.Option(
            help="Staged: rounds (the head trained by AdamW) or newton (the "
            "linear head's logistic regression, its posterior and the advice "
            "rule chosen on the validation splits, as a federation fits them)."
        ),
    ] = "rounds",
) -> None:
    """Local-only (one site) or pooled (several sites) training with comparators.

    Several sites may follow one --sites: `--sites a.yaml b.yaml c.yaml`.
    """
    run = _run_train(
        site_yamls(sites, ctx),
        out,
        _train_config(optimizer, lr, batch_size, epochs, augment, seed, pos_weight),
        plan=plan,
        model_overrides={"base_filters": base_filters, "max_filters": max_filters},
        image_only=image_only,
        device=device,
        training=training,
        head_epochs=head_epochs,
        head_lr=head_lr,
        head_fit=head_fit,
    )
    _echo_trained(run)


def _train_config(
    optimizer: str,
    lr: float,
    batch_size: int,
    epochs: int,
    augment: bool,
    seed: int,
    pos_weight: float,
) -> TrainConfig:
    """``moefl train``'s optimisation settings, checked."""
    from client.training.engine import TrainConfig
    from shared_model.loss import LossConfig

    try:
        return TrainConfig(
            optimizer=optimizer,
            lr=lr,
            batch_size=batch_size,
            epochs=epochs,
            augment=augment,
            seed=seed,
            loss=LossConfig(pos_weight=pos_weight),
        )
    except MoeflError as e:
        fail(e)


def _run_train(
    sites: list[Path],
    out: Path,
    cfg: TrainConfig,
    *,
    plan: Path | None,
    model_overrides: dict[str, Any],
    image_only: bool,
    device: str | None,
    training: str,
    head_epochs: int,
    head_lr: float,
    head_fit: str,
) -> TrainRun:
    """``moefl train``'s run: the plan found, the heads' settings checked, the
    model and its comparators trained (the head shares ``cfg``'s BCE weight
    and seed)."""
    from client.training.heads import HeadConfig
    from multisite.training import find_plan, run_training

    try:
        return run_training(
            sites,
            out,
            cfg=cfg,
            plan=find_plan(sites, plan),
            model_overrides=model_overrides,
            image_only=image_only,
            device=device,
            training=training,
            head=HeadConfig(
                epochs=head_epochs,
                lr=head_lr,
                pos_weight=cfg.loss.pos_weight,
                seed=cfg.seed,
            ),
            head_fit=head_fit,
            echo=typer.echo,
        )
    except MoeflError as e:
        fail(e)


def _echo_trained(run: TrainRun) -> None:
    """The model's and the comparators' validation scores, and what was written."""
    from multisite.training import TRAINING_RECORD

    m = run.metrics
    typer.echo(
        f"model: val AUC {format_metric(m['final']['auc'])}, "
        f"Dice {format_metric(m['final']['dice'])}; "
        + ", ".join(
            f"{k} AUC {format_metric(v['auc'])}" for k, v in m["comparators"].items()
        )
    )
    typer.echo(f"wrote {run.out}/model.safetensors and {TRAINING_RECORD}")


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
    base_filters: Annotated[
        int, typer.Option(help="As the federation's.")
    ] = FederationConfig.base_filters,
    max_filters: Annotated[
        int, typer.Option(help="As the federation's.")
    ] = FederationConfig.max_filters,
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

    from client.training.engine import TrainConfig
    from client.training.pretrain import pretrain as run_pretrain
    from multisite.training import find_plan

    try:
        folders = [
            p / SITE_CONFIGS if (p / SITE_CONFIGS).is_dir() else p for p in public
        ]
        yamls = yamls_in(folders)
        cohort = public[0] / COHORT_RECORD
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
        fail(e)
    typer.echo(
        f"wrote {result.path}: sha256 {result.sha256}, val Dice {format_metric(result.dice)} "
        f"({result.n_train} training cases, {result.seconds:.0f} s)"
    )


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
    from client.data.public_data import import_msd

    try:
        result = import_msd(task, out, site_name=site_name)
    except MoeflError as e:
        fail(e)
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
