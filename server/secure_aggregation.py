"""A secure round's new weights, from what :mod:`server.secure_round` gathered.

Per group of the round:

- summed (trained by at least ``secagg-min-group-sites`` of the sites that
  sent shares): the count-weighted mean update from the unmasked sums, as
  :func:`shared_model.aggregation.grouped_mean` computes it in the clear;
  under distributed DP the unweighted mean, whose sum carries every site's
  noise share, and which is applied only when enough sites' shares arrived for
  the noise to reach ``client-dp-noise-multiplier * client-dp-clip``;
- small: the sites' releases, count-weighted when all are in the clear, else
  unweighted; none when they withheld it.

Then the server optimiser (FedAdam) as in a plain round
(:func:`server.round_aggregation.server_step`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Message

from secagg.grouped import GroupSum, Layout
from server.round_aggregation import client_dp_epsilon, server_step
from server.round_entry import RoundOutcome
from server.run_folder import StrategyState
from server.secure_round import SecureContext, Waves, gather, unmasked_sums
from shared_model.aggregation import GroupResult
from shared_model.federation_config import FederationConfig
from shared_model.messages import SHARED

log = logging.getLogger(__name__)


def secure_aggregate(
    fed: FederationConfig,
    groups: Mapping[str, list[str]],
    state: StrategyState,
    current: dict[str, np.ndarray],
    waves: Waves,
    sums: Mapping[str, GroupSum],
    outcome: RoundOutcome,
) -> dict[str, np.ndarray]:
    """The new weights (see the module docstring); fills ``outcome.groups``,
    ``outcome.client_dp`` and the record of the small groups' choices."""
    survivors = sorted(waves.masked)
    announced = waves.contributors(sorted(waves.shares))
    z = fed.client_dp_noise_multiplier
    new = {k: np.array(v, copy=True) for k, v in current.items()}
    noise: dict[str, float] = {}
    contributed: dict[str, int] = {}
    for group, names in groups.items():
        trained = [s for s in survivors if group in waves.keys[s].groups]
        need = 1 if group == SHARED else fed.min_sites_per_expert
        if not names:
            continue
        if announced.get(group, 0) >= fed.secagg_min_group_sites:
            mean, result = _summed(fed, group, sums[group], announced[group], waves)
            if mean is not None and z > 0:
                k = contributed[group] = sums[group].sites
                share = min(announced[group], waves.threshold)
                noise[group] = z * fed.client_dp_clip * math.sqrt(k / share) / k
        else:
            mean, result = _released(group, names, waves, trained, current)
        result.sites = trained
        result.updated = mean is not None and len(trained) >= need
        outcome.groups[group] = result
        if result.updated and mean is not None:
            for name in names:
                value = np.asarray(current[name], np.float64) + mean[name]
                new[name] = value.astype(current[name].dtype)
    if z > 0:
        state.client_dp_releases += 1
        outcome.client_dp = {
            "distributed": True,
            "noise_multiplier": z,
            "clip": fed.client_dp_clip,
            "delta": fed.client_dp_delta,
            "releases": state.client_dp_releases,
            **client_dp_epsilon(fed, state.client_dp_releases),
            "noise_std": noise,
            "contributing_sites": contributed,
        }
    return server_step(fed, groups, state, current, new, outcome)


def _summed(
    fed: FederationConfig, group: str, s: GroupSum, announced: int, waves: Waves
) -> tuple[dict[str, np.ndarray] | None, GroupResult]:
    """The mean update of a summed group, or None (too few sites or patients)."""
    result = GroupResult(n=int(round(s.patients)))
    if fed.client_dp_noise_multiplier > 0:
        if s.sites < min(announced, waves.threshold):
            return None, result  # too few noise shares arrived
        return s.mean(unweighted=True), result
    return s.mean(), result


def _released(
    group: str,
    names: list[str],
    waves: Waves,
    trained: list[str],
    current: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray] | None, GroupResult]:
    """The mean of a small group's releases (None: all withheld)."""
    weights: dict[str, float] = {}
    unweighted = False
    for site in trained:
        reply = waves.masked[site]
        choice = reply.choices.get(group, "withhold")
        if choice == "withhold" or not all(n in reply.released for n in names):
            continue
        if not all(
            reply.released[n].shape == current[n].shape
            and np.all(np.isfinite(reply.released[n]))
            for n in names
        ):
            continue
        unweighted |= choice != "clear"
        weights[site] = float(reply.clear_counts.get(group, 0))
    result = GroupResult(n=int(sum(weights.values())))
    if not weights:
        return None, result
    if unweighted or sum(weights.values()) <= 0:
        weights = dict.fromkeys(weights, 1.0)
    total = sum(weights.values())
    mean: dict[str, np.ndarray] = {}
    for n in names:
        acc = np.zeros(current[n].shape, np.float64)
        for s, w in weights.items():
            acc += w * np.asarray(waves.masked[s].released[n], np.float64)
        mean[n] = acc / total
    return mean, result


def small_group_record(waves: Waves) -> dict[str, dict[str, Any]]:
    """Per site, the choice it applied to each small group."""
    return {
        site: dict(reply.choices)
        for site, reply in waves.masked.items()
        if reply.choices
    }


def secure_train_round(
    fed: FederationConfig,
    groups: Mapping[str, list[str]],
    state: StrategyState,
    ctx: SecureContext,
    current: dict[str, np.ndarray],
    messages: list[Message],
) -> tuple[RoundOutcome, list[str]]:
    """One securely aggregated training round (:mod:`server.secure_round`)
    from the plain training ``messages``; its outcome and the sites (else
    nodes) that never answered."""
    outcome = ctx.outcome
    layout = Layout.of(current, {g: groups[g] for g in sorted(groups)})
    waves = gather(ctx, messages, groups, layout)
    answered = set(waves.nodes.values())
    missing = sorted(
        ctx.identities.names.get(n, f"node {n}")
        for n in (m.metadata.dst_node_id for m in messages)
        if n not in answered
    )
    for site, meta in waves.meta.items():
        account = None if meta.reply.privacy is None else meta.reply.privacy.to_dict()
        if meta.declined is not None:
            outcome.declined[site] = {"reason": meta.declined, "privacy": account}
            continue
        outcome.sites[site] = {
            "seconds": meta.reply.seconds,
            "bytes_up": int(waves.bytes_up[site]),
            "privacy": account,
        }
    sums, bound = unmasked_sums(fed, waves, layout)
    outcome.secure = {
        "waves": waves.waves,
        "threshold": waves.threshold,
        "sites": {
            "keys": len(waves.keys),
            "shares": len(waves.shares),
            "masked": len(waves.masked),
            "unmasked": len(waves.revealed),
        },
        "dropped": sorted(s for s in waves.shares if s not in waves.masked),
        "quantization_bound": bound,
        "small_groups": small_group_record(waves),
        "skipped": waves.skipped,
    }
    if sums is None:
        log.warning("round %d: secure aggregation skipped: %s", ctx.rnd, waves.skipped)
        return outcome, missing
    outcome.arrays = secure_aggregate(fed, groups, state, current, waves, sums, outcome)
    outcome.updated = any(r.updated for r in outcome.groups.values())
    return outcome, missing
