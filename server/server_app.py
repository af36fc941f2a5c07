"""Flower ServerApp: rounds, run records, checkpoints, resume.

The run folder (``run-dir``, on the coordinator's machine; written through
:class:`server.run_folder.RunFolder`, crash-safe and locked) holds::

    checkpoints/round_NNN.safetensors   global weights after round NNN
    checkpoints/round_NNN.adam.safetensors   FedAdam moments, when used
    checkpoints/round_NNN.state.json    strategy state (FedAdam step, the sites'
                                        declared counts, client-level DP
                                        releases); written last: NNN is complete
    model.safetensors, config.json, plan.json   the latest model (moefl predict reads it)
    run_config.json                     the resolved federation config
    metrics.json                        {"status", "rounds": [...]} one entry per round:
                                        sites (counts, bytes, each site's DP-SGD
                                        accounting under "privacy"), excluded,
                                        declined (a site's budget refused the
                                        round), missing, identified_by
                                        (registration or reply), groups, client_dp,
                                        flags (counts below a declaration),
                                        evaluate; and "declared_counts": per
                                        site, the patients per group it declared
                                        in its first valid reply

A run resumes from its last complete round (weights and strategy state) when
``resume`` is true and continues as if it had never stopped; a round a crash
left incomplete is done again. A resume under a different run config is refused
(beyond the number of rounds, the timeout and the evaluation interval) unless
``resume-changed-config`` is true.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server import planning
from server.advice_step import advice_step
from server.identity import (
    NodeSites,
    RegisteredNodes,
    SiteIdentities,
    round_identities,
)
from server.roster import Roster
from server.round_entry import learn_sites, privacy_line, round_entry
from server.run_folder import RunFolder, StrategyState, expert_support
from server.strategy import GroupedStrategy
from shared_model.backbone import Backbone, apply_backbone, load_backbone
from shared_model.errors import ConfigError
from shared_model.federated_metrics import format_metric
from shared_model.federation_config import STAGES, FederationConfig
from shared_model.messages import RoundRequest
from shared_model.model import (
    ModelConfig,
    build_model,
    model_config_for,
    parameter_groups,
    stage_parameter_groups,
)
from shared_model.plan import PLAN_FILE, Plan, plan_file
from shared_model.policy import supported_regimens
from wire.records import arrays_to_record, request_record

log = logging.getLogger(__name__)


def resolve_plan(fed: FederationConfig, backbone: Backbone | None = None) -> Plan:
    """``plan``, else the cohort's plan.json, else the pretrained backbone's
    plan, else the default; a backbone built for another plan is refused."""
    if (found := plan_file(fed.plan, fed.cohort_dir)) is not None:
        plan = Plan.load(found)
    elif backbone is not None:
        return backbone.plan
    else:
        plan = Plan()
    if backbone is not None and backbone.plan.to_dict() != plan.to_dict():
        raise ConfigError(
            f"run config `backbone` {backbone.path} was pretrained with plan "
            f"{backbone.plan.to_dict()}, the federation uses {plan.to_dict()}; "
            "pretrain on the federation's plan (`moefl pretrain --plan`)"
        )
    return plan


@dataclass
class FederationStart:
    """What a federation starts from: the initial model and the round config."""

    plan: Plan
    model_cfg: ModelConfig
    arrays: dict[str, np.ndarray]  # initial global weights
    strategy: GroupedStrategy
    request: RoundRequest  # sent to every site with each round's weights
    stage_groups: dict[str, dict[str, list[str]]]  # what each stage aggregates
    backbone: dict[str, Any] | None = None  # the pretrained backbone's record


def start_federation(
    fed: FederationConfig, plan: Plan | None = None
) -> FederationStart:
    """Seed, resolve the plan (unless the planning query gave ``plan``), build
    the initial model, strategy and round config."""
    random.seed(fed.seed)
    np.random.seed(fed.seed)
    torch.manual_seed(fed.seed)
    backbone = load_backbone(Path(fed.backbone)) if fed.backbone else None
    plan = plan or resolve_plan(fed, backbone)
    model_cfg = model_config_for(fed, plan)
    if backbone is not None and backbone.feature_centre and fed.features == "tumour":
        model_cfg = dataclasses.replace(
            model_cfg,
            feature_centre=backbone.feature_centre,
            feature_scale=backbone.feature_scale,
        )
    model = build_model(model_cfg)
    request = RoundRequest(
        run_config=fed.to_run_config(),
        plan=plan.to_dict(),
        model_config=model_cfg.to_dict(),
        backbone_sha256=None if backbone is None else backbone.sha256,
    )
    if backbone is not None:
        apply_backbone(model, backbone)
        log.info(
            "pretrained backbone %s (sha256 %s, trained on %s); training the heads "
            "alone",
            backbone.path,
            backbone.sha256,
            backbone.trained_on.get("source", "?"),
        )
    return FederationStart(
        plan,
        model_cfg,
        {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()},
        GroupedStrategy(fed, parameter_groups(model)),
        request,
        {stage: stage_parameter_groups(model, stage) for stage in STAGES},
        None
        if backbone is None
        else {
            "path": str(backbone.path),
            "sha256": backbone.sha256,
            "trained_on": backbone.trained_on,
        },
    )


def run_federation(
    grid: Grid, run_config: Mapping[str, Any], node_sites: NodeSites | None = None
) -> dict[str, Any]:
    """The coordinator's loop. Returns the run record (also in metrics.json).

    ``node_sites``: a simulation's own map of its nodes to sites
    (:mod:`server.identity`); None in deployment, where sites are their nodes'
    registered names.
    """
    fed = FederationConfig.from_run_config(run_config)
    folder = RunFolder(Path(fed.run_dir))
    with folder.locked():
        planned = (
            _plan_step(grid, fed, folder, node_sites)
            if fed.plans_from_fingerprints()
            else None
        )
        if fed.plan_only:
            assert planned is not None
            record = {
                "status": "finished",
                "planning": planning.run_summary(planned[1]),
                "rounds": [],
            }
            folder.write_record(record)
            return record
        begin = start_federation(fed, None if planned is None else planned[0])
        begin.strategy.roster = Roster.load(folder.path)
        return _run_rounds(
            grid,
            fed,
            begin,
            folder,
            None if planned is None else planned[1],
            node_sites,
        )


def _plan_step(
    grid: Grid,
    fed: FederationConfig,
    folder: RunFolder,
    node_sites: NodeSites | None = None,
) -> tuple[Plan, dict[str, Any]]:
    """The federated plan: this run folder's earlier one on a resume, else the
    planning query's (written before any round)."""
    saved = planning.saved_plan(folder.path) if fed.resume else None
    if saved is not None and not fed.plan_only:
        log.info("plan from %s (the run's planning step)", planning.RECORD)
        return saved
    t0 = time.perf_counter()
    plan, record = planning.federated_plan(grid, fed, node_sites)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    planning.save_plan(folder.path / PLAN_FILE, plan, record)
    log.info(
        "plan from the fingerprints of %d sites (%d cases): spacing %s mm, patch %s%s",
        len(record["sites"]),
        sum(record["cases"].values()),
        plan.spacing,
        plan.patch_size,
        f"; excluded {sorted(record['excluded'])}" if record["excluded"] else "",
    )
    return plan, record


def _run_rounds(
    grid: Grid,
    fed: FederationConfig,
    begin: FederationStart,
    folder: RunFolder,
    planned: dict[str, Any] | None = None,
    node_sites: NodeSites | None = None,
) -> dict[str, Any]:
    """The rounds, under the run folder's lock."""
    plan, model_cfg, strategy = begin.plan, begin.model_cfg, begin.strategy
    config = request_record(begin.request)
    resumed = folder.last_complete() if fed.resume else None
    record: dict[str, Any] = {"status": "running", "rounds": []}
    if planned is not None:
        record["planning"] = planning.run_summary(planned)
    if begin.backbone is not None:
        record["backbone"] = begin.backbone
    if strategy.roster is not None:
        record["roster"] = strategy.roster.describe()
    if resumed is not None:
        folder.check_run_config(
            fed.to_run_config(), allow_changes=fed.resume_changed_config
        )
        start, arrays = resumed.round, resumed.arrays
        strategy.adam = resumed.state.adam
        strategy.declared = resumed.state.declared
        strategy.client_dp_releases = resumed.state.client_dp_releases
        record["rounds"] = resumed.rounds
        record["declared_counts"] = strategy.declared
        record["expert_support"] = expert_support(record["rounds"])
        log.info("resuming %s after round %d", folder.path, start)
    else:
        folder.check_run_config(fed.to_run_config(), allow_changes=True)
        start, arrays = 0, begin.arrays

    bytes_down = int(sum(a.nbytes for a in arrays.values()))
    heard: dict[int, str] = {}  # Flower node id -> site name, from its replies
    known = RegisteredNodes()  # the nodes' registered names and keys
    bound: dict[str, int] = {}  # site -> node, where replies name their site

    def current() -> SiteIdentities:
        """Who each node is now (the registrations are read again each time)."""
        nonlocal known
        found, known = round_identities(
            grid,
            allow_claims=fed.allow_unregistered_sites,
            node_sites=node_sites,
            known=known,
            bound=bound,
        )
        return found

    try:
        for rnd in range(start + 1, fed.total_rounds + 1):
            t0 = time.perf_counter()
            stage = fed.stage_of(rnd)
            strategy.groups = begin.stage_groups[stage]
            messages = list(
                strategy.configure_train(rnd, arrays_to_record(arrays), config, grid)
            )
            replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout))
            identities = current()
            missing = learn_sites(heard, messages, replies, identities.names)
            if missing:
                log.warning(
                    "round %d: no reply within %.0f s from %s",
                    rnd,
                    fed.round_timeout,
                    ", ".join(missing),
                )
            outcome = strategy.aggregate_round(rnd, replies, arrays, identities)
            arrays = outcome.arrays
            for site in outcome.sites.values():
                site["bytes_down"] = bytes_down
            entry = round_entry(rnd, stage, outcome, missing, identities.source)
            if fed.evaluate_every and rnd % fed.evaluate_every == 0:
                so_far = [*record["rounds"], entry]
                entry["evaluate"] = _evaluate(
                    grid, fed, begin, strategy, rnd, arrays, so_far, identities
                )
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            record["rounds"].append(entry)
            record["declared_counts"] = strategy.declared
            record["expert_support"] = expert_support(record["rounds"])
            folder.save_round(
                rnd,
                arrays,
                StrategyState(
                    strategy.adam, strategy.declared, strategy.client_dp_releases
                ),
                record,
                model_cfg,
                plan,
                extra_config={
                    "expert_support": record["expert_support"],
                    **({"backbone": begin.backbone} if begin.backbone else {}),
                },
            )
            ev = entry.get("evaluate", {})
            log.info(
                "round %d/%d (%s): %d sites, excluded %s, declined %s, val AUC %s, "
                "Dice %s, %.0f s%s",
                rnd,
                fed.total_rounds,
                stage,
                len(outcome.sites),
                sorted(outcome.excluded) or "none",
                sorted(outcome.declined) or "none",
                format_metric(ev.get("auc")),
                format_metric(ev.get("dice")),
                entry["seconds"],
                privacy_line(entry),
            )
        if fed.fits_posterior:
            advice_step(grid, fed, begin, folder, record, arrays, current)
    except Exception as e:
        record["status"] = "failed"
        record["error"] = repr(e)
        folder.write_record(record)
        raise
    record["status"] = "finished"
    folder.write_record(record)
    return record


def _evaluate(
    grid: Grid,
    fed: FederationConfig,
    begin: FederationStart,
    strategy: GroupedStrategy,
    rnd: int,
    arrays: dict[str, np.ndarray],
    rounds: list[dict[str, Any]],
    identities: SiteIdentities,
) -> dict[str, Any]:
    """Federated evaluation of ``arrays``: advice may name only the regimens
    whose experts have enough support over ``rounds``."""
    allowed, _ = supported_regimens(expert_support(rounds), fed.min_expert_support)
    config = request_record(
        dataclasses.replace(begin.request, allowed_regimens=allowed)
    )
    messages = strategy.configure_evaluate(rnd, arrays_to_record(arrays), config, grid)
    replies = grid.send_and_receive(messages, timeout=fed.round_timeout)
    return strategy.aggregate_evaluation(replies, identities)


def verify_for_runtime(fed: FederationConfig, *, simulation: bool) -> None:
    """Refuse settings that are safe only in simulation (``dp-reproducible``)."""
    if fed.dp_reproducible and not simulation:
        raise ConfigError(
            "run config `dp-reproducible` is for `moefl simulate` only: it makes "
            "the central DP noise derivable from the seed; remove it"
        )


def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    *,
    simulation: bool = False,
    node_sites: NodeSites | None = None,
) -> ServerApp:
    """A ServerApp whose run config is Flower's plus ``overrides``.

    ``simulation``: the app runs in ``moefl simulate`` (one machine, synthetic
    sites), the only place ``dp-reproducible`` is accepted: it derives the
    central DP noise from the run's seed, which anyone who knows the seed
    could then remove. ``node_sites``: the simulation's map of its nodes to
    sites (:mod:`server.identity`).
    """
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        merged = {**dict(context.run_config), **dict(overrides or {})}
        try:
            verify_for_runtime(
                FederationConfig.from_run_config(merged), simulation=simulation
            )
            run_federation(grid, merged, node_sites)
        except ConfigError as e:
            log.error("invalid federation config: %s", e)
            raise

    return server


app = make_server_app()
