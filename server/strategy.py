"""Grouped aggregation strategy on Flower's Message API.

Sampling and message construction come from Flower's ``FedAvg``; aggregation
is ours: replies are checked one by one (an error reply, NaN/Inf, a wrong
shape, an unknown key or a bad count excludes that site and is logged, the
round goes on), sorted by site name, and folded with
:func:`shared_model.aggregation.grouped_mean`; FedAdam optionally moves the
trained groups with server-side Adam. Sites are named by the ``site`` entry of
their reply, never by Flower node id (random per run).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp.strategy import FedAvg

from client.client_app import record_to_arrays
from shared_model.aggregation import (
    GROUP_COUNT_KEYS,
    AdamState,
    GroupResult,
    SiteUpdate,
    central_dp_mean,
    epsilon_of,
    fedadam_step,
    grouped_mean,
    verify_update,
)
from shared_model.federation_config import FederationConfig
from shared_model.site_evaluation import SiteEvaluation, combine

log = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    """What aggregation did in one round."""

    arrays: dict[str, np.ndarray]
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    groups: dict[str, GroupResult] = field(default_factory=dict)
    excluded: dict[str, list[str]] = field(default_factory=dict)
    declined: dict[str, dict[str, Any]] = field(default_factory=dict)
    client_dp: dict[str, Any] | None = None
    updated: bool = False


def _privacy_metrics(metrics: dict[str, Any]) -> dict[str, float] | None:
    """A site's DP-SGD accounting from its reply (``dp-*`` keys), if any."""
    out = {
        k[3:].replace("-", "_"): float(v)
        for k, v in metrics.items()
        if k.startswith("dp-")
    }
    return out or None


def _site_name(msg: Message, fallback: str) -> str:
    """The site's own name from its reply; error replies carry no content."""
    if not msg.has_content():
        return fallback
    info = msg.content.config_records.get("info")
    return str(info["site"]) if info is not None and "site" in info else fallback


class GroupedStrategy(FedAvg):
    """FedAvg sampling with grouped, fault-tolerant, ordered aggregation."""

    def __init__(self, fed: FederationConfig, groups: dict[str, list[str]]) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=fed.min_sites,
            min_evaluate_nodes=fed.min_sites,
            min_available_nodes=fed.min_sites,
        )
        self.fed = fed
        self.groups = groups
        self.adam = AdamState()
        self.client_dp_releases = 0  # rounds released under client-level DP

    def _central_rng(self, server_round: int) -> np.random.Generator:
        """Client-level DP noise: from the OS's entropy, unless ``dp-reproducible``
        (simulation) seeds it from the run's seed and the round."""
        if self.fed.dp_reproducible:
            return np.random.default_rng([self.fed.seed, server_round, 0xD9])
        return np.random.default_rng()

    def client_dp_epsilon(self) -> dict[str, float]:
        """Client-level epsilon after the releases so far (every site takes part
        in every round: sampling rate 1).

        ``epsilon``: a neighbouring federation replaces one site's data, while
        which sites take part stays public (they are named in the run record):
        the clipped sum moves by up to ``2 * clip``, so the accountant sees half
        the noise multiplier. ``epsilon_add_remove``: the DP-FedAvg convention
        (one site added or removed, sensitivity ``clip``), for comparison with
        other frameworks' figures.
        """
        sigma = self.fed.client_dp_noise_multiplier
        n, delta, acc = self.client_dp_releases, self.fed.client_dp_delta, "rdp"
        return {
            "epsilon": epsilon_of([(sigma / 2, 1.0, n)], delta, acc),
            "epsilon_add_remove": epsilon_of([(sigma, 1.0, n)], delta, acc),
        }

    def aggregate_round(
        self,
        server_round: int,
        replies: Iterable[Message],
        current: dict[str, np.ndarray],
    ) -> RoundOutcome:
        """Verify every reply, then aggregate the valid ones by group."""
        outcome = RoundOutcome(arrays=current)
        updates: list[SiteUpdate] = []
        for i, msg in enumerate(replies):
            name = _site_name(msg, f"node-{i}")
            if msg.has_error():
                outcome.excluded[name] = [f"site reported an error: {msg.error.reason}"]
                continue
            info = msg.content.config_records.get("info")
            if info is not None and "declined" in info:
                m = msg.content.metric_records.get("metrics")
                outcome.declined[name] = {
                    "reason": str(info["declined"]),
                    "privacy": _privacy_metrics(dict(m)) if m is not None else None,
                }
                log.warning(
                    "round %d: site %s declined: %s",
                    server_round,
                    name,
                    info["declined"],
                )
                continue
            try:
                arrays = record_to_arrays(msg.content.array_records["arrays"])
                metrics: dict[str, Any] = dict(msg.content.metric_records["metrics"])
                counts = {g: metrics[key] for g, key in GROUP_COUNT_KEYS.items()}
            except (KeyError, TypeError, ValueError) as e:
                outcome.excluded[name] = [f"malformed reply ({e!r})"]
                continue
            if name in outcome.sites:
                outcome.excluded[name] = ["a second reply under the same site name"]
                continue
            problems = verify_update(
                SiteUpdate(name, arrays, counts), current, self.groups
            )
            if problems:
                outcome.excluded[name] = problems
                continue
            updates.append(SiteUpdate(name, arrays, counts))
            loss = metrics.get("train-loss")  # not sent under DP
            outcome.sites[name] = {
                **{k: metrics[k] for k in GROUP_COUNT_KEYS.values()},
                "train_loss": None if loss is None else float(loss),
                "seconds": float(metrics.get("seconds", float("nan"))),
                "bytes_up": int(sum(a.nbytes for a in arrays.values())),
                "privacy": _privacy_metrics(metrics),
            }
        for name, problems in outcome.excluded.items():
            log.warning(
                "round %d: excluded site %s: %s",
                server_round,
                name,
                "; ".join(problems),
            )
        if len(updates) < self.fed.min_sites:
            log.warning(
                "round %d: %d valid replies, fewer than min-sites=%d; the model "
                "is not updated this round",
                server_round,
                len(updates),
                self.fed.min_sites,
            )
            return outcome
        min_sites = {
            g: (1 if g == "shared" else self.fed.min_sites_per_expert)
            for g in self.groups
        }
        if self.fed.client_dp_noise_multiplier > 0:
            mean, outcome.groups, dp = central_dp_mean(
                current,
                updates,
                self.groups,
                clip=self.fed.client_dp_clip,
                noise_multiplier=self.fed.client_dp_noise_multiplier,
                rng=self._central_rng(server_round),
                min_sites=min_sites,
            )
            self.client_dp_releases += 1
            outcome.client_dp = {
                "noise_multiplier": self.fed.client_dp_noise_multiplier,
                "clip": self.fed.client_dp_clip,
                "delta": self.fed.client_dp_delta,
                "releases": self.client_dp_releases,
                **self.client_dp_epsilon(),
                "update_norms": dp.norms,
                "clipped": dp.clipped,
                "noise_std": dp.noise_std,
            }
        else:
            mean, outcome.groups = grouped_mean(
                current, updates, self.groups, min_sites=min_sites
            )
        if self.fed.strategy == "fedadam":
            moved = [
                n
                for g, res in outcome.groups.items()
                if res.updated
                for n in self.groups[g]
            ]
            mean = fedadam_step(
                current,
                mean,
                moved,
                self.adam,
                lr=self.fed.server_lr,
                beta1=self.fed.server_beta1,
                beta2=self.fed.server_beta2,
                tau=self.fed.server_tau,
            )
        outcome.arrays = mean
        outcome.updated = True
        return outcome

    def aggregate_evaluation(self, replies: Iterable[Message]) -> dict[str, Any]:
        """Federated validation metrics from the sites' counts and sums.

        :func:`shared_model.site_evaluation.combine`: overall (each patient scored under
        the regimen received), per regimen and per site, AUC with DeLong
        interval, Brier, calibration, two operating points (0.5 and the highest
        threshold reaching ``target-sensitivity`` on this validation set), the
        decision curve, recommendation counts and the policy value (IPW, doubly
        robust, and the model's own estimate apart).
        """
        sites: dict[str, SiteEvaluation] = {}
        for i, msg in enumerate(replies):
            name = _site_name(msg, f"node-{i}")
            if msg.has_error():
                log.warning(
                    "evaluation: site %s reported an error: %s", name, msg.error.reason
                )
                continue
            if name in sites:
                log.warning("evaluation: excluded a second reply from site %s", name)
                continue
            try:
                values: dict[str, Any] = dict(msg.content["metrics"])
                sites[name] = SiteEvaluation.from_values(name, "validation", values)
            except (KeyError, TypeError, ValueError) as e:
                log.warning("evaluation: excluded site %s: %r", name, e)
        return combine(
            list(sites.values()), target_sensitivity=self.fed.target_sensitivity
        )
