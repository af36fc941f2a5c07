"""The federated Newton fit of the linear head (steps 1-3 of
:mod:`server.advice_step`): the pooled moments of the tumour features, every
prior of ``prior-grid`` fitted side by side by Newton steps on the sites'
summed gradients and Hessians, the prior with the lowest validation log-loss,
and the Platt recalibration on the validation split. Replies are untrusted: a
reply that cannot be attributed, is malformed, has a non-finite, asymmetric or
indefinite Hessian, or claims more patients than its site declared is
excluded with a reason; a site excluded once is left out of the rest of the
fit (which then converges to the remaining sites' optimum).

Bounded influence, as for an update in a round: a site whose curvature per
patient (its Hessian's trace) passes ``update-bound`` times the honest
majority's (the lower median over sites) has all its sums scaled down, as if
its patients weighed less, and that weight never rises again within the fit
(so the steps minimise one objective). A site's gradient per patient is
clipped to ``update-bound`` times the largest the honest majority has sent in
the fit so far: a gradient out of proportion with the site's Hessian (which
would steer the step wherever the site likes) pulls no further than an honest
site could. The fit records both (``bounded``, ``clipped``). Last, every step
stays inside the ball that holds the posterior mode of any honest data set of
the sites' size (:func:`shared_model.posterior.within_prior_ball`): whatever a
site sends, the head's coefficients cannot leave it."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
from shared_model.messages import ARRAYS, CONFIG, SHARED, RoundRequest
from shared_model.model import UNetMoECli, build_model
from shared_model.model_config import ModelConfig
from shared_model.newton_messages import GLM, NewtonReply
from shared_model.posterior import (
    BLOCKS,
    GlmSums,
    Posterior,
    newton_step,
    prior_precision,
    recalibrate,
    recalibration_step,
    verify_sums,
    within_prior_ball,
)
from shared_model.reply_values import MAX_SITE_PATIENTS
from shared_model.robust import lower_median
from wire.records import NEWTON_MESSAGE, arrays_to_record, read_newton_reply

log = logging.getLogger(__name__)

TOLERANCE = 1e-6
"""Newton stops when no coefficient of any candidate moves by more than this."""


@dataclass
class _Wave:
    """One message wave's usable replies and the sites it excluded."""

    replies: dict[str, NewtonReply]
    excluded: dict[str, str]


def model_with(cfg: ModelConfig, arrays: Mapping[str, np.ndarray]) -> UNetMoECli:
    """The network of ``cfg`` holding ``arrays``."""
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
        self.bounded: dict[str, float] = {}  # site -> the smallest scale applied
        self.clipped: dict[str, int] = {}  # site -> waves whose gradient was clipped
        self._scale: dict[str, float] = {}  # this design's weights (see _bounded)
        self._reference = (0.0, 0.0)  # the largest honest gradient per patient
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
        return self._bounded({s: r for s, r in wave.replies.items() if s in self.sites})

    def _bounded(self, replies: dict[str, NewtonReply]) -> dict[str, NewtonReply]:
        """The module docstring's bounded influence: weights scaled by
        curvature, then gradients clipped."""
        multiple = self.fed.update_bound
        if multiple <= 0 or len(replies) < 2:
            return replies
        trace = {
            s: float(np.trace(r.hess[0]) + np.trace(r.val_hess[0]))
            / max(r.n + r.val_n, 1)
            for s, r in replies.items()
        }
        ref = lower_median(list(trace.values()))
        out = {}
        for s, r in replies.items():
            scale = self._scale.get(s, 1.0)
            if ref > 0 and trace[s] > multiple * ref:
                scale = min(scale, multiple * ref / trace[s])
            self._scale[s] = scale
            if scale < 1.0:
                self.bounded[s] = min(self.bounded.get(s, 1.0), scale)
                r = dataclasses.replace(
                    r,
                    loglik=r.loglik * scale,
                    grad=r.grad * scale,
                    hess=r.hess * scale,
                    val_loglik=r.val_loglik * scale,
                    val_grad=r.val_grad * scale,
                    val_hess=r.val_hess * scale,
                )
            out[s] = r
        per = [
            (_per_patient(r.grad, r.n), _per_patient(r.val_grad, r.val_n))
            for r in out.values()
        ]
        self._reference = (
            max(self._reference[0], lower_median([g for g, _ in per])),
            max(self._reference[1], lower_median([v for _, v in per])),
        )
        for s, r in out.items():
            grad = _clipped(r.grad, multiple * self._reference[0] * r.n)
            val_grad = _clipped(r.val_grad, multiple * self._reference[1] * r.val_n)
            if grad is not r.grad or val_grad is not r.val_grad:
                self.clipped[s] = self.clipped.get(s, 0) + 1
                out[s] = dataclasses.replace(r, grad=grad, val_grad=val_grad)
        return out

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
        # the raw features' sizes say nothing of the standardised design's
        self._scale, self._reference = {}, (0.0, 0.0)
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
                    within_prior_ball(
                        newton_step(beta[k], sums[k], precision[k]),
                        precision[k],
                        sums[k].n,
                    )
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
            "bounded": self.bounded,
            "clipped": self.clipped,
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

    def calibrate(
        self, request: RoundRequest, arrays: Mapping[str, np.ndarray], beta: np.ndarray
    ) -> tuple[float, float, dict[str, Any]]:
        """Step 3b: Platt recalibration on the validation split, ``shift +
        slope * logit``, by Newton steps on the sites' validation sums (folded
        into the linear head, so the model stays one logistic regression)."""
        theta = np.array([1.0, 0.0])
        steps, converged = 0, False
        while steps < self.fed.newton_rounds:
            b = recalibrate(beta, float(theta[0]), float(theta[1]))[None]
            replies = self._usable(self._send(request, arrays, b))
            n = sum(r.val_n for r in replies.values())
            if n < MIN_CALIBRATION:
                return 1.0, 0.0, {"skipped": f"{n} validation patients with an outcome"}
            grad = sum(r.val_grad[0] for r in replies.values())
            hess = sum(r.val_hess[0] for r in replies.values())
            new = recalibration_step(beta, theta, np.asarray(grad), np.asarray(hess))
            converged = float(np.max(np.abs(new - theta))) < TOLERANCE
            theta, steps = new, steps + 1
            if converged:
                break
        return (
            float(theta[0]),
            float(theta[1]),
            {
                "slope": float(theta[0]),
                "shift": float(theta[1]),
                "newton_steps": steps,
                "converged": converged,
                "validation_patients": n,
            },
        )


MIN_CALIBRATION = 20
"""Fewer validation patients with an outcome than this: no recalibration."""


def _total(replies: Mapping[str, NewtonReply], k: int) -> GlmSums:
    size = next(iter(replies.values())).grad.shape[1]
    out = GlmSums.zero(size)
    for r in replies.values():
        out = out + GlmSums(r.n, float(r.loglik[k]), r.grad[k], r.hess[k])
    return out


def _per_patient(grad: np.ndarray, n: int) -> float:
    """The largest candidate's gradient norm per patient."""
    if grad.size == 0:
        return 0.0
    return float(np.linalg.norm(grad.reshape(len(grad), -1), axis=1).max()) / max(n, 1)


def _clipped(grad: np.ndarray, cap: float) -> np.ndarray:
    """``grad`` with each candidate's row scaled to a norm of at most ``cap``
    (the same array when none is above)."""
    if grad.size == 0:
        return grad
    norms = np.linalg.norm(grad.reshape(len(grad), -1), axis=1)
    if (norms <= cap).all():
        return grad
    factor = np.where(norms > cap, cap / np.maximum(norms, 1e-300), 1.0)
    return grad * factor.reshape((-1,) + (1,) * (grad.ndim - 1))
