"""A round's accepted updates folded into the new global weights.

The three parts the ``strategy`` run-config key names together
(:class:`shared_model.federation_config.StrategyParts`) act at different
places: the proximal term at the sites, and here the aggregation rule and the
server optimiser. In order:

1. the bounds (:func:`shared_model.robust.bound_updates`: the update bound,
   then the fixed clip ``client-dp-clip`` by
   :func:`shared_model.robust.clip_update`);
2. the aggregation rule by name (:data:`shared_model.robust.AGGREGATION_RULES`,
   weighted under the ``max-site-share`` cap), or under client-level DP the
   noised unweighted mean of the clipped updates
   (:func:`shared_model.aggregation.central_dp_mean`), one more release in its
   accounting;
3. the server optimiser: none (the aggregate is the new model) or FedAdam,
   which moves only the groups trained this round.

The strategy's state (:class:`server.run_folder.StrategyState`: FedAdam's
moments, the DP releases) is handed in and updated here; nothing else keeps
any.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from server.round_entry import RoundOutcome
from server.run_folder import StrategyState
from shared_model.accounting import epsilon_of
from shared_model.aggregation import central_dp_mean, fedadam_step, grouped_mean
from shared_model.federation_config import FederationConfig
from shared_model.messages import SHARED
from shared_model.robust import BoundReport, SiteUpdate, bound_updates

log = logging.getLogger(__name__)


def aggregate_updates(
    fed: FederationConfig,
    groups: Mapping[str, list[str]],
    state: StrategyState,
    server_round: int,
    current: dict[str, np.ndarray],
    updates: list[SiteUpdate],
    outcome: RoundOutcome,
) -> dict[str, np.ndarray]:
    """Steps 1-3 of the module docstring; fills ``outcome.groups``,
    ``outcome.bounds`` and (client-level DP) ``outcome.client_dp``."""
    parts = fed.strategy_parts
    min_sites = {g: (1 if g == SHARED else fed.min_sites_per_expert) for g in groups}
    noise = fed.client_dp_noise_multiplier
    updates, report = bound_updates(
        current,
        updates,
        groups,
        multiple=fed.update_bound,
        fixed_clip=fed.client_dp_clip if noise == 0 else 0.0,
    )
    if noise > 0:
        mean = _client_dp_mean(
            fed, groups, state, server_round, current, updates, outcome, min_sites
        )
    else:
        mean, outcome.groups = grouped_mean(
            current,
            updates,
            groups,
            min_sites=min_sites,
            rule=parts.aggregation,
            max_share=fed.max_site_share,
            trim_fraction=fed.trim_fraction,
            shares_out=report.shares,
        )
    outcome.bounds = {"aggregation": fed.aggregation, **report.to_record()}
    _log_scaled(server_round, report)
    return server_step(fed, groups, state, current, mean, outcome)


def server_step(
    fed: FederationConfig,
    groups: Mapping[str, list[str]],
    state: StrategyState,
    current: dict[str, np.ndarray],
    mean: dict[str, np.ndarray],
    outcome: RoundOutcome,
) -> dict[str, np.ndarray]:
    """Step 3: the aggregate is the new model, or FedAdam moves the groups
    ``outcome`` says were updated."""
    if fed.strategy_parts.server_optimizer != "adam":
        return mean
    moved = [n for g, res in outcome.groups.items() if res.updated for n in groups[g]]
    return fedadam_step(
        current,
        mean,
        moved,
        state.adam,
        lr=fed.server_lr,
        beta1=fed.server_beta1,
        beta2=fed.server_beta2,
        tau=fed.server_tau,
    )


def client_dp_epsilon(fed: FederationConfig, releases: int) -> dict[str, float]:
    """Client-level epsilon after ``releases`` (every site takes part in every
    round: sampling rate 1).

    ``epsilon``: a neighbouring federation replaces one site's data, while
    which sites take part stays public (they are named in the run record):
    the clipped sum moves by up to ``2 * clip``, so the accountant sees half
    the noise multiplier. ``epsilon_add_remove``: the DP-FedAvg convention
    (one site added or removed, sensitivity ``clip``), for comparison with
    other frameworks' figures.
    """
    sigma, delta = fed.client_dp_noise_multiplier, fed.client_dp_delta
    return {
        "epsilon": epsilon_of([(sigma / 2, 1.0, releases)], delta, "rdp"),
        "epsilon_add_remove": epsilon_of([(sigma, 1.0, releases)], delta, "rdp"),
    }


def central_rng(fed: FederationConfig, server_round: int) -> np.random.Generator:
    """Client-level DP noise: from the OS's entropy, unless ``dp-reproducible``
    (simulation) seeds it from the run's seed and the round."""
    if fed.dp_reproducible:
        return np.random.default_rng([fed.seed, server_round, 0xD9])
    return np.random.default_rng()


def _client_dp_mean(
    fed: FederationConfig,
    groups: Mapping[str, list[str]],
    state: StrategyState,
    server_round: int,
    current: dict[str, np.ndarray],
    updates: list[SiteUpdate],
    outcome: RoundOutcome,
    min_sites: Mapping[str, int],
) -> dict[str, np.ndarray]:
    """Client-level DP: the noised mean of the clipped updates; one more
    release (``state``), recorded in ``outcome.client_dp``."""
    mean, outcome.groups, dp = central_dp_mean(
        current,
        updates,
        groups,
        clip=fed.client_dp_clip,
        noise_multiplier=fed.client_dp_noise_multiplier,
        rng=central_rng(fed, server_round),
        min_sites=min_sites,
    )
    state.client_dp_releases += 1
    outcome.client_dp = {
        "noise_multiplier": fed.client_dp_noise_multiplier,
        "clip": fed.client_dp_clip,
        "delta": fed.client_dp_delta,
        "releases": state.client_dp_releases,
        **client_dp_epsilon(fed, state.client_dp_releases),
        "update_norms": dp.norms,
        "clipped": dp.clipped,
        "noise_std": dp.noise_std,
    }
    return mean


def _log_scaled(server_round: int, report: BoundReport) -> None:
    for site, scaled in report.clipped.items():
        log.warning(
            "round %d: site %s's update scaled to the bound (%s)",
            server_round,
            site,
            ", ".join(f"{g} x{f:.3g}" for g, f in scaled.items()),
        )
