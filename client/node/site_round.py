"""One round at a site, as plain functions (no Flower): train or evaluate.

:func:`train_round` trains the shared group and the experts of the regimens
present in the site's training split (the others are frozen, so they never
change here and are not uploaded) and returns a
:class:`shared_model.messages.SiteTrainReply`: the trained arrays, the counts
per group, the steps, the seconds and the losses. A site whose YAML has a
``privacy`` section trains with DP-SGD through its privacy
(:class:`client.privacy.site_privacy.SitePrivacy`): it plans the round against
its ledger, declines it when the budget does not allow it, and otherwise
reports its accounting instead of the losses. In a staged federation
a DP site trains the heads alone, over features of the pretrained public
backbone the federation declares (:func:`check_public_backbone`), with DP-SGD
over its feature cache (:func:`client.training.heads.train_heads_private`).

:func:`evaluate_round` scores the validation split into counts and sums only
(:class:`shared_model.site_evaluation.SiteEvaluation`), never per-patient
scores; a DP site withholds them unless its YAML sets
``privacy.release_evaluation`` (``dp``: noised and charged to its ledger;
``true``: exact, not DP).

:func:`fingerprint_round` answers the planning query with the site's dataset
fingerprint (:mod:`client.checks.fingerprint`): aggregate counts, noised and charged
to the ledger at a DP site.

The ClientApp (:mod:`client.node.client_app`) is a thin adapter over these;
the overhead benchmark calls them directly.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from client.checks.fingerprint import released_fingerprint
from client.data.site_config import load_site_config
from client.node.site_state import RoundSetup, prepare_round, site_yaml_for
from client.privacy.dp_sgd import PrivateRound
from client.privacy.evaluation_release import released_evaluation
from client.privacy.rounds import RoundPlan, RoundShape, describe
from client.privacy.site_privacy import SitePrivacy, release_seed
from client.scoring.evaluation import evaluate_dataset
from client.training.engine import TrainConfig, TrainResult, train_local
from client.training.feature_cache import eval_view, load_or_build
from client.training.heads import HeadConfig, train_heads, train_heads_private
from shared_model.backbone import backbone_digest
from shared_model.clinical import REGIMENS
from shared_model.errors import ConfigError, SecureAggregationRequired
from shared_model.federation_config import FederationConfig
from shared_model.layout import FEATURE_CACHE
from shared_model.loss import LossConfig
from shared_model.messages import (
    GROUPS,
    SECONDS,
    SHARED,
    FingerprintReply,
    RoundRequest,
    SiteTrainReply,
    TrainReply,
)
from shared_model.model import UNetMoECli
from shared_model.parameter_groups import stage_parameter_groups
from shared_model.policy import RecommendationRule
from shared_model.posterior import Posterior

log = logging.getLogger(__name__)

WITHHELD = "privacy: evaluation counts are not DP and the site does not release them"


def train_round(
    request: RoundRequest,
    arrays: Mapping[str, np.ndarray],
    node_config: Mapping[str, Any],
    *,
    secure: bool = False,
) -> SiteTrainReply:
    """Local training on the site's split; upload only the groups it trained.

    What trains depends on the round's stage (:meth:`FederationConfig.stage_of`):
    everything (joint), the backbone on segmentation alone, or the pCR heads
    over the site's cached tumour features. A site whose YAML sets
    ``secure_aggregation: required`` refuses a round that is not ``secure``
    (:class:`shared_model.errors.SecureAggregationRequired`), before training.
    """
    t0 = time.perf_counter()
    r = prepare_round(request, arrays, node_config)
    if r.site.config.secure_aggregation.required and not secure:
        raise SecureAggregationRequired(
            f"{r.site.config.site_name}: the site's YAML sets `secure_aggregation: "
            "required` and this round is not securely aggregated"
        )
    stage = r.fed.stage_of(request.server_round)
    if r.site.config.privacy is not None and r.fed.training == "staged":
        check_public_backbone(r)
    groups = stage_parameter_groups(r.model, stage)
    trained_groups = [g for g in GROUPS if g == SHARED or r.site.counts[g]]
    trainable = {n for g in trained_groups for n in groups[g]}
    if stage == "heads":
        return _train_heads(r, trainable, t0)
    return _train_network(r, trainable, t0, pcr=stage != "segmentation")


def _train_network(
    r: RoundSetup, trainable: set[str], t0: float, *, pcr: bool
) -> SiteTrainReply:
    """Joint or segmentation rounds: the network on the site's patients."""
    fed, site, rnd = r.fed, r.site, r.request.server_round
    steps = fed.local_steps_for(len(site.train))
    schedule = (
        ((rnd - 1) * steps, fed.num_server_rounds * steps)
        if fed.lr_schedule == "poly"
        else (0, 10**12)
    )
    plan = private = None
    privacy = SitePrivacy.of(site.config, fed.dp_accountant)
    if privacy is not None:
        plan = _open_round(r, privacy, len(site.train))
        if plan.dp is None:
            return _declined(r, privacy, plan)
        private = _private_round(r, privacy, plan, r.device)
    # Seed this round's crops and augmentation from (seed, round) alone, so a
    # resumed run draws what an uninterrupted one would have drawn.
    site.train.transform.set_random_state(seed=fed.seed * 1000 + rnd)
    result = train_local(
        r.model,
        site.train,
        TrainConfig(
            optimizer=fed.optimizer,
            lr=fed.lr,
            batch_size=fed.batch_size,
            max_steps=steps,
            augment=fed.augment,
            seed=fed.seed * 1000 + rnd,
            loss=LossConfig(pcr_weight=1.0 if pcr else 0.0),
        ),
        device=r.device,
        trainable=trainable,
        schedule=schedule,
        extra_loss=_proximal_term(r, trainable),
        dp=private,
    )
    return _trained(r, trainable, result, t0, plan)


def _proximal_term(r: RoundSetup, trainable: set[str]) -> Any:
    """FedProx's ``mu/2 |w - w_global|^2`` over the trained weights, or None."""
    fed = r.fed
    if fed.strategy != "fedprox" or fed.proximal_mu <= 0:
        return None
    anchor = {
        n: p.detach().clone() for n, p in r.model.named_parameters() if n in trainable
    }

    def extra(m: UNetMoECli) -> torch.Tensor:
        terms = [
            (p - anchor[n].to(p.device)).pow(2).sum()
            for n, p in m.named_parameters()
            if n in anchor
        ]
        return 0.5 * fed.proximal_mu * torch.stack(terms).sum()

    return extra


def _open_round(r: RoundSetup, privacy: SitePrivacy, n_patients: int) -> RoundPlan:
    """Plan this round against the site's ledger and record it before training
    (a crash can only over-count the budget)."""
    rnd = r.request.server_round
    shape = RoundShape.of(r.fed, n_patients, rnd)
    return privacy.open_round(shape, server_round=rnd, run=r.fed.run_dir)


def _private_round(
    r: RoundSetup, privacy: SitePrivacy, plan: RoundPlan, device: torch.device
) -> PrivateRound:
    """The round's opacus settings; its noise reproducible for a simulated
    node, secret otherwise."""
    assert plan.dp is not None
    seed = None
    if r.simulated:
        name = zlib.crc32(r.site.config.site_name.encode())
        seed = r.fed.seed * 1_000_003 + r.request.server_round * 7919 + name
    return privacy.private_round(plan.dp, device=device, seed=seed)


def check_public_backbone(r: RoundSetup) -> None:
    """A DP site trains heads only over features of a backbone that never saw
    its patients: the federation must declare a pretrained backbone (and so
    run no segmentation rounds), the weights received must be that backbone,
    and, when the site pins digests (``privacy.public_backbones``), one of them.
    Refused before any budget is spent."""
    privacy, name = r.site.config.privacy, r.site.config.site_name
    assert privacy is not None
    if not r.fed.backbone:
        raise ConfigError(
            f"site {name} has a `privacy` section: it trains heads only over a "
            "pretrained public backbone (run config `backbone`, from `moefl "
            "pretrain`), never over one the federation trained on its patients "
            'without DP; or run the federation with `training = "joint"`'
        )
    digest = backbone_digest(r.model.state_dict())
    if r.request.backbone_sha256 != digest:
        raise ConfigError(
            f"site {name}: the backbone received ({digest[:12]}...) is not the one "
            "the federation declares; refusing to train on it"
        )
    if privacy.public_backbones and digest not in privacy.public_backbones:
        raise ConfigError(
            f"site {name}: backbone {digest} is not in `privacy.public_backbones`; "
            "add it there only if it was trained without this site's patients"
        )


def _train_heads(r: RoundSetup, trainable: set[str], t0: float) -> SiteTrainReply:
    """Staged training, stage 2: the heads over the site's cached features."""
    site, fed, rnd = r.site, r.fed, r.request.server_round
    features, cached = load_or_build(
        site.config.run_dir / FEATURE_CACHE,
        "train",
        r.model,
        site.plan,
        eval_view(site.train, site.plan, site.config.adc_scale),
        device=r.device,
    )
    log.info(
        "site %s round %d: %d patients' features %s",
        site.config.site_name,
        rnd,
        len(features),
        "read from the cache" if cached else "computed and cached",
    )
    head = HeadConfig(
        epochs=fed.head_epochs,
        lr=fed.head_lr,
        batch_size=fed.head_batch_size,
        seed=fed.seed * 1000 + rnd,
    )
    privacy = SitePrivacy.of(site.config, fed.dp_accountant)
    if privacy is None:
        result = train_heads(r.model, features, head, trainable=trainable)
        return _trained(r, trainable, result, t0)
    plan = _open_round(r, privacy, len(features))
    if plan.dp is None:
        return _declined(r, privacy, plan)
    result = train_heads_private(
        r.model,
        features,
        replace(head, lr=fed.dp_head_lr, optimizer="sgd"),
        _private_round(r, privacy, plan, torch.device("cpu")),
        trainable=trainable,
    )
    return _trained(r, trainable, result, t0, plan)


def _trained(
    r: RoundSetup,
    trainable: set[str],
    result: TrainResult,
    t0: float,
    plan: RoundPlan | None = None,
) -> SiteTrainReply:
    """The trained arrays and the counts; under DP the accounting replaces the
    losses (computed from the patients without noise, so never released)."""
    site, privacy = r.site, r.site.config.privacy
    upload = {
        n: p.detach().cpu().numpy()
        for n, p in r.model.named_parameters()
        if n in trainable
    }
    losses = {
        k: v
        for k, v in (
            ("train", result.loss),
            ("seg", result.seg_loss),
            ("pcr", result.pcr_loss),
        )
        if math.isfinite(v)
    }
    reply = TrainReply(
        counts=site.counts,
        steps=result.steps,
        seconds=time.perf_counter() - t0,
        losses=losses if plan is None else None,
        privacy=None if plan is None or privacy is None else describe(plan, privacy),
    )
    log.info(
        "site %s round %d: %d steps, loss %.4f",
        site.config.site_name,
        r.request.server_round,
        result.steps,
        result.loss,
    )
    return SiteTrainReply(site.config.site_name, reply, upload)


def _declined(r: RoundSetup, privacy: SitePrivacy, plan: RoundPlan) -> SiteTrainReply:
    """A reply without weights: the site's budget does not allow this round."""
    return SiteTrainReply(
        r.site.config.site_name,
        TrainReply(counts=r.site.counts, privacy=privacy.describe(plan)),
        declined=plan.declined,
    )


def evaluate_round(
    request: RoundRequest,
    arrays: Mapping[str, np.ndarray],
    node_config: Mapping[str, Any],
    posterior: Posterior | None = None,
) -> tuple[str, dict[str, Any] | str]:
    """Score the validation split: the site's name and its counts and sums, or
    the reason it withholds them.

    The advice is scored under the request's rule (the one the federation
    decided, with its ``posterior``), else the run config's margin rule; the
    request's candidate rules add their doubly robust sums.

    A site with a ``privacy`` section withholds them unless its YAML sets
    ``privacy.release_evaluation``: ``dp`` sends them noised, charged to its
    ledger first (:mod:`client.privacy.evaluation_release`; ConfigError when
    the budget cannot pay); ``true`` sends them exactly, NOT differentially
    private, the site's explicit choice.
    """
    t0 = time.perf_counter()
    r = prepare_round(request, arrays, node_config)
    site, privacy = r.site, r.site.config.privacy
    if privacy is not None and privacy.release_evaluation == "withhold":
        return site.config.site_name, WITHHELD
    allowed = REGIMENS if request.allowed_regimens is None else request.allowed_regimens
    try:
        rule = (
            RecommendationRule(margin=r.fed.recommendation_margin, allowed=allowed)
            if request.advice_rule is None
            else RecommendationRule.from_dict(request.advice_rule, posterior)
        )
        candidates = [
            RecommendationRule.from_dict(c, posterior) for c in request.candidates or ()
        ]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"the round's advice rule is unusable ({e})") from e
    result = evaluate_dataset(
        r.model,
        site.config.site_name,
        site.val,
        site.train.cases,
        cohort="validation",
        device=r.device,
        rule=rule,
        candidates=candidates,
    )
    if privacy is not None and privacy.release_evaluation == "dp":
        seed = release_seed(r.fed, site.config.site_name, request.server_round)
        dp = SitePrivacy.of(site.config, r.fed.dp_accountant)
        assert dp is not None  # the site has a privacy section
        result, _ = released_evaluation(result, dp, n_cases=len(site.val), seed=seed)
    return site.config.site_name, {
        **result.to_values(),
        SECONDS: time.perf_counter() - t0,
    }


def fingerprint_round(
    run_config: Mapping[str, Any], node_config: Mapping[str, Any]
) -> FingerprintReply:
    """The site's answer to the planning query: its fingerprint (under a
    ``privacy`` section noised, and charged to its ledger first)."""
    fed = FederationConfig.from_run_config(dict(run_config))
    config = load_site_config(site_yaml_for(node_config, fed))
    seed = release_seed(fed, config.site_name)
    fp, privacy = released_fingerprint(config, fed.dp_accountant, seed=seed)
    return FingerprintReply(config.site_name, fp.to_values(), privacy)
