"""After the rounds: the linear head fitted by federated Newton steps, its
posterior, and the advice rule every scorer of the model then uses.

With ``head-fit = newton`` (staged training, ``head-type linear``) the run
has no head rounds. After the segmentation rounds (or at once, over a
pretrained backbone) the coordinator:

1. asks every site for the sums and sums of squares of its training patients'
   tumour features and standardises the head's input with the pooled moments
   (model config ``feature_centre``/``feature_scale``);
2. fits the head for every prior precision in ``prior-grid`` side by side:
   each Newton query sends the candidates' coefficients, each site answers
   with its gradient and Hessian sums (:mod:`client.node.posterior_round`), and
   the coordinator takes a Newton step on their totals
   (:func:`shared_model.posterior.newton_step`) until no coefficient moves by
   1e-6 (at most ``newton-rounds`` steps): the pooled fit, as if every patient
   were in one place;
3. keeps the prior with the lowest log-loss on the sites' validation
   patients, and the Laplace posterior at its fit; then recalibrates it on
   the same patients (Platt scaling, ``shift + slope * logit``, by Newton
   steps on their summed gradients and Hessians), folded into the head's
   coefficients (measured: the test calibration slope 0.62 became 0.88 on
   demo seed 0);
4. chooses the advice rule on the validation split
   (:mod:`shared_model.rule_choice`) from the candidates' doubly robust sums,
   and evaluates the final model under that rule.

Replies are untrusted, as in a round: a reply that cannot be attributed, is
malformed, has a non-finite, asymmetric or indefinite Hessian, or claims more
patients than its site declared is excluded with a reason; a site excluded
once is left out of the rest of the fit (the fit then converges to the
remaining sites' optimum). Fewer than ``min-sites`` usable sites end the step
with a ConfigError that names them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from server.identity import SiteIdentities
from server.newton_fit import NewtonFit, model_with
from server.run_folder import RunFolder
from server.strategy import GroupedStrategy
from shared_model.federated_metrics import format_metric
from shared_model.federation_config import FederationConfig
from shared_model.messages import (
    RoundRequest,
)
from shared_model.model_config import ModelConfig
from shared_model.policy import RecommendationRule, supported_regimens
from shared_model.posterior import (
    Posterior,
)
from shared_model.rule_choice import candidate_rules, choose
from wire.records import (
    arrays_to_record,
    request_record,
    with_posterior,
)

log = logging.getLogger(__name__)


@dataclass
class AdviceOutcome:
    """What the step ends with: the model's weights (the fitted head), its
    config (the standardisation), the rule, and the record."""

    arrays: dict[str, np.ndarray]
    model_cfg: ModelConfig
    rule: RecommendationRule
    record: dict[str, Any] = field(default_factory=dict)


def fit_and_choose(
    grid: Grid,
    fed: FederationConfig,
    strategy: GroupedStrategy,
    request: RoundRequest,
    arrays: Mapping[str, np.ndarray],
    model_cfg: ModelConfig,
    identities: Callable[[], SiteIdentities],
    server_round: int,
) -> AdviceOutcome:
    """The whole step (see the module docstring)."""
    t0 = time.perf_counter()
    newton = NewtonFit(
        grid, fed, strategy, identities, server_round, model_with(model_cfg, arrays)
    )
    cfg = newton.standardise(request, arrays, model_cfg)
    request = dataclasses.replace(request, model_config=cfg.to_dict())
    posterior, fit = newton.fit(request, arrays, cfg)
    slope, shift, fit["recalibration"] = newton.calibrate(
        request, arrays, posterior.mean
    )
    posterior = posterior.recalibrated(slope, shift)
    model = model_with(cfg, arrays)
    model.set_glm_coefficients(posterior.mean)
    fitted = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    # the switch rule weighs an expert's support through the posterior; the
    # guard applies to the rules that read point estimates
    threshold = 1 if fed.advice_rule == "switch" else fed.min_expert_support
    allowed, not_allowed = supported_regimens(fit["expert_support"], threshold)
    record: dict[str, Any] = {"fit": fit, "not_recommended": not_allowed}
    rule = _choose_rule(
        grid,
        fed,
        strategy,
        request,
        fitted,
        posterior,
        allowed,
        identities,
        server_round,
        record,
    )
    record["rule"] = rule.to_dict()
    record["rule_in_words"] = rule.describe()
    record["seconds"] = round(time.perf_counter() - t0, 2)
    log.info(
        "advice: head fitted over %d sites in %d Newton steps (prior %g); rule: %s",
        len(fit["sites"]),
        fit["newton_steps"],
        fit["lam"],
        rule.describe(),
    )
    return AdviceOutcome(fitted, cfg, rule, record)


def _choose_rule(
    grid: Grid,
    fed: FederationConfig,
    strategy: GroupedStrategy,
    request: RoundRequest,
    arrays: Mapping[str, np.ndarray],
    posterior: Posterior,
    allowed: tuple[str, ...],
    identities: Callable[[], SiteIdentities],
    server_round: int,
    record: dict[str, Any],
) -> RecommendationRule:
    """Step 4: the run config's rule, or the switch rule chosen on validation."""
    if not allowed:
        return RecommendationRule(kind="margin", allowed=())
    if fed.advice_rule != "switch":
        return RecommendationRule(
            kind=fed.advice_rule, margin=fed.recommendation_margin, allowed=allowed
        )
    guideline = (
        fed.guideline_regimen if fed.guideline_regimen in allowed else allowed[-1]
    )
    if not record["fit"].get("converged", True):
        # a fit that did not settle (a site's sums pulling it around, or too
        # few newton-rounds) is no ground for switching anyone
        record["declined"] = (
            f"the head's Newton fit did not converge in {fed.newton_rounds} steps; "
            f"{guideline} for everyone"
        )
        log.warning("advice: %s", record["declined"])
        return RecommendationRule(
            kind="fixed", reference=guideline, allowed=allowed, posterior=posterior
        )
    candidates = candidate_rules(allowed, guideline, posterior)
    ev = evaluate_with(
        grid,
        strategy,
        dataclasses.replace(request, candidates=tuple(c.to_dict() for c in candidates)),
        arrays,
        posterior,
        identities(),
        server_round,
    )
    values = ev.get("candidates") or [None] * len(candidates)
    fixed_q = None if fed.gain_threshold == "choose" else float(fed.gain_threshold)
    rule, table = choose(candidates, values, fixed_q=fixed_q, posterior=posterior)
    record["candidates"] = table
    record["chosen_on"] = {"cohort": "validation", "patients": ev.get("n")}
    return rule


def evaluate_with(
    grid: Grid,
    strategy: GroupedStrategy,
    request: RoundRequest,
    arrays: Mapping[str, np.ndarray],
    posterior: Posterior | None,
    identities: SiteIdentities,
    server_round: int,
) -> dict[str, Any]:
    """A federated evaluation whose request carries the posterior."""
    messages = list(
        strategy.configure_evaluate(
            server_round,
            arrays_to_record(dict(arrays)),
            request_record(request),
            grid,
        )
    )
    for msg in messages:
        with_posterior(msg.content, posterior)
    replies = grid.send_and_receive(messages, timeout=strategy.fed.round_timeout)
    return strategy.aggregate_evaluation(replies, identities)


def advice_step(
    grid: Grid,
    fed: FederationConfig,
    begin: Any,
    folder: RunFolder,
    record: dict[str, Any],
    arrays: dict[str, np.ndarray],
    identities: Callable[[], SiteIdentities],
) -> None:
    """The whole step after the rounds (``begin``: the run's
    :class:`server.server_app.FederationStart`), then the final evaluation under
    the rule; written as the latest model (a resume does the step again when
    the record does not hold it)."""
    server_round = fed.total_rounds + 1
    done = fit_and_choose(
        grid,
        fed,
        begin.strategy,
        begin.request,
        arrays,
        begin.model_cfg,
        identities,
        server_round,
    )
    request = dataclasses.replace(
        begin.request,
        model_config=done.model_cfg.to_dict(),
        advice_rule=done.rule.to_dict(),
    )
    done.record["evaluate"] = evaluate_with(
        grid,
        begin.strategy,
        request,
        done.arrays,
        done.rule.posterior,
        identities(),
        server_round,
    )
    record["advice"] = done.record
    ev = done.record["evaluate"]
    log.info(
        "final model: val AUC %s, Dice %s; advice: %s",
        format_metric(ev.get("auc")),
        format_metric(ev.get("dice")),
        done.rule.describe(),
    )
    folder.save_advice(
        done.arrays,
        record,
        done.model_cfg,
        begin.plan,
        done.rule,
        extra_config={
            "expert_support": done.record["fit"]["expert_support"],
            **({"backbone": begin.backbone} if begin.backbone else {}),
        },
    )
