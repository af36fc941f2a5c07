"""Site scoring commands: advice for one patient or a whole site, and the
evaluation of a model on a site's patients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import fail, progress_bar, site_yamls, yamls_in
from shared_model.errors import ConfigError, MoeflError


def predict(
    checkpoint: Annotated[
        Path,
        typer.Argument(help="Folder with model.safetensors, config.json, plan.json."),
    ],
    t2w: Annotated[
        Path | None, typer.Option("--t2w", help="One patient: T2-weighted NIfTI.")
    ] = None,
    adc: Annotated[
        Path | None,
        typer.Option("--adc", help="One patient: ADC NIfTI on the T2W grid."),
    ] = None,
    clinical: Annotated[
        list[str],
        typer.Option(
            "--clinical",
            help="One patient: KEY=VALUE, repeat for cT, cN, EMVI, CRM, LLN, location.",
        ),
    ] = [],  # noqa: B006
    adc_unit: Annotated[
        str, typer.Option(help="One patient: unit of the stored ADC, 1e-3 or 1e-6.")
    ] = "1e-3",
    mask_out: Annotated[
        Path | None,
        typer.Option(help="One patient: write the predicted mask here (input grid)."),
    ] = None,
    site: Annotated[
        Path | None,
        typer.Option(
            "--site", help="A site YAML: score every patient of its dataset (--out)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="With --site: the table to write (CSV).")
    ] = None,
    masks: Annotated[
        Path | None,
        typer.Option(help="With --site: also write each predicted mask here."),
    ] = None,
    what_if: Annotated[
        str | None,
        typer.Option(
            "--what-if",
            help="With --site: score under another advice rule than the "
            "checkpoint's (margin[:M], argmax, fixed:REGIMEN, switch[:Q]); "
            "printed and written in the table.",
        ),
    ] = None,
    min_expert_support: Annotated[
        int | None,
        typer.Option(
            help="With --site, a what-if: never advise a regimen whose expert the "
            "checkpoint records as trained on fewer patients (default: the "
            "checkpoint's rule)."
        ),
    ] = None,
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """One patient (--t2w --adc --clinical: JSON) or every patient of a site
    (--site --out: a CSV of pCR per regimen, advice, flags, tumour volume)."""
    if site is not None:
        if out is None or t2w is not None or adc is not None or clinical:
            fail(ConfigError("--site needs --out and takes no --t2w/--adc/--clinical"))
        assert out is not None
        _predict_site(checkpoint, site, out, masks, what_if, min_expert_support, device)
        return
    _predict_patient(checkpoint, t2w, adc, clinical, adc_unit, mask_out, device)


def _predict_patient(
    checkpoint: Path,
    t2w: Path | None,
    adc: Path | None,
    clinical: list[str],
    adc_unit: str,
    mask_out: Path | None,
    device: str,
) -> None:
    """``moefl predict --t2w --adc --clinical``: one patient's result as JSON
    (and its mask when ``mask_out``)."""
    if t2w is None or adc is None or not clinical:
        fail(ConfigError("give --t2w, --adc and --clinical (one patient) or --site"))
    assert t2w is not None and adc is not None
    from client.scoring.predict import parse_clinical_args, predict_case, save_mask

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
        fail(e)
    typer.echo(json.dumps(result.to_dict(), indent=2))


def _predict_site(
    checkpoint: Path,
    site: Path,
    out: Path,
    masks: Path | None,
    what_if: str | None,
    min_expert_support: int | None,
    device: str,
) -> None:
    """``moefl predict --site``: the table, with a progress bar."""
    from client.scoring.predict_site import predict_site

    with progress_bar() as update:
        try:
            result = predict_site(
                checkpoint,
                site,
                out,
                masks=masks,
                device=None if device == "auto" else device,
                what_if=what_if,
                min_expert_support=min_expert_support,
                progress=lambda done, total: update(
                    f"scoring {site.name}", done, total
                ),
            )
        except MoeflError as e:
            fail(e)
    if result.what_if:
        typer.echo(
            f"what-if: advice under {result.rule} instead of the checkpoint's rule"
        )
    for case, why in sorted(result.skipped.items()):
        typer.echo(f"skipped {case}: {why}")
    typer.echo(
        f"wrote {out}: {len(result.rows)} patients, {len(result.skipped)} skipped; "
        f"model {result.model} sha256 {result.sha256}"
    )


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
    out: Annotated[Path, typer.Option(help="Folder for the report (evaluation.json).")],
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
    what_if: Annotated[
        str | None,
        typer.Option(
            "--what-if",
            help="Score under another advice rule than the checkpoint's "
            "(margin[:M], argmax, fixed:REGIMEN, switch[:Q]); printed and "
            "recorded in evaluation.json.",
        ),
    ] = None,
    min_expert_support: Annotated[
        int | None,
        typer.Option(
            help="A what-if: never recommend a regimen whose expert the checkpoint "
            "records as trained on fewer patients (default: the checkpoint's rule)."
        ),
    ] = None,
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
    report = _run_evaluation(
        checkpoint,
        site_yamls(sites, ctx),
        out,
        test=test,
        oracle=oracle,
        what_if=what_if,
        min_expert_support=min_expert_support,
        target_sensitivity=target_sensitivity,
        device=device,
        clinical_only=clinical_only,
        against=against,
    )
    _echo_evaluation(report, out)


def _run_evaluation(
    checkpoint: Path,
    sites: list[Path],
    out: Path,
    *,
    test: list[Path],
    oracle: Path | None,
    what_if: str | None,
    min_expert_support: int | None,
    target_sensitivity: float,
    device: str | None,
    clinical_only: bool,
    against: str | None,
) -> dict[str, Any]:
    """``moefl evaluate``'s report, scored with a progress bar."""
    from multisite.evaluation import run_evaluation

    try:
        if not 0 < target_sensitivity <= 1:
            raise ConfigError("--target-sensitivity must be in (0, 1]")
        with progress_bar() as update:
            return run_evaluation(
                checkpoint,
                sites,
                out,
                test_yamls=yamls_in(test),
                oracle=oracle,
                min_expert_support=min_expert_support,
                what_if=what_if,
                target_sensitivity=target_sensitivity,
                device=device,
                clinical_only=clinical_only,
                against=against,
                echo=typer.echo,
                progress=update,
            )
    except MoeflError as e:
        fail(e)


def _echo_evaluation(report: dict[str, Any], out: Path) -> None:
    """The report's headline and where it was written."""
    from multisite.evaluation_text import headline
    from shared_model.site_evaluation import EVALUATION

    typer.echo(headline(report))
    typer.echo(f"wrote {out / EVALUATION}")
