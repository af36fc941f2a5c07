"""Evaluation of a trained model at sites: counts and sums, then the report.

Each site scores its patients (a training site its validation split, an
``evaluate`` site, such as a prospective cohort, all its cases), and keeps the
per-patient predictions to itself. What leaves the site is
:class:`shared_model.site_evaluation.SiteEvaluation` (counts and sums, with the
policy sums from the site's own propensity model, fitted on its training split;
an evaluate-only site fits it on the patients it evaluates), and
:func:`shared_model.site_evaluation.combine` adds the sites up.

In simulation an oracle folder (``moefl synth``'s ``oracle/``) adds the true
value of the recommended policy (the mean true pCR probability under each
patient's recommended regimen) beside each fixed regimen's and the oracle's
own, and so the share of the oracle's gain over the best fixed regimen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from client.data.dataset import SiteDataset, build_site_datasets
from client.data.site_config import SiteConfig
from client.data.site_data import CaseFiles, list_cases
from client.scoring.inference import CaseScore, score_dataset
from client.training.engine import CasePrediction, EvalResult
from shared_model.clinical import REGIMENS, ClinicalRecord, encode_clinical
from shared_model.errors import ConfigError, DataError
from shared_model.federated_metrics import (
    ScoreCounts,
)
from shared_model.model import UNetMoECli
from shared_model.plan import Plan
from shared_model.policy import (
    DEFAULT_MIN_SUPPORT,
    DIRECTIONS,
    RecommendationRule,
    direction,
    recommend,
    supported_regimens,
    what_if_rule,
)
from shared_model.policy_value import (
    OracleSums,
    PolicySums,
    fit_propensity,
    propensities,
    site_policy_sums,
)
from shared_model.rule_choice import candidate_sums
from shared_model.site_evaluation import (
    ADVICE_GROUPS,
    SiteEvaluation,
)
from shared_model.survival import SurvivalCounts


class ClinicalOnly:
    """Comparator: logistic regression of pCR on the clinical one-hot, the
    received regimen and their interactions, fitted on the pooled training
    splits of the given sites (a centralised comparator: for simulation and
    research, where pooling the clinical tables is possible). Its pCR
    probability under each regimen sets the regimen input accordingly."""

    def __init__(self, cases: list[CaseFiles]) -> None:
        known = [c for c in cases if c.clinical.pcr is not None]
        y = np.array([c.clinical.pcr for c in known], dtype=float)
        if len(np.unique(y)) < 2:
            raise DataError(
                "the clinical-only comparator needs both outcomes in training"
            )
        x = np.stack([self._features(c, c.clinical.regimen_index) for c in known])
        self.model = LogisticRegression(C=1.0, max_iter=5000).fit(x, y)

    @staticmethod
    def _features(case: CaseFiles, regimen: int) -> np.ndarray:
        clin = encode_clinical(case.clinical.features).astype(np.float64)
        onehot = np.eye(len(REGIMENS))[regimen]
        return np.concatenate([clin, onehot, np.outer(onehot, clin).ravel()])

    def evaluate(self, cases: list[CaseFiles]) -> EvalResult:
        preds = []
        for c in cases:
            x = np.stack([self._features(c, j) for j in range(len(REGIMENS))])
            probs = self.model.predict_proba(x)[:, 1]
            pcr = float("nan") if c.clinical.pcr is None else float(c.clinical.pcr)
            preds.append(
                CasePrediction(
                    c.case_id,
                    c.clinical.regimen_index,
                    pcr,
                    probs.tolist(),
                    None,
                    float("nan"),
                )
            )
        return EvalResult(metrics={}, cases=preds)


def evaluate_site(
    model: UNetMoECli,
    config: SiteConfig,
    plan: Plan,
    *,
    device: torch.device,
    rule: RecommendationRule | None = None,
    oracle: dict[str, list[float]] | None = None,
    clinical_model: ClinicalOnly | None = None,
    cohort: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SiteEvaluation:
    """Score a site's evaluation patients; return its counts and sums.

    ``cohort``: the cohort an evaluate site's patients belong to ("prospective"
    unless given, "test" for the held-out test cohort); a training site always
    gives its validation split.
    """
    if config.role == "train":
        train, dataset, _ = build_site_datasets(config, plan)
        fit_cases = train.cases
    else:
        cases = list_cases(
            config.dataset_dir, require_outcome=False, image_roots=config.image_roots
        )
        dataset = SiteDataset(cases, plan, adc_scale=config.adc_scale, train=False)
        fit_cases = cases
    return evaluate_dataset(
        model,
        config.site_name,
        dataset,
        fit_cases,
        cohort="validation" if config.role == "train" else cohort or "prospective",
        device=device,
        rule=rule,
        oracle=oracle,
        clinical_model=clinical_model,
        progress=progress,
    )


def evaluate_dataset(
    model: UNetMoECli,
    site: str,
    dataset: SiteDataset,
    fit_cases: list[CaseFiles],
    *,
    cohort: str,
    device: torch.device,
    rule: RecommendationRule | None = None,
    oracle: dict[str, list[float]] | None = None,
    clinical_model: ClinicalOnly | None = None,
    progress: Callable[[int, int], None] | None = None,
    candidates: Sequence[RecommendationRule] | None = None,
) -> SiteEvaluation:
    """Score ``dataset`` as the clinic would (:mod:`client.scoring.inference`: the patch
    around the predicted tumour); the propensity model is fitted on
    ``fit_cases``.

    With ``clinical_model`` the clinical-only comparator is scored instead of
    the network (no images are read; no Dice). ``candidates``: rules whose
    doubly robust sums are added (:func:`candidate_sums`), for the choice of
    the federation's rule.
    """
    result = _score(model, dataset, clinical_model, device, progress)
    counts = {
        r: ScoreCounts.from_scores(
            [c.probs[j] for c in result if c.regimen == j],
            [c.pcr for c in result if c.regimen == j],
        )
        for j, r in enumerate(REGIMENS)
    }
    if not result:
        # a site with too few patients for a validation split adds nothing
        return SiteEvaluation(
            site, cohort, counts, 0.0, 0, PolicySums(), local_scores=np.zeros((0, 2))
        )
    dice = [c.dice for c in result if c.dice is not None]
    losses = [c.loss for c in result if not np.isnan(c.loss)]
    by_id = {c.case_id: c for c in dataset.cases}
    clinical = np.stack(
        [encode_clinical(by_id[c.case_id].clinical.features) for c in result]
    )
    probs = np.array([c.probs for c in result])
    received = np.array([c.regimen for c in result])
    outcome = np.array([c.pcr for c in result])
    designs = [getattr(c, "design", None) for c in result]
    design = None if any(d is None for d in designs) else np.array(designs)
    e = _propensities(fit_cases, clinical, received)
    rows = np.arange(len(received))
    policy = site_policy_sums(probs, received, outcome, e, rule, design=design)
    survival = _survival_by_advice(
        [by_id[c.case_id].clinical for c in result], probs, received, rule, design
    )
    known_rows = ~np.isnan(outcome)
    out = SiteEvaluation(
        site,
        cohort,
        counts,
        float(sum(dice)),
        len(dice),
        policy,
        loss_sum=float(sum(losses)),
        loss_n=len(losses),
        survival=survival,
        local_scores=np.stack(
            [probs[rows, received][known_rows], outcome[known_rows]], axis=1
        ),
        candidates=None
        if not candidates
        else candidate_sums(probs, received, outcome, e, candidates, design),
    )
    if oracle is not None:
        out.oracle = _oracle_sums(
            oracle, [c.case_id for c in result], probs, received, outcome, rule, design
        )
    return out


def _score(
    model: UNetMoECli,
    dataset: SiteDataset,
    clinical_model: ClinicalOnly | None,
    device: torch.device,
    progress: Callable[[int, int], None] | None,
) -> Sequence[CasePrediction | CaseScore]:
    """Each case scored by the clinical-only comparator when given, else by
    the network on the whole volumes."""
    if clinical_model is not None:
        return clinical_model.evaluate(dataset.cases).cases
    return score_dataset(
        model, dataset.whole_view(), dataset.plan, device=device, progress=progress
    )


def _propensities(
    fit_cases: list[CaseFiles], clinical: np.ndarray, received: np.ndarray
) -> np.ndarray:
    """Each case's probability of each regimen, from a propensity model fitted
    on ``fit_cases``."""
    fit, classes = fit_propensity(
        np.stack([encode_clinical(c.clinical.features) for c in fit_cases]),
        [c.clinical.regimen_index for c in fit_cases],
    )
    e = propensities(fit, classes, clinical)
    # a received regimen the training split never saw: treat its propensity as
    # rare rather than impossible (the patient is evidence that it is given)
    rows = np.arange(len(received))
    e[rows, received] = np.maximum(e[rows, received], 1.0 / max(len(fit_cases), 1))
    return e


def _oracle_sums(
    oracle: dict[str, list[float]],
    case_ids: list[str],
    probs: np.ndarray,
    received: np.ndarray,
    outcome: np.ndarray,
    rule: RecommendationRule | None,
    design: np.ndarray | None,
) -> OracleSums:
    """The advice's value under the oracle's true probabilities (cases with a
    known outcome); every such case needs an oracle row."""
    known = ~np.isnan(outcome)
    rec = recommend(
        probs[known],
        rule,
        received[known],
        None if design is None else design[known],
    )
    ids = [case_ids[int(i)] for i in np.flatnonzero(known)]
    missing = [i for i in ids if i not in oracle]
    if missing:
        raise DataError(f"the oracle has no row for case {missing[0]}")
    return OracleSums.from_probabilities(np.array([oracle[i] for i in ids]), rec)


def _survival_by_advice(
    records: list[ClinicalRecord],
    probs: np.ndarray,
    received: np.ndarray,
    rule: RecommendationRule | None,
    design: np.ndarray | None = None,
) -> dict[str, SurvivalCounts] | None:
    """DFS counts per advice group (ADVICE_GROUPS) over the patients whose
    clinical table has DFS; None when none has."""
    has = np.array([r.dfs_months is not None for r in records])
    if not has.any():
        return None
    rec = recommend(
        probs[has], rule, received[has], None if design is None else design[has]
    )
    got = received[has]
    months = np.array([r.dfs_months for r in records if r.dfs_months is not None])
    events = np.array([r.dfs_event for r in records if r.dfs_months is not None])
    directions = np.array([direction(a, b) for a, b in zip(rec, got, strict=True)])
    members = {g: directions == g for g in DIRECTIONS}
    members["followed"] = rec == got
    members["not-followed"] = rec != got
    return {
        g: SurvivalCounts.from_times(months[members[g]], events[members[g]])
        for g in ADVICE_GROUPS
    }


def scoring_rule(
    checkpoint: Path,
    *,
    what_if: str | None = None,
    min_expert_support: int | None = None,
) -> tuple[RecommendationRule, dict[str, Any]]:
    """The rule to score a checkpoint with, and what the report says of it.

    The checkpoint's own rule (decided at the end of training) unless a
    what-if is asked for: ``what_if`` (:func:`what_if_rule`), or
    ``min_expert_support`` (the support guard recomputed from the experts'
    recorded support). A checkpoint that records no rule (an older one, or
    local training) is scored with the margin rule and the default support
    (:data:`shared_model.policy.DEFAULT_MIN_SUPPORT`).
    """
    from shared_model.checkpoint import load_rule, read_expert_support

    saved = load_rule(checkpoint)
    support = read_expert_support(checkpoint)
    base = saved or RecommendationRule(
        allowed=supported_regimens(support, DEFAULT_MIN_SUPPORT)[0]
    )
    record: dict[str, Any] = {"from_checkpoint": saved is not None}
    rule = base
    if min_expert_support is not None:
        if min_expert_support < 0:
            raise ConfigError("--min-expert-support must be >= 0")
        allowed, excluded = supported_regimens(support, min_expert_support)
        record["not_recommended"] = excluded
        record["min_expert_support"] = min_expert_support
        rule = replace(rule, allowed=allowed)
    if what_if is not None:
        try:
            rule = what_if_rule(what_if, rule)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    if rule != base:
        record["what_if"] = {"instead_of": base.to_dict()}
    record |= rule.to_dict()
    record["in_words"] = rule.describe()
    record["expert_support"] = support
    return rule, record
