"""Flower ClientApp: a hospital's node. Thin adapter over the training engine.

The site YAML path arrives as node config ``site-config`` (deployment). In
simulation, node config ``partition-id`` selects one of the synthetic cohort's
site YAMLs (sorted by name) under run config ``cohort-dir``.

Train: the site receives the global weights, trains the shared group and the
experts of the regimens present in its training split (the others are frozen,
so they never change here and are not uploaded), and replies with the trained
arrays, the counts ``n-shared``, ``n-nCRT``, ``n-TNT``, ``n-nCT``, the loss and
the wall time, plus its site name. A site whose YAML has a ``privacy`` section
trains with DP-SGD (:mod:`client.privacy`): it plans the round against its
ledger, declines it (a reply without weights whose ``info`` says why) when the
budget does not allow it, and otherwise sends its ``dp-*`` accounting instead
of the losses. In a staged federation a DP site trains the heads alone, over
features of the pretrained public backbone the federation declares
(:func:`check_public_backbone`), with DP-SGD over its feature cache
(:func:`client.heads.train_heads_private`). Evaluate: the site scores its
validation split and replies with counts and sums only
(:class:`shared_model.site_evaluation.SiteEvaluation`: per regimen score histograms per
class and sums for the Brier score and calibration; Dice and loss sums; the
recommendation counts and policy-value sums with the site's own propensity
model), never per-patient scores; a DP site withholds them unless its YAML
sets ``privacy.release_evaluation`` (they are not DP).

Failures: an exception in either handler is logged in full at the site and
answered with an error reply that carries only a code and a fixed message
(:data:`SITE_ERRORS`): our messages name case ids and paths, which stay at the
site.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.data import SiteDataset, build_site_datasets
from client.engine import TrainConfig, TrainResult, resolve_device, train_local
from client.evaluation import evaluate_dataset
from client.feature_cache import eval_view, load_or_build
from client.heads import HeadConfig, train_heads, train_heads_private
from client.privacy import (
    HEAD_MAX_NOISE,
    PrivacyLedger,
    RoundPlan,
    check_delta,
    describe,
    dp_generator,
    plan_round,
)
from client.site_config import SiteConfig, load_site_config
from shared_model.backbone import backbone_digest
from shared_model.clinical import REGIMENS
from shared_model.errors import ConfigError, DataError, MoeflError
from shared_model.federation_config import FederationConfig
from shared_model.loss import LossConfig
from shared_model.messages import GROUPS, SHARED, TrainReply, expert_group
from shared_model.model import (
    ModelConfig,
    UNetMoECli,
    build_model,
    stage_parameter_groups,
)
from shared_model.plan import Plan
from shared_model.policy import RecommendationRule

log = logging.getLogger(__name__)

app = ClientApp()

SITE_ERRORS: dict[str, tuple[int, str]] = {
    "config": (1001, "the site refused its configuration or the run's settings"),
    "data": (1002, "the site could not read or prepare its data"),
    "site": (1003, "the site could not complete the task"),
    "internal": (1099, "the site failed with an unexpected error"),
}
"""Error codes a site replies with (Flower's own codes are below 100); the
reason text is fixed, so no case id, path or exception text leaves the site."""


def error_reply(msg: Message, error: BaseException, task: str) -> Message:
    """Log ``error`` in full here; reply with its code and a fixed message."""
    kind = (
        "config"
        if isinstance(error, ConfigError)
        else "data"
        if isinstance(error, DataError)
        else "site"
        if isinstance(error, MoeflError)
        else "internal"
    )
    code, text = SITE_ERRORS[kind]
    log.error(
        "%s failed (code %d, sent to the server as such)", task, code, exc_info=error
    )
    return Message(
        Error(code=code, reason=f"moefl-{kind}: {text}; details are in the site's log"),
        reply_to=msg,
    )


@dataclass
class SiteState:
    """A site's loaded data, kept for the life of the process (across rounds)."""

    config: SiteConfig
    plan: Plan
    train: SiteDataset
    val: SiteDataset
    counts: dict[str, int]


_SITES: dict[tuple[str, str], SiteState] = {}

WITHHELD = "privacy: evaluation counts are not DP and the site does not release them"


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def site_yaml_for(node_config: dict[str, Any], fed: FederationConfig) -> Path:
    """The node's site YAML: ``site-config``, else the partition's cohort site."""
    if "site-config" in node_config:
        return Path(str(node_config["site-config"]))
    if "partition-id" not in node_config:
        raise ConfigError("node config needs `site-config` (the site YAML path)")
    if not fed.cohort_dir:
        raise ConfigError(
            "simulation needs run config `cohort-dir` (a synthetic cohort)"
        )
    folder = Path(fed.sites_dir or Path(fed.cohort_dir) / "site_configs")
    yamls = sorted(folder.glob("*.yaml"))
    pid = int(node_config["partition-id"])
    if not 0 <= pid < len(yamls):
        raise ConfigError(
            f"partition {pid} has no site YAML in {folder} ({len(yamls)} found)"
        )
    return yamls[pid]


def load_site(
    node_config: dict[str, Any], fed: FederationConfig, plan: Plan
) -> SiteState:
    path = site_yaml_for(node_config, fed)
    key = (str(path.resolve()), json.dumps(plan.to_dict(), sort_keys=True))
    if key not in _SITES:
        config = load_site_config(path)
        train, val, _ = build_site_datasets(
            config, plan, seed=fed.seed, augment=fed.augment, cache=True
        )
        if config.privacy is not None:
            check_delta(config.privacy, len(train), str(path))
        regimens = train.regimen_indices()
        counts = {
            SHARED: len(train),
            **{expert_group(r): regimens.count(j) for j, r in enumerate(REGIMENS)},
        }
        _SITES[key] = SiteState(config, plan, train, val, counts)
    return _SITES[key]


def _setup(
    msg: Message, context: Context
) -> tuple[FederationConfig, SiteState, UNetMoECli, torch.device]:
    cfg: dict[str, Any] = dict(msg.content.config_records["config"])
    fed = FederationConfig.from_run_config(json.loads(str(cfg["run-config"])))
    plan = Plan.from_dict(json.loads(str(cfg["plan"])))
    site = load_site(dict(context.node_config), fed, plan)
    model = build_model(ModelConfig.from_dict(json.loads(str(cfg["model-config"]))))
    arrays = record_to_arrays(msg.content.array_records["arrays"])
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})
    torch.manual_seed(fed.seed + int(cfg["server-round"]))
    return fed, site, model, resolve_device(site.config.device)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training on the site's split; an error reply with a code on failure."""
    try:
        return train_round(msg, context)
    except Exception as e:
        return error_reply(msg, e, "training")


def train_round(msg: Message, context: Context) -> Message:
    """Local training on the site's split; upload only the groups it trained.

    What trains depends on the round's stage (:meth:`FederationConfig.stage_of`):
    everything (joint), the backbone on segmentation alone, or the pCR heads
    over the site's cached tumour features.
    """
    t0 = time.perf_counter()
    fed, site, model, device = _setup(msg, context)
    rnd = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
    stage = fed.stage_of(rnd)
    if site.config.privacy is not None and fed.training == "staged":
        check_public_backbone(msg, fed, site, model)
    groups = stage_parameter_groups(model, stage)
    trained_groups = [g for g in GROUPS if g == SHARED or site.counts[g]]
    trainable = {n for g in trained_groups for n in groups[g]}
    if stage == "heads":
        return _train_heads_round(
            msg, context, fed, site, model, device, trainable, rnd, t0
        )
    seg_rounds = fed.num_server_rounds
    steps = fed.local_steps_for(len(site.train))
    schedule = (
        ((rnd - 1) * steps, seg_rounds * steps)
        if fed.lr_schedule == "poly"
        else (0, 10**12)
    )
    privacy = site.config.privacy
    plan: RoundPlan | None = None
    if privacy is not None:
        with PrivacyLedger.locked(site.config.run_dir) as ledger:
            plan = plan_round(
                privacy,
                ledger,
                n_patients=len(site.train),
                batch_size=fed.batch_size,
                steps=steps,
                rounds_left=seg_rounds - rnd + 1,
                noise_multiplier=fed.dp_noise_multiplier,
                accountant=fed.dp_accountant,
            )
            if plan.dp is not None:
                # Spend before training: a crash can only over-count the budget.
                ledger.record(
                    plan.dp,
                    round=rnd,
                    run=fed.run_dir,
                    epsilon_after=plan.epsilon_after,
                )
        if plan.dp is None:
            log.warning(
                "site %s declines round %d: %s",
                site.config.site_name,
                rnd,
                plan.declined,
            )
            return _declined(msg, site, plan, describe(plan, privacy))
    # Seed this round's crops and augmentation from (seed, round) alone, so a
    # resumed run draws what an uninterrupted one would have drawn.
    site.train.transform.set_random_state(seed=fed.seed * 1000 + rnd)
    global_weights = {
        n: p.detach().clone() for n, p in model.named_parameters() if n in trainable
    }
    extra = None
    if fed.strategy == "fedprox" and fed.proximal_mu > 0:

        def extra(m: UNetMoECli) -> torch.Tensor:
            terms = [
                (p - global_weights[n].to(p.device)).pow(2).sum()
                for n, p in m.named_parameters()
                if n in global_weights
            ]
            return 0.5 * fed.proximal_mu * torch.stack(terms).sum()

    result = train_local(
        model,
        site.train,
        TrainConfig(
            optimizer=fed.optimizer,
            lr=fed.lr,
            batch_size=fed.batch_size,
            max_steps=steps,
            augment=fed.augment,
            seed=fed.seed * 1000 + rnd,
            loss=LossConfig(pcr_weight=0.0 if stage == "segmentation" else 1.0),
        ),
        device=device,
        trainable=trainable,
        schedule=schedule,
        extra_loss=extra,
        dp=plan.dp if plan is not None else None,
        dp_generator=_noise_source(context, fed, site, rnd, device) if plan else None,
    )
    return _trained_reply(
        msg, site, model, trainable, result, t0, rnd, plan=plan, privacy=privacy
    )


def check_public_backbone(
    msg: Message, fed: FederationConfig, site: SiteState, model: UNetMoECli
) -> None:
    """A DP site trains heads only over features of a backbone that never saw
    its patients: the federation must declare a pretrained backbone (and so
    run no segmentation rounds), the weights received must be that backbone,
    and, when the site pins digests (``privacy.public_backbones``), one of them.
    Refused before any budget is spent."""
    assert site.config.privacy is not None
    name = site.config.site_name
    if not fed.backbone:
        raise ConfigError(
            f"site {name} has a `privacy` section: it trains heads only over a "
            "pretrained public backbone (run config `backbone`, from `moefl "
            "pretrain`), never over one the federation trained on its patients "
            'without DP; or run the federation with `training = "joint"`'
        )
    digest = backbone_digest(model.state_dict())
    declared = msg.content.config_records["config"].get("backbone-sha256")
    if declared != digest:
        raise ConfigError(
            f"site {name}: the backbone received ({digest[:12]}...) is not the one "
            "the federation declares; refusing to train on it"
        )
    pinned = site.config.privacy.public_backbones
    if pinned and digest not in pinned:
        raise ConfigError(
            f"site {name}: backbone {digest} is not in `privacy.public_backbones`; "
            "add it there only if it was trained without this site's patients"
        )


def _train_heads_round(
    msg: Message,
    context: Context,
    fed: FederationConfig,
    site: SiteState,
    model: UNetMoECli,
    device: torch.device,
    trainable: set[str],
    rnd: int,
    t0: float,
) -> Message:
    """Staged training, stage 2: the heads over the site's cached features."""
    features, cached = load_or_build(
        site.config.run_dir / "feature_cache",
        "train",
        model,
        site.plan,
        eval_view(site.train, site.plan, site.config.adc_scale),
        device=device,
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
    privacy = site.config.privacy
    if privacy is None:
        result = train_heads(model, features, head, trainable=trainable)
        return _trained_reply(msg, site, model, trainable, result, t0, rnd)
    with PrivacyLedger.locked(site.config.run_dir) as ledger:
        plan = plan_round(
            privacy,
            ledger,
            n_patients=len(features),
            batch_size=1,
            sample_rate=fed.dp_head_sample_rate,
            steps=fed.dp_head_steps,
            rounds_left=fed.total_rounds - rnd + 1,
            noise_multiplier=fed.dp_noise_multiplier,
            accountant=fed.dp_accountant,
            max_noise=HEAD_MAX_NOISE,
        )
        if plan.dp is not None:
            # Spend before training: a crash can only over-count the budget.
            ledger.record(
                plan.dp,
                round=rnd,
                run=fed.run_dir,
                stage="heads",
                epsilon_after=plan.epsilon_after,
            )
    if plan.dp is None:
        log.warning(
            "site %s declines round %d: %s", site.config.site_name, rnd, plan.declined
        )
        return _declined(msg, site, plan, describe(plan, privacy))
    result = train_heads_private(
        model,
        features,
        replace(head, lr=fed.dp_head_lr, optimizer="sgd"),
        plan.dp,
        generator=_noise_source(context, fed, site, rnd, torch.device("cpu")),
        trainable=trainable,
        secure_mode=privacy.secure_mode,
    )
    return _trained_reply(
        msg, site, model, trainable, result, t0, rnd, plan=plan, privacy=privacy
    )


def _trained_reply(
    msg: Message,
    site: SiteState,
    model: UNetMoECli,
    trainable: set[str],
    result: TrainResult,
    t0: float,
    rnd: int,
    *,
    plan: RoundPlan | None = None,
    privacy: Any = None,
) -> Message:
    """The reply to a training message: the trained arrays and the counts."""
    upload = {
        n: p.detach().cpu().numpy()
        for n, p in model.named_parameters()
        if n in trainable
    }
    # Under DP the training loss is not released: it is computed from the
    # patients without noise. Only the privacy accounting goes back.
    reply = TrainReply(
        counts=site.counts,
        steps=result.steps,
        seconds=time.perf_counter() - t0,
        losses=(
            {
                k: v
                for k, v in (
                    ("train", result.loss),
                    ("seg", result.seg_loss),
                    ("pcr", result.pcr_loss),
                )
                if math.isfinite(v)
            }
            if plan is None
            else None
        ),
        privacy=None if plan is None or privacy is None else describe(plan, privacy),
    )
    metrics = MetricRecord(reply.to_values())
    log.info(
        "site %s round %d: %d steps, loss %.4f",
        site.config.site_name,
        rnd,
        result.steps,
        result.loss,
    )
    content = RecordDict(
        {
            "arrays": arrays_to_record(upload),
            "metrics": metrics,
            "info": ConfigRecord({"site": site.config.site_name}),
        }
    )
    return Message(content, reply_to=msg)


def _noise_source(
    context: Context,
    fed: FederationConfig,
    site: SiteState,
    rnd: int,
    device: torch.device,
) -> torch.Generator:
    """DP randomness on the training device: reproducible for a simulated
    node, secret otherwise."""
    if "partition-id" in context.node_config:
        name = zlib.crc32(site.config.site_name.encode())
        return dp_generator(fed.seed * 1_000_003 + rnd * 7919 + name, device)
    return dp_generator(None, device)


def _declined(
    msg: Message, site: SiteState, plan: RoundPlan, privacy: dict[str, float]
) -> Message:
    """A reply without weights: the site's budget does not allow this round."""
    values = TrainReply(counts=site.counts, privacy=privacy).to_values()
    content = RecordDict(
        {
            "metrics": MetricRecord(values),
            "info": ConfigRecord(
                {"site": site.config.site_name, "declined": plan.declined}
            ),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Validation counts and sums; an error reply with a code on failure."""
    try:
        return evaluate_round(msg, context)
    except Exception as e:
        return error_reply(msg, e, "evaluation")


def _allowed(msg: Message) -> tuple[str, ...]:
    """The regimens the server allows advising (experts with enough support;
    none: advice is withheld)."""
    raw = msg.content.config_records["config"].get("allowed-regimens")
    if raw is None:
        return REGIMENS
    try:
        allowed = json.loads(str(raw))
    except json.JSONDecodeError as e:
        raise ConfigError("`allowed-regimens` is not JSON") from e
    if not isinstance(allowed, list) or any(r not in REGIMENS for r in allowed):
        raise ConfigError(f"`allowed-regimens` must be a subset of {REGIMENS}")
    return tuple(r for r in REGIMENS if r in allowed)


def evaluate_round(msg: Message, context: Context) -> Message:
    """Score the validation split; reply with counts and sums only.

    A site with a ``privacy`` section withholds them unless its YAML sets
    ``privacy.release_evaluation``: the counts are not differentially private,
    so sending them is the site's explicit choice.
    """
    t0 = time.perf_counter()
    fed, site, model, device = _setup(msg, context)
    privacy = site.config.privacy
    if privacy is not None and not privacy.release_evaluation:
        return Message(
            RecordDict(
                {
                    "info": ConfigRecord(
                        {"site": site.config.site_name, "withheld": WITHHELD}
                    )
                }
            ),
            reply_to=msg,
        )
    result = evaluate_dataset(
        model,
        site.config.site_name,
        site.val,
        site.train.cases,
        cohort="validation",
        device=device,
        rule=RecommendationRule(
            margin=fed.recommendation_margin, allowed=_allowed(msg)
        ),
    )
    values: dict[str, Any] = {
        "n": sum(c.n for c in result.counts.values()),
        **result.to_values(),
        "seconds": time.perf_counter() - t0,
    }
    content = RecordDict(
        {
            "metrics": MetricRecord(values),
            "info": ConfigRecord({"site": site.config.site_name}),
        }
    )
    return Message(content, reply_to=msg)
