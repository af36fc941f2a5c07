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
   with its gradient and Hessian sums (:mod:`client.posterior_round`), and
   the coordinator takes a Newton step on their totals
   (:func:`shared_model.posterior.newton_step`) until no coefficient moves by
   1e-6 (at most ``newton-rounds`` steps): the pooled fit, as if every patient
   were in one place;
3. keeps the prior with the lowest log-loss on the sites' validation
   patients, and the Laplace posterior at its fit;
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
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from server.identity import ReplyRejected, SiteIdentities, Unidentified
from server.strategy import GroupedStrategy
from shared_model.clinical import REGIMENS
from shared_model.errors import ConfigError
from shared_model.federation_config import FederationConfig
from shared_model.messages import (
    ARRAYS,
    CONFIG,
    GLM,
    MAX_SITE_PATIENTS,
    SHARED,
    NewtonReply,
    RoundRequest,
)
from shared_model.model import ModelConfig, UNetMoECli, build_model
from shared_model.policy import RecommendationRule, supported_regimens
from shared_model.posterior import (
    BLOCKS,
    GlmSums,
    Posterior,
    newton_step,
    prior_precision,
    verify_sums,
)
from shared_model.rule_choice import candidate_rules, choose
from wire.records import (
    NEWTON_MESSAGE,
    arrays_to_record,
    read_newton_reply,
    request_record,
    with_posterior,
)

log = logging.getLogger(__name__)

TOLERANCE = 1e-6
"""Newton stops when no coefficient of any candidate moves by more than this."""


@dataclass
class AdviceOutcome:
    """What the step ends with: the model's weights (the fitted head), its
    config (the standardisation), the rule, and the record."""

    arrays: dict[str, np.ndarray]
    model_cfg: ModelConfig
    rule: RecommendationRule
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Wave:
    """One message wave's usable replies and the sites it excluded."""

    replies: dict[str, NewtonReply]
    excluded: dict[str, str]


def _model(cfg: ModelConfig, arrays: Mapping[str, np.ndarray]) -> UNetMoECli:
    model = build_model(cfg)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    return model


class NewtonFit:
    """The federated Newton fit (steps 1-3 of the module docstring)."""

    def __init__(
        self,
        grid: Grid,
        fed: FederationConfig,
        strategy: GroupedStrategy,
        identities: Callable[[], SiteIdentities],
        server_round: int,
        model: UNetMoECli,
    ) -> None:
        self.grid, self.fed, self.strategy = grid, fed, strategy
        self.identities = identities
        self.server_round = server_round
        self.p_len = model.glm_coefficients().shape[1]  # the design's width + 1
        self.features = model.n_features
        self.sites: set[str] | None = None  # the sites the fit sums over
        self.excluded: dict[str, str] = {}
        self.waves = 0

    def _send(
        self, request: RoundRequest, arrays: Mapping[str, np.ndarray], beta: np.ndarray
    ) -> _Wave:
        """One Newton query to every node; the usable replies by site."""
        config = ConfigRecord(
            {**request.to_values(), "server-round": self.server_round}
        )
        content = RecordDict(
            {
                ARRAYS: arrays_to_record(dict(arrays)),
                CONFIG: config,
                GLM: arrays_to_record({"beta": beta}),
            }
        )
        messages = [
            Message(content, dst_node_id=node, message_type=NEWTON_MESSAGE)
            for node in sorted(self.grid.get_node_ids())
        ]
        self.waves += 1
        replies = list(
            self.grid.send_and_receive(messages, timeout=self.fed.round_timeout)
        )
        identities = self.identities()
        k, size = beta.shape[0], beta[0].size
        wave = _Wave({}, {})
        claimed: Counter[str] = Counter()
        for i, msg in enumerate(replies):
            try:
                site = identities.identify(msg, i)
            except Unidentified as e:
                wave.excluded[e.key] = e.reason
                continue
            claimed[site] += 1
            try:
                reply = read_newton_reply(
                    msg, site, candidates=k, size=size, features=self.features
                )
                self._verify(site, reply, identities.node_key(msg), size)
            except (ValueError, ReplyRejected) as e:
                wave.excluded[site] = getattr(e, "reason", str(e))
                continue
            wave.replies[site] = reply
        for site, n in claimed.items():
            if n > 1 and wave.replies.pop(site, None) is not None:
                wave.excluded[site] = f"{n} replies claim the site; all are excluded"
        for site, why in wave.excluded.items():
            log.warning("Newton fit: excluded %s: %s", site, why)
        return wave

    def _verify(
        self, site: str, reply: NewtonReply, node_key: bytes | None, size: int
    ) -> None:
        roster = self.strategy.roster
        if roster is not None and (refused := roster.verify_node(site, node_key)):
            raise ReplyRejected(refused)
        declared = self.strategy.declared.get(site, {}).get(SHARED, MAX_SITE_PATIENTS)
        if reply.feature_n > declared:
            raise ReplyRejected(
                f"{reply.feature_n} patients, more than the {declared} it declared"
            )
        for k in range(len(reply.loglik)):
            why = verify_sums(
                GlmSums(reply.n, float(reply.loglik[k]), reply.grad[k], reply.hess[k]),
                size,
                reply.feature_n,
            )
            if why is not None:
                raise ReplyRejected(why)

    def _usable(self, wave: _Wave) -> dict[str, NewtonReply]:
        """The wave's replies from the fit's sites; a site that fails once is
        left out from then on."""
        for site, why in wave.excluded.items():
            self.excluded.setdefault(site, why)
        if self.sites is None:
            self.sites = set(wave.replies)
        self.sites -= set(wave.excluded)
        self.sites &= set(wave.replies)
        if len(self.sites) < self.fed.min_sites:
            raise ConfigError(
                f"the Newton fit has {len(self.sites)} usable site(s) "
                f"({', '.join(sorted(self.sites)) or 'none'}), min-sites is "
                f"{self.fed.min_sites}; excluded: {self.excluded or 'none'}"
            )
        return {s: r for s, r in wave.replies.items() if s in self.sites}

    def standardise(
        self, request: RoundRequest, arrays: Mapping[str, np.ndarray], cfg: ModelConfig
    ) -> ModelConfig:
        """Step 1: the pooled moments of the tumour features."""
        zero = np.zeros((1, BLOCKS, self.p_len))
        wave = self._usable(self._send(request, arrays, zero))
        n = sum(r.feature_n for r in wave.values())
        total = sum(r.feature_sum for r in wave.values())
        squares = sum(r.feature_sq for r in wave.values())
        mean = np.asarray(total) / max(n, 1)
        var = np.asarray(squares) / max(n, 1) - mean * mean
        scale = np.sqrt(np.maximum(var, 0.0))
        scale = np.where(scale > 1e-6 * (np.abs(mean) + 1.0), scale, 1.0)
        return dataclasses.replace(
            cfg,
            feature_centre=tuple(float(x) for x in mean),
            feature_scale=tuple(float(x) for x in scale),
        )

    def fit(
        self, request: RoundRequest, arrays: Mapping[str, np.ndarray], cfg: ModelConfig
    ) -> tuple[Posterior, dict[str, Any]]:
        """Steps 2 and 3: every prior side by side, then the best on validation."""
        priors = self.fed.priors
        precision = [prior_precision(self.p_len, lam) for lam in priors]
        beta = np.zeros((len(priors), BLOCKS, self.p_len))
        converged, steps = False, 0
        while True:
            replies = self._usable(self._send(request, arrays, beta))
            sums = [_total(replies, k) for k in range(len(priors))]
            if converged or steps >= self.fed.newton_rounds:
                break
            new = np.stack(
                [
                    newton_step(beta[k], sums[k], precision[k])
                    for k in range(len(priors))
                ]
            )
            converged = float(np.max(np.abs(new - beta))) < TOLERANCE
            beta, steps = new, steps + 1
        val_n = sum(r.val_n for r in replies.values())
        losses = [
            -sum(float(r.val_loglik[k]) for r in replies.values()) / max(val_n, 1)
            for k in range(len(priors))
        ]
        best = int(np.argmin(losses))
        posterior = Posterior.at_mode(
            beta[best], sums[best], precision[best], priors[best]
        )
        support = {
            r: sum(int(x.regimens.get(r, 0)) for x in replies.values())
            for r in REGIMENS
        }
        record = {
            "sites": sorted(replies),
            "excluded": self.excluded,
            "patients": sums[best].n,
            "validation_patients": val_n,
            "newton_steps": steps,
            "converged": converged,
            "waves": self.waves,
            "priors": [
                {"lam": lam, "validation_log_loss": loss, "train_log_lik": s.loglik}
                for lam, loss, s in zip(priors, losses, sums, strict=True)
            ],
            "lam": priors[best],
            "expert_support": support,
        }
        return posterior, record


def _total(replies: Mapping[str, NewtonReply], k: int) -> GlmSums:
    size = next(iter(replies.values())).grad.shape[1]
    out = GlmSums.zero(size)
    for r in replies.values():
        out = out + GlmSums(r.n, float(r.loglik[k]), r.grad[k], r.hess[k])
    return out


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
        grid, fed, strategy, identities, server_round, _model(model_cfg, arrays)
    )
    cfg = newton.standardise(request, arrays, model_cfg)
    request = dataclasses.replace(request, model_config=cfg.to_dict())
    posterior, fit = newton.fit(request, arrays, cfg)
    model = _model(cfg, arrays)
    model.set_glm_coefficients(posterior.mean)
    fitted = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    allowed, not_allowed = supported_regimens(
        fit["expert_support"], fed.min_expert_support
    )
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
