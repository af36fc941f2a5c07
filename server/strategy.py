"""Grouped aggregation strategy on Flower's Message API.

Sampling and message construction come from Flower's ``FedAvg``; aggregation
is ours: replies are untrusted input, checked one by one, and anything wrong
with one (an error reply, a wrong dtype or shape, NaN/Inf, an unknown key or
record, a partial DP account, a metric that is not a finite number, a count
above what the site declared when it joined or outside its enrolment, a node
that cannot be attributed to a site, or any exception while reading it)
excludes that site for the round with a reason; the round goes on. A site is
named by its node (:mod:`server.identity`), never by its own claim or its
Flower node id. Valid replies are bounded (:mod:`shared_model.robust`: each
update scaled to the round's bound, ``client-dp-clip``), sorted by site name
and folded with :func:`shared_model.aggregation.grouped_mean` under the
``aggregation`` rule and the ``max-site-share`` cap; FedAdam optionally moves
the trained groups with server-side Adam. Replies are read through
:mod:`wire.records`; :meth:`GroupedStrategy.aggregate_replies` takes typed
replies, which is what a loop without Flower's runtime calls.

Declared counts: a site's first valid reply declares its patients per group
(inside its roster range when the run folder has ``roster.yaml``,
:mod:`server.roster`); later replies may not claim more (an aggregation
weight a site could inflate at will would let it take the model), and a
smaller count is accepted and flagged. The declarations are part of the
strategy's state, checkpointed with each round and shown in the run record.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp.strategy import FedAvg

from server.identity import ReplyRejected, SiteIdentities, Unidentified
from server.roster import Roster
from shared_model.accounting import epsilon_of
from shared_model.aggregation import (
    AdamState,
    GroupResult,
    SiteUpdate,
    central_dp_mean,
    fedadam_step,
    grouped_mean,
    verify_update,
)
from shared_model.federation_config import FederationConfig
from shared_model.messages import COUNT_KEYS, SHARED, SiteTrainReply
from shared_model.robust import bound_updates
from shared_model.site_evaluation import SiteEvaluation, combine
from wire.records import read_evaluation_reply, read_train_reply

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
    bounds: dict[str, Any] | None = None
    updated: bool = False
    flags: dict[str, list[str]] = field(default_factory=dict)


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
        self.roster: Roster | None = None  # the run folder's enrolment roster
        self.adam = AdamState()
        self.client_dp_releases = 0  # rounds released under client-level DP
        # site -> patients per group it declared in its first valid reply
        self.declared: dict[str, dict[str, int]] = {}

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
        identities: SiteIdentities,
    ) -> RoundOutcome:
        """Read every reply in its own guard, then aggregate the valid ones.

        ``identities``: who each node is (:mod:`server.identity`); a reply is
        filed under its node's site, never under the name it claims.
        """
        outcome = RoundOutcome(arrays=current)
        read: list[SiteTrainReply] = []
        claimed: Counter[str] = Counter()
        keys: dict[str, bytes | None] = {}
        for i, msg in enumerate(replies):
            try:
                name = identities.identify(msg, i)
            except Unidentified as e:
                outcome.excluded.setdefault(e.key, []).append(e.reason)
                continue
            if msg.has_content():
                claimed[name] += 1
            keys[name] = identities.node_key(msg)
            try:
                got = read_train_reply(msg)
            except ValueError as e:
                outcome.excluded.setdefault(name, []).append(str(e))
                continue
            except Exception as e:  # an unforeseen malformation: never fatal
                outcome.excluded.setdefault(name, []).append(
                    f"unreadable reply ({type(e).__name__})"
                )
                continue
            read.append(dataclasses.replace(got, site=name))
        return self.aggregate_replies(
            server_round, read, current, outcome, claimed, keys
        )

    def aggregate_replies(
        self,
        server_round: int,
        replies: list[SiteTrainReply],
        current: dict[str, np.ndarray],
        outcome: RoundOutcome | None = None,
        claimed: Mapping[str, int] | None = None,
        node_keys: Mapping[str, bytes | None] | None = None,
    ) -> RoundOutcome:
        """Check typed replies (counts, declarations, enrolment, names claimed
        twice), bound them and aggregate the valid ones by group. ``claimed``:
        how many replies came from each site, readable or not (default:
        counted from ``replies``); ``node_keys``: each site's node key, for
        the roster."""
        outcome = outcome or RoundOutcome(arrays=current)
        claimed = claimed or Counter(r.site for r in replies)
        updates: list[SiteUpdate] = []
        for got in replies:
            name = got.site
            if claimed[name] > 1:
                outcome.excluded[name] = [
                    f"the site name was claimed by {claimed[name]} replies; all "
                    "are excluded"
                ]
                continue
            try:
                accepted = self._accept(
                    got, current, outcome, (node_keys or {}).get(name)
                )
            except ReplyRejected as e:
                outcome.excluded.setdefault(name, []).append(e.reason)
                continue
            except Exception as e:  # an unforeseen malformation: never fatal
                outcome.excluded.setdefault(name, []).append(
                    f"unreadable reply ({type(e).__name__})"
                )
                continue
            if accepted is not None:
                update, outcome.sites[name] = accepted
                self._declare(name, update.counts, outcome)
                updates.append(update)
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
            g: (1 if g == SHARED else self.fed.min_sites_per_expert)
            for g in self.groups
        }
        noise = self.fed.client_dp_noise_multiplier
        updates, report = bound_updates(
            current,
            updates,
            self.groups,
            multiple=self.fed.update_bound,
            fixed_clip=self.fed.client_dp_clip if noise == 0 else 0.0,
        )
        if noise > 0:
            mean, outcome.groups, dp = central_dp_mean(
                current,
                updates,
                self.groups,
                clip=self.fed.client_dp_clip,
                noise_multiplier=noise,
                rng=self._central_rng(server_round),
                min_sites=min_sites,
            )
            self.client_dp_releases += 1
            outcome.client_dp = {
                "noise_multiplier": noise,
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
                current,
                updates,
                self.groups,
                min_sites=min_sites,
                rule=self.fed.aggregation,
                max_share=self.fed.max_site_share,
                trim_fraction=self.fed.trim_fraction,
                shares_out=report.shares,
            )
        outcome.bounds = {"aggregation": self.fed.aggregation, **report.to_record()}
        for site, scaled in report.clipped.items():
            log.warning(
                "round %d: site %s's update scaled to the bound (%s)",
                server_round,
                site,
                ", ".join(f"{g} x{f:.3g}" for g, f in scaled.items()),
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

    def _accept(
        self,
        got: SiteTrainReply,
        current: dict[str, np.ndarray],
        outcome: RoundOutcome,
        node_key: bytes | None = None,
    ) -> tuple[SiteUpdate, dict[str, Any]] | None:
        """One read reply, checked: the update and its run-record entry, or
        None for a declined round (recorded in ``outcome``). Raises
        ReplyRejected when the reply is unusable."""
        if self.roster is not None:
            refused = self.roster.verify_node(got.site, node_key)
            if (
                refused is None
                and got.declined is None
                and got.site not in self.declared
            ):
                refused = self.roster.verify_counts(got.site, got.reply.counts)
            if refused is not None:
                raise ReplyRejected(refused)
        name, reply = got.site, got.reply
        if got.declined is not None:
            outcome.declined[name] = {
                "reason": got.declined,
                "privacy": None if reply.privacy is None else reply.privacy.to_dict(),
            }
            log.warning("site %s declined: %s", name, got.declined)
            return None
        arrays = dict(got.arrays)
        counts = dict(reply.counts)
        update = SiteUpdate(name, arrays, counts)
        problems = verify_update(update, current, self.groups)
        if problems:
            more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise ReplyRejected("; ".join(problems[:3]) + more)
        above = {
            g: (n, self.declared[name][g])
            for g, n in counts.items()
            if name in self.declared and n > self.declared[name].get(g, 0)
        }
        if above:
            g, (n, was) = next(iter(above.items()))
            raise ReplyRejected(
                f"claims {n} patients for `{g}`, more than the {was} it declared "
                "when it joined"
            )
        entry = {
            **{COUNT_KEYS[g]: n for g, n in counts.items()},
            "train_loss": (reply.losses or {}).get("train"),  # not sent under DP
            "seconds": reply.seconds,
            "bytes_up": int(sum(a.nbytes for a in arrays.values())),
            "privacy": None if reply.privacy is None else reply.privacy.to_dict(),
        }
        return update, entry

    def _declare(
        self, name: str, counts: Mapping[str, Any], outcome: RoundOutcome
    ) -> None:
        """Record a site's first counts; flag a later drop below them."""
        if name not in self.declared:
            self.declared[name] = {g: int(n) for g, n in counts.items()}
            log.info("site %s declared %s", name, self.declared[name])
            return
        fewer = [
            f"`{g}` {int(n)} (declared {self.declared[name][g]})"
            for g, n in counts.items()
            if int(n) < self.declared[name].get(g, 0)
        ]
        if fewer:
            outcome.flags[name] = [
                "counts below those declared when it joined: " + ", ".join(fewer)
            ]

    def aggregate_evaluation(
        self, replies: Iterable[Message], identities: SiteIdentities
    ) -> dict[str, Any]:
        """Federated validation metrics from the sites' counts and sums.

        :func:`shared_model.site_evaluation.combine`: overall (each patient scored under
        the regimen received), per regimen and per site, AUC with DeLong
        interval, Brier, calibration, two operating points (0.5 and the highest
        threshold reaching ``target-sensitivity`` on this validation set), the
        decision curve, recommendation counts and the policy value (IPW, doubly
        robust, and the model's own estimate apart). Sites are identified as in
        :meth:`aggregate_round`.
        """
        sites: dict[str, SiteEvaluation] = {}
        claimed: Counter[str] = Counter()
        withheld: set[str] = set()
        for i, msg in enumerate(replies):
            try:
                name = identities.identify(msg, i)
            except Unidentified as e:
                log.warning("evaluation: excluded %s: %s", e.key, e.reason)
                continue
            if msg.has_content():  # an error reply claims nothing
                claimed[name] += 1
            try:
                if self.roster is not None and (
                    refused := self.roster.verify_node(name, identities.node_key(msg))
                ):
                    raise ReplyRejected(refused)
                values = read_evaluation_reply(msg)
                if values is None:
                    withheld.add(name)  # a DP site that does not release its counts
                    continue
                sites[name] = SiteEvaluation.from_values(name, "validation", values)
            except ReplyRejected as e:
                log.warning("evaluation: excluded site %s: %s", name, e.reason)
            except Exception as e:  # malformed or impossible: never fatal
                log.warning("evaluation: excluded site %s: %s", name, e)
        for name, n in claimed.items():
            if n > 1 and sites.pop(name, None) is not None:
                log.warning(
                    "evaluation: excluded site %s: its name was claimed by %d replies",
                    name,
                    n,
                )
        result = combine(
            list(sites.values()), target_sensitivity=self.fed.target_sensitivity
        )
        if withheld:
            result["withheld"] = sorted(withheld)
        return result
