"""``moefl predict --site``: advice for every patient of a site, in one table.

Every case of the site's dataset (``clinical.csv`` with or without pCR) goes
through ``moefl check``'s preflight first: a case that fails it is never
scored; its row in the table names the finding that refused it (``skipped``).
The others are scored as ``moefl evaluate`` scores them
(:mod:`client.scoring.inference`), and each gets one row: the pCR probability under each
regimen, the recommended regimen with the rule's
reason (escalate / maintain / de-intensify against the planned regimen, and
the margin), guard flags, and the predicted tumour volume; optionally its
predicted mask on its own T2W grid. The table names the model file and its
SHA-256. Everything stays at the site.

Guard flags:

* ``expert-support:<regimen>``: the rule would have advised a regimen whose
  expert was trained on fewer than ``min_expert_support`` patients (the
  checkpoint's record); that regimen is excluded and the advice is among the
  others.
* ``low-propensity``: the site rarely gives the recommended regimen to
  patients with this clinical profile (propensity below ``low_propensity``, a
  model fitted on the site's own patients): the advice departs from what the
  site's data can vouch for.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from client.checks.preflight import run_check
from client.data.clinical_table import read_clinical_table
from client.data.dataset import SiteDataset
from client.data.site_config import SiteConfig, load_site_config
from client.data.site_data import CaseFiles, read_dataset_json, scan_dataset
from client.scoring.evaluation import scoring_rule
from client.scoring.inference import CaseScore, score_dataset
from client.scoring.predict import mask_on_input_grid, save_mask
from client.training.engine import resolve_device
from shared_model.checkpoint import (
    MODEL,
    load_checkpoint,
    read_expert_support,
)
from shared_model.clinical import REGIMENS, encode_clinical
from shared_model.durable import write_atomic
from shared_model.errors import ConfigError
from shared_model.plan import Plan
from shared_model.policy import (
    DEFAULT_MIN_SUPPORT,
    RecommendationRule,
    direction,
    gain_probabilities,
    recommend,
    supported_regimens,
)
from shared_model.policy_value import fit_propensity, propensities

COLUMNS = (
    "case_id",
    "planned_regimen",
    *(f"p_{r}" for r in REGIMENS),
    "recommended",
    "direction",
    "reason",
    "reference",
    "p_gain",
    "rule",
    "flags",
    "tumour_volume_ml",
    "mask_file",
    "model",
    "model_sha256",
    "skipped",
)
"""The table's columns. A case the preflight refused has a row too: its id,
the model, and under ``skipped`` the finding that refused it; no scores."""


@dataclass
class SitePredictions:
    """What :func:`predict_site` wrote."""

    out: Path
    rows: list[dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)  # case id -> why
    model: Path = Path()
    sha256: str = ""
    rule: str = ""  # the advice rule, in words
    what_if: bool = False  # another rule than the checkpoint's


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def predict_site(
    checkpoint: Path,
    site_yaml: Path,
    out: Path,
    *,
    masks: Path | None = None,
    device: str | None = None,
    what_if: str | None = None,
    min_expert_support: int | None = None,
    low_propensity: float = 0.05,
    progress: Callable[[int, int], None] | None = None,
) -> SitePredictions:
    """Score every usable case of the site; write the table to ``out`` (CSV).

    Raises:
        ConfigError: the site YAML is invalid, no case passes the preflight,
            or the checkpoint is unusable.
    """
    config = load_site_config(Path(site_yaml))  # an invalid YAML: every problem
    report = run_check(Path(site_yaml))
    skipped = {
        case: _why(report.findings, case)
        for case in report.cases_seen
        if case not in report.usable_cases
    }
    cases = _usable_cases(config, report.usable_cases)
    if not cases:
        raise ConfigError(
            f"{site_yaml}: no case passes the preflight ({len(skipped)} skipped); "
            "run `moefl check` on it"
        )
    model, plan = load_checkpoint(Path(checkpoint))
    sha256 = file_sha256(Path(checkpoint) / MODEL)
    rule, record = scoring_rule(
        Path(checkpoint), what_if=what_if, min_expert_support=min_expert_support
    )
    support = read_expert_support(Path(checkpoint))
    _, reasons = supported_regimens(support, DEFAULT_MIN_SUPPORT)
    dataset = SiteDataset(
        cases, plan, adc_scale=config.adc_scale, train=False, whole=True
    )
    scores = score_dataset(
        model,
        dataset,
        plan,
        device=resolve_device(device or config.device),
        progress=progress,
    )
    advice = _advice(scores, cases, rule, reasons, low_propensity)
    rule_text = rule.describe() + (" (a what-if)" if "what_if" in record else "")
    model_file = str(Path(checkpoint).resolve() / MODEL)
    rows: list[dict[str, Any]] = []
    for case, score, advised in zip(cases, scores, advice, strict=True):
        mask_file = "" if masks is None else _write_mask(masks, case, score, plan)
        row = _case_row(case, score, advised, rule, rule_text, mask_file)
        rows.append({**row, "model": model_file, "model_sha256": sha256, "skipped": ""})
    refused: list[dict[str, Any]] = [
        {"case_id": case, "model": model_file, "model_sha256": sha256, "skipped": why}
        for case, why in sorted(skipped.items())
    ]
    _write_table(out, rows + refused)
    return SitePredictions(
        out,
        rows,
        skipped,
        Path(checkpoint) / MODEL,
        sha256,
        rule.describe(),
        "what_if" in record,
    )


def _case_row(
    case: CaseFiles,
    score: CaseScore,
    advised: tuple[int, str, list[str], float | None],
    rule: RecommendationRule,
    rule_text: str,
    mask_file: str,
) -> dict[str, Any]:
    """A scored case's row of the table (the model columns aside)."""
    rec, why, flags, gain = advised
    return {
        "case_id": case.case_id,
        "planned_regimen": REGIMENS[score.regimen],
        **{f"p_{r}": round(p, 4) for r, p in zip(REGIMENS, score.probs, strict=True)},
        "recommended": REGIMENS[rec],
        "direction": direction(rec, score.regimen),
        "reason": why,
        "reference": rule.reference if rule.kind in ("switch", "fixed") else "",
        "p_gain": "" if gain is None else round(gain, 3),
        "rule": rule_text,
        "flags": ";".join(flags),
        "tumour_volume_ml": round(score.volume_ml, 3),
        "mask_file": mask_file,
    }


def _write_mask(masks: Path, case: CaseFiles, score: CaseScore, plan: Plan) -> str:
    """Save the case's predicted mask on its T2W grid under ``masks``; its path."""
    masks.mkdir(parents=True, exist_ok=True)
    path = masks / f"{case.case_id}_tumour.nii.gz"
    save_mask(mask_on_input_grid(score.mask, case.t2, plan), case.t2, path)
    return str(path)


def _write_table(out: Path, rows: list[dict[str, Any]]) -> None:
    """The prediction table as CSV, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, buffer.getvalue().encode())


def _why(findings: list[Any], case: str) -> str:
    """The first error the preflight found for ``case``: one that names the
    case, else one whose place is one of the case's files."""
    errors = [f for f in findings if f.severity == "error"]
    files = re.compile(rf"(^|/){re.escape(case)}(_\d{{4}})?(\.nii(\.gz)?)?$")
    for f in [*(f for f in errors if f.case == case), *errors]:
        if f.case == case or (f.case is None and files.search(f.where)):
            return f"{f.where}: {f.message}"
    return "it did not pass the preflight; run `moefl check` on the site"


def _usable_cases(config: SiteConfig, usable: list[str]) -> list[CaseFiles]:
    """The files and clinical rows of the cases that passed the preflight."""
    meta, _ = read_dataset_json(config.dataset_dir)
    ending = str((meta or {}).get("file_ending", ".nii.gz"))
    scan = scan_dataset(config.dataset_dir, ending, config.image_roots)
    records, _ = read_clinical_table(
        config.dataset_dir / "clinical.csv", require_outcome=False
    )
    return [
        CaseFiles(
            c,
            scan.channels[c][0],
            scan.channels[c][1],
            scan.labels.get(c),
            records[c],
        )
        for c in usable
    ]


def _advice(
    scores: list[CaseScore],
    cases: list[CaseFiles],
    rule: RecommendationRule,
    reasons: dict[str, str],
    low: float,
) -> list[tuple[int, str, list[str], float | None]]:
    """Per patient: the recommended regimen, the rule's reason in words, the
    flags, and (switch rule) the posterior probability that the advised
    regimen, or when the reference is kept the best alternative, gives a
    higher pCR than the reference."""
    probs = np.array([s.probs for s in scores])
    planned = np.array([s.regimen for s in scores])
    design = (
        None
        if any(s.design is None for s in scores)
        else np.array([s.design for s in scores])
    )
    rec = recommend(probs, rule, planned, design)
    unrestricted = recommend(probs, replace(rule, allowed=REGIMENS), planned, design)
    gain = gain_probabilities(rule, design) if rule.kind == "switch" else None
    clinical = np.stack([encode_clinical(c.clinical.features) for c in cases])
    fit, classes = fit_propensity(clinical, planned)
    e = propensities(fit, classes, clinical)
    out = []
    for i in range(len(scores)):
        flags = []
        if unrestricted[i] != rec[i] and REGIMENS[unrestricted[i]] in reasons:
            flags.append(f"expert-support:{REGIMENS[unrestricted[i]]}")
        if e[i, rec[i]] < low:
            flags.append("low-propensity")
        step = direction(int(rec[i]), int(planned[i]))
        p_gain = None
        if rule.withheld:
            why = (
                "advice withheld: no expert has enough training support; the "
                "planned regimen stands"
            )
        elif rule.kind == "switch" and gain is not None:
            ref = REGIMENS.index(rule.reference)
            alts = [j for j, r in enumerate(REGIMENS) if r in rule.allowed and j != ref]
            best = max(alts, key=lambda j: gain[i, j]) if alts else ref
            p_gain = float(gain[i, int(rec[i])] if rec[i] != ref else gain[i, best])
            if rec[i] != ref:
                why = (
                    f"{step}: switch to {REGIMENS[rec[i]]}, which gives a higher pCR "
                    f"than {rule.reference} with probability {p_gain:.2f} (the rule "
                    f"needs {rule.q:g})"
                )
            else:
                why = (
                    f"{step}: no switch, not confident enough: {rule.reference} is "
                    f"the reference, and the likeliest better regimen "
                    f"({REGIMENS[best]}) is better with probability {p_gain:.2f}, "
                    f"under the {rule.q:g} a switch needs"
                )
        elif rule.kind == "fixed":
            why = f"{step}: {rule.reference} for every patient"
        else:
            best_p = float(probs[i, [REGIMENS.index(r) for r in rule.allowed]].max())
            margin = rule.margin if rule.kind == "margin" else 0.0
            why = (
                f"{step}: {REGIMENS[rec[i]]} is the least intensive regimen within "
                f"{margin:g} of the best predicted pCR ({best_p:.3f})"
            )
        out.append((int(rec[i]), why, flags, p_gain))
    return out
