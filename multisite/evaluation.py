"""The evaluation over every site's cohorts on one machine (``moefl evaluate``,
the demo and the benchmarks): each site's counts and sums from
:func:`client.scoring.evaluation.evaluate_dataset`, added up by
:func:`shared_model.site_evaluation.combine`, with the clinical-only comparator
and, in simulation, the oracle's values from ``moefl synth``'s ``oracle/``."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from client.data.dataset import build_site_datasets
from client.data.site_config import SiteConfig
from client.scoring.evaluation import ClinicalOnly, evaluate_site, scoring_rule
from shared_model.clinical import REGIMENS
from shared_model.errors import ConfigError, DataError
from shared_model.layout import COHORT_RECORD, POTENTIAL_OUTCOMES
from shared_model.model import UNetMoECli
from shared_model.model_comparison import compare_models
from shared_model.plan import Plan
from shared_model.policy import (
    RecommendationRule,
    what_if_rule,
)
from shared_model.site_evaluation import (
    COHORTS,
    SiteEvaluation,
    combine_by_cohort,
    write_evaluation,
)


def read_oracle(folder: Path) -> dict[str, list[float]]:
    """case id -> true pCR probability under nCRT, TNT, nCT (simulation)."""
    path = Path(folder) / POTENTIAL_OUTCOMES
    try:
        with path.open(newline="") as f:
            return {
                row["case_id"]: [float(row[f"p_{r}"]) for r in REGIMENS]
                for row in csv.DictReader(f)
            }
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: cannot read the oracle ({e})") from e


def run_evaluation(
    checkpoint: Path,
    site_yamls: list[Path],
    out: Path,
    *,
    test_yamls: list[Path] | None = None,
    oracle: Path | None = None,
    what_if: str | None = None,
    target_sensitivity: float = 0.8,
    device: str | None = None,
    clinical_only: bool = False,
    against: str | None = None,
    min_expert_support: int | None = None,
    echo: Any = lambda s: None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """``moefl evaluate``: score every site, combine by cohort, write the report
    (:func:`shared_model.site_evaluation.write_evaluation`).

    Training sites give the validation cohort (where the target-sensitivity
    threshold is chosen); ``evaluate`` sites give the prospective cohort (where
    that threshold is applied unchanged), as are the held-out test cohort's
    sites in ``test_yamls`` (evaluate sites). ``clinical_only``: score the
    clinical-only comparator (:class:`ClinicalOnly`, fitted on the training
    sites' training splits) instead of the checkpoint's network. ``against``:
    another checkpoint folder, or ``clinical``, scored on the same patients for
    paired comparisons (exact McNemar from the sites' discordant counts).
    The advice is scored under the checkpoint's own rule (:func:`scoring_rule`);
    ``what_if`` and ``min_expert_support`` change it for a what-if, which the
    report records under ``rule.what_if``.
    ``progress(label, done, total)``: called after each patient scored.
    """
    from shared_model.checkpoint import load_checkpoint

    model, plan = load_checkpoint(checkpoint)
    rule, rule_record = _advice_rule(
        checkpoint, clinical_only, what_if, min_expert_support, echo
    )
    configs, tests = _evaluation_sites(site_yamls, test_yamls)
    scoring = _Scoring(
        configs,
        tests,
        plan,
        device=_device(device, configs),
        rule=rule,
        oracle=read_oracle(oracle) if oracle is not None else None,
        echo=echo,
        progress=progress,
    )
    clinical = None
    if clinical_only or against == "clinical":
        clinical = _clinical_comparator(configs, plan)

    evaluations = scoring.score_all(model, clinical if clinical_only else None)
    report: dict[str, Any] = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "model": "clinical-only logistic regression (pooled)"
        if clinical_only
        else "network",
        "rule": rule_record,
        "target_sensitivity": target_sensitivity,
    }
    report |= combine_by_cohort(evaluations, target_sensitivity)
    if oracle is not None:  # simulation: what the world lets one learn
        report |= _learnable_share(oracle)
    if against is not None:
        other_evals = _score_against(
            against, checkpoint, model, plan, clinical, scoring
        )
        report["comparison"] = _comparison(
            against, evaluations, other_evals, report, target_sensitivity
        )
    write_evaluation(out, report)
    return report


def _advice_rule(
    checkpoint: Path,
    clinical_only: bool,
    what_if: str | None,
    min_expert_support: int | None,
    echo: Any,
) -> tuple[RecommendationRule, dict[str, Any]]:
    """The rule the advice is scored under and its record: the checkpoint's
    (:func:`scoring_rule`), or a what-if; the clinical-only comparator, with no
    posterior, gets a rule on its predictions alone."""
    if clinical_only:
        rule = what_if_rule(what_if or "margin", RecommendationRule())
        rule_record = {**rule.to_dict(), "in_words": rule.describe()}
    else:
        rule, rule_record = scoring_rule(
            checkpoint, what_if=what_if, min_expert_support=min_expert_support
        )
    if "what_if" in rule_record:
        echo(
            f"what-if: scoring under {rule.describe()} instead of the checkpoint's rule"
        )
    return rule, rule_record


def _evaluation_sites(
    site_yamls: list[Path], test_yamls: list[Path] | None
) -> tuple[list[SiteConfig], list[SiteConfig]]:
    """The sites' configs and the test cohort's (each of role evaluate)."""
    from client.data.site_config import load_site_config

    configs = [load_site_config(Path(p)) for p in site_yamls]
    tests = [load_site_config(Path(p)) for p in test_yamls or []]
    trainers = [c.site_name for c in tests if c.role == "train"]
    if trainers:
        raise ConfigError(
            f"test sites must have role `evaluate`; {trainers[0]} is a training "
            "site (its patients train the model)"
        )
    return configs, tests


def _device(device: str | None, configs: list[SiteConfig]) -> torch.device:
    """``device``, else the first site's."""
    from client.training.engine import resolve_device

    return resolve_device(device or configs[0].device)


def _clinical_comparator(configs: list[SiteConfig], plan: Plan) -> ClinicalOnly:
    """The clinical-only comparator fitted on the training sites' training
    splits."""
    train_cases = []
    for cfg in configs:
        if cfg.role == "train":
            train, _, _ = build_site_datasets(cfg, plan)
            train_cases.extend(train.cases)
    return ClinicalOnly(train_cases)


@dataclass
class _Scoring:
    """Scores a model on every site (and the test cohort's) under one rule."""

    configs: list[SiteConfig]
    tests: list[SiteConfig]
    plan: Plan
    device: torch.device
    rule: RecommendationRule
    oracle: dict[str, list[float]] | None
    echo: Any
    progress: Callable[[str, int, int], None] | None

    def score_all(
        self, net: UNetMoECli, clin: ClinicalOnly | None
    ) -> list[SiteEvaluation]:
        """Each site's evaluation of ``net``, or of the comparator ``clin``."""
        # the comparator has no posterior: its own argmax of the margin rule
        # when the network's rule needs one
        rule = self.rule
        if clin is not None and rule.kind == "switch":
            rule = RecommendationRule(allowed=rule.allowed)
        sites = [(c, None) for c in self.configs] + [(c, "test") for c in self.tests]
        return [self._score(net, clin, rule, cfg, cohort) for cfg, cohort in sites]

    def _score(
        self,
        net: UNetMoECli,
        clin: ClinicalOnly | None,
        rule: RecommendationRule,
        cfg: SiteConfig,
        cohort: str | None,
    ) -> SiteEvaluation:
        which = (
            "validation split"
            if cfg.role == "train"
            else "test cohort"
            if cohort
            else "all cases"
        )
        self.echo(f"scoring {cfg.site_name} ({which}) ...")
        return evaluate_site(
            net,
            cfg,
            self.plan,
            device=self.device,
            rule=rule,
            oracle=self.oracle,
            clinical_model=clin,
            cohort=cohort,
            progress=_labelled(self.progress, f"{cfg.site_name} ({which})"),
        )


def _learnable_share(oracle: Path) -> dict[str, Any]:
    """Simulation: the cohort's learnable share from its scoreboard (none when
    it records none)."""
    import json

    summary = Path(oracle).parent / COHORT_RECORD
    if summary.is_file():
        board = json.loads(summary.read_text()).get("scoreboard", {})
        if board.get("learnable_share"):
            return {"learnable_share": board["learnable_share"]}
    return {}


def _score_against(
    against: str,
    checkpoint: Path,
    model: UNetMoECli,
    plan: Plan,
    clinical: ClinicalOnly | None,
    scoring: _Scoring,
) -> list[SiteEvaluation]:
    """The sites' evaluations of what ``against`` names: the clinical-only
    comparator, or another checkpoint of the same plan."""
    from shared_model.checkpoint import load_checkpoint

    if against == "clinical":
        return scoring.score_all(model, clinical)
    other_model, other_plan = load_checkpoint(Path(against))
    if other_plan != plan:
        raise ConfigError(
            f"{against}: its plan differs from {checkpoint}'s; paired "
            "comparisons need the same patients and preprocessing"
        )
    return scoring.score_all(other_model, None)


def _comparison(
    against: str,
    evaluations: list[SiteEvaluation],
    other_evals: list[SiteEvaluation],
    report: dict[str, Any],
    target_sensitivity: float,
) -> dict[str, Any]:
    """The paired comparison: both AUCs per cohort and exact McNemar tests."""
    other = combine_by_cohort(other_evals, target_sensitivity)
    return {
        "against": against,
        "auc": {
            c: {"this": report[c]["auc"], "against": other[c]["auc"]}
            for c in COHORTS
            if c in report and c in other
        },
        "mcnemar": compare_models(evaluations, other_evals, report, other),
    }


def _labelled(
    progress: Callable[[str, int, int], None] | None, label: str
) -> Callable[[int, int], None] | None:
    """``progress`` with its label bound (None stays None)."""
    if progress is None:
        return None
    report = progress

    def update(done: int, total: int) -> None:
        report(label, done, total)

    return update
