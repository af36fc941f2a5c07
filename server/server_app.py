"""Flower ServerApp: a thin adapter. It reads the run config, opens the run
folder, runs the planning step, hands the rounds to the strategy
(:meth:`server.strategy.GroupedStrategy.resume` and
:meth:`~server.strategy.GroupedStrategy.run`, which own the loop and its
state), then the advice step, and records the run as finished or failed.

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

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server import planning
from server.advice_step import advice_step
from server.federation_start import start_federation
from server.identity import NodeSites
from server.roster import Roster
from server.round_loop import SiteTracker, opening_record
from server.run_folder import RunFolder
from shared_model.errors import ConfigError
from shared_model.federation_config import FederationConfig
from shared_model.plan import PLAN_FILE, Plan

log = logging.getLogger(__name__)


def run_federation(
    grid: Grid, run_config: Mapping[str, Any], node_sites: NodeSites | None = None
) -> dict[str, Any]:
    """The coordinator's run: read the config, open the run folder, plan,
    hand the rounds to the strategy, finish. Returns the run record (also in
    metrics.json).

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
        roster = Roster.load(folder.path)
        begin = start_federation(
            fed, None if planned is None else planned[0], roster=roster
        )
        record = opening_record(
            None if planned is None else planning.run_summary(planned[1]),
            begin.backbone,
            None if roster is None else roster.describe(),
        )
        arrays = begin.strategy.resume(begin.arrays, folder, record)
        sites = SiteTracker(
            grid, allow_claims=fed.allow_unregistered_sites, node_sites=node_sites
        )
        try:
            arrays = begin.strategy.run(grid, begin, arrays, folder, record, sites)
            if fed.fits_posterior:
                advice_step(grid, fed, begin, folder, record, arrays, sites)
        except Exception as e:
            record["status"] = "failed"
            record["error"] = repr(e)
            folder.write_record(record)
            raise
        record["status"] = "finished"
        folder.write_record(record)
        return record


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
