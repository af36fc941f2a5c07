"""Grouped aggregation strategy on Flower's Message API; it runs the rounds.

Sampling and message construction come from Flower's ``FedAvg``; aggregation
is ours: replies are untrusted input, checked one by one
(:mod:`server.reply_checks`), and anything wrong with one (an error reply, a
wrong dtype or shape, NaN/Inf, an unknown key or record, a partial DP
account, a metric that is not a finite number, a count above what the site
declared or outside its enrolment, a node that cannot be attributed to a
site, or any exception while reading it) excludes that site for the round
with a reason; the round goes on. A site is named by its node
(:mod:`server.identity`), never by its own claim or its Flower node id.

The ``strategy`` run-config key names three parts
(:class:`shared_model.federation_config.StrategyParts`): the sites' proximal
term, the server optimiser, and the aggregation rule. A round's valid replies
are bounded (:mod:`shared_model.robust`), sorted by site name and folded by
group under the aggregation rule (:data:`shared_model.robust.AGGREGATION_RULES`,
with the ``max-site-share`` cap), or, under client-level DP, by the noised mean
of the clipped updates; FedAdam then moves the trained groups. With
``secure-aggregation`` a training round is the four waves of
:mod:`server.secure_round` and the coordinator sees only sums
(:mod:`server.secure_aggregation`). :meth:`GroupedStrategy.aggregate_replies`
takes typed replies, which is what a loop without Flower's runtime calls.

:meth:`GroupedStrategy.run` is the round loop: it resumes from the run
folder's last complete round (:class:`server.run_folder.StrategyState`: the
round, FedAdam's moments, the declared counts, the client-level DP releases)
or starts afresh, and writes every round's weights, state and record through
:class:`server.run_folder.RunFolder`. No code outside this class changes its
state; :attr:`GroupedStrategy.declared`, :attr:`GroupedStrategy.groups` and
:meth:`GroupedStrategy.snapshot` read it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server.identity import ReplyRejected, SiteIdentities
from server.reply_checks import (
    ReplyContext,
    accept_reply,
    declare,
    read_evaluation_replies,
    read_train_replies,
)
from server.roster import Roster
from server.round_aggregation import aggregate_updates, client_dp_epsilon
from server.round_entry import RoundOutcome, round_entry, round_line
from server.round_loop import RunStart, SiteTracker, save_round
from server.run_folder import RunFolder, StrategyState, expert_support
from server.secure_aggregation import secure_train_round
from server.secure_round import SecureContext
from shared_model.federation_config import FederationConfig
from shared_model.messages import SiteTrainReply
from shared_model.policy import supported_regimens
from shared_model.robust import SiteUpdate
from shared_model.site_evaluation import combine
from wire.records import arrays_to_record, request_record

log = logging.getLogger(__name__)


class GroupedStrategy(FedAvg):
    """FedAvg sampling with grouped, fault-tolerant, ordered aggregation, and
    the round loop (:meth:`run`).

    ``stages``: what each stage of the run aggregates (stage -> group ->
    parameter names); a round of stage ``s`` aggregates ``stages[s]``.
    ``groups`` is what a strategy without stages aggregates. ``roster``: the
    run folder's enrolment roster, if any.
    """

    def __init__(
        self,
        fed: FederationConfig,
        groups: dict[str, list[str]],
        *,
        stages: Mapping[str, dict[str, list[str]]] | None = None,
        roster: Roster | None = None,
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=fed.min_sites,
            min_evaluate_nodes=fed.min_sites,
            min_available_nodes=fed.min_sites,
        )
        self.fed = fed
        self.roster = roster
        self._groups = groups
        self._stages = dict(stages or {})
        self._state = StrategyState()

    # -- state ---------------------------------------------------------------

    @property
    def groups(self) -> Mapping[str, list[str]]:
        """What the current round aggregates (group -> parameter names)."""
        return self._groups

    @property
    def declared(self) -> Mapping[str, Mapping[str, int]]:
        """Site -> the patients per group it declared in its first valid reply."""
        return self._state.declared

    @property
    def completed_round(self) -> int:
        """The last round aggregated (or restored); 0 before any."""
        return self._state.round

    def snapshot(self) -> StrategyState:
        """The state a resumed run needs (what :meth:`restore` takes), apart
        from the strategy's own (arrays are shared: they are never changed in
        place)."""
        return self._state.copy()

    def restore(self, state: StrategyState) -> None:
        """Continue from ``state`` (a checkpoint's, on a resume)."""
        self._state = state.copy()

    def use_stage(self, stage: str) -> None:
        """Aggregate the groups of ``stage`` from now on."""
        self._groups = self._stages[stage]

    # -- the round loop ------------------------------------------------------

    def run(
        self,
        grid: Grid,
        start: RunStart,
        arrays: dict[str, np.ndarray],
        folder: RunFolder,
        record: dict[str, Any],
        sites: SiteTracker,
    ) -> dict[str, np.ndarray]:
        """The rounds after :attr:`completed_round`, from ``arrays`` (what
        :meth:`resume` gave), under the run folder's lock; returns the final
        weights. Each round's entry goes into ``record`` (the run record),
        written with the round's checkpoint."""
        config = request_record(start.request)
        for rnd in range(self.completed_round + 1, self.fed.total_rounds + 1):
            t0 = time.perf_counter()
            stage = self.fed.stage_of(rnd)
            self.use_stage(stage)
            outcome, entry, identities = self.train_round(
                grid, rnd, arrays, config, sites
            )
            arrays = outcome.arrays
            self._state.round = rnd
            if self.fed.evaluate_every and rnd % self.fed.evaluate_every == 0:
                so_far = [*record["rounds"], entry]
                entry["evaluate"] = self.evaluate_round(
                    grid, start, rnd, arrays, so_far, identities
                )
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            record["rounds"].append(entry)
            save_round(folder, rnd, arrays, self.snapshot(), start, record)
            log.info(round_line(rnd, self.fed.total_rounds, stage, outcome, entry))
        return arrays

    def resume(
        self,
        initial: dict[str, np.ndarray],
        folder: RunFolder,
        record: dict[str, Any],
    ) -> dict[str, np.ndarray]:
        """The weights to start from. With ``resume``, the folder's last
        complete round's (its state restored, its rounds put back in
        ``record``; a run config changed beyond what a resume may change is
        refused): the run continues as if it had never stopped. Otherwise
        ``initial``, from round 1. The run config is stored in the folder."""
        resumed = folder.last_complete() if self.fed.resume else None
        if resumed is None:
            folder.check_run_config(self.fed.to_run_config(), allow_changes=True)
            self.restore(StrategyState())
            return initial
        folder.check_run_config(
            self.fed.to_run_config(), allow_changes=self.fed.resume_changed_config
        )
        self.restore(dataclasses.replace(resumed.state, round=resumed.round))
        record["rounds"] = resumed.rounds
        record["declared_counts"] = self._state.declared
        record["expert_support"] = expert_support(record["rounds"])
        log.info("resuming %s after round %d", folder.path, resumed.round)
        return resumed.arrays

    def train_round(
        self,
        grid: Grid,
        rnd: int,
        arrays: dict[str, np.ndarray],
        config: ConfigRecord,
        sites: SiteTracker,
    ) -> tuple[RoundOutcome, dict[str, Any], SiteIdentities]:
        """One training round over the current stage's groups: send the
        weights, aggregate the replies; the outcome, its record entry and who
        each node was."""
        messages = list(
            self.configure_train(rnd, arrays_to_record(arrays), config, grid)
        )
        if self.fed.secure_aggregation:
            identities = sites()
            ctx = SecureContext(
                grid, self.fed, rnd, identities, self.roster, RoundOutcome(arrays)
            )
            outcome, missing = secure_train_round(
                self.fed, self._groups, self._state, ctx, arrays, messages
            )
        else:
            replies = list(
                grid.send_and_receive(messages, timeout=self.fed.round_timeout)
            )
            identities = sites()
            missing = sites.missing(messages, replies, identities)
            outcome = self.aggregate_round(rnd, replies, arrays, identities)
        if missing:
            log.warning(
                "round %d: no reply within %.0f s from %s",
                rnd,
                self.fed.round_timeout,
                ", ".join(missing),
            )
        bytes_down = int(sum(a.nbytes for a in arrays.values()))
        for site in outcome.sites.values():
            site["bytes_down"] = bytes_down
        stage = self.fed.stage_of(rnd)
        entry = round_entry(rnd, stage, outcome, missing, identities.source)
        return outcome, entry, identities

    def evaluate_round(
        self,
        grid: Grid,
        start: RunStart,
        rnd: int,
        arrays: dict[str, np.ndarray],
        rounds: list[dict[str, Any]],
        identities: SiteIdentities,
    ) -> dict[str, Any]:
        """Federated evaluation of ``arrays``: advice may name only the
        regimens whose experts have enough support over ``rounds``."""
        support = expert_support(rounds)
        allowed, _ = supported_regimens(support, self.fed.min_expert_support)
        config = request_record(
            dataclasses.replace(start.request, allowed_regimens=allowed)
        )
        messages = self.configure_evaluate(rnd, arrays_to_record(arrays), config, grid)
        replies = grid.send_and_receive(messages, timeout=self.fed.round_timeout)
        return self.aggregate_evaluation(replies, identities)

    # -- aggregation ---------------------------------------------------------

    def client_dp_epsilon(self) -> dict[str, float]:
        """Client-level epsilon after the releases so far
        (:func:`server.round_aggregation.client_dp_epsilon`)."""
        return client_dp_epsilon(self.fed, self._state.client_dp_releases)

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
        read = read_train_replies(replies, identities, outcome)
        return self.aggregate_replies(
            server_round, read.replies, current, outcome, read.claimed, read.node_keys
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
        updates = self._accepted(replies, current, outcome, claimed, node_keys)
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
        outcome.arrays = aggregate_updates(
            self.fed, self._groups, self._state, server_round, current, updates, outcome
        )
        outcome.updated = True
        return outcome

    def _accepted(
        self,
        replies: list[SiteTrainReply],
        current: dict[str, np.ndarray],
        outcome: RoundOutcome,
        claimed: Mapping[str, int] | None,
        node_keys: Mapping[str, bytes | None] | None,
    ) -> list[SiteUpdate]:
        """The usable updates of ``replies``; each site's first one declares
        its counts. The others are excluded (or declined) in ``outcome``."""
        claimed = claimed or Counter(r.site for r in replies)
        context = ReplyContext(current, self._groups, self._state.declared, self.roster)
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
                accepted = accept_reply(
                    got, context, outcome, (node_keys or {}).get(name)
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
                declare(self._state.declared, name, update.counts, outcome)
                updates.append(update)
        return updates

    def aggregate_evaluation(
        self, replies: Iterable[Message], identities: SiteIdentities
    ) -> dict[str, Any]:
        """Federated validation metrics from the sites' counts and sums.

        :func:`shared_model.site_evaluation.combine`: overall (each patient
        scored under the regimen received), per regimen and per site, AUC with
        DeLong interval, Brier, calibration, two operating points (0.5 and the
        highest threshold reaching ``target-sensitivity`` on this validation
        set), the decision curve, recommendation counts and the policy value
        (IPW, doubly robust, and the model's own estimate apart). Sites are
        identified as in :meth:`aggregate_round`.
        """
        sites, withheld = read_evaluation_replies(replies, identities, self.roster)
        result = combine(
            list(sites.values()), target_sensitivity=self.fed.target_sensitivity
        )
        if withheld:
            result["withheld"] = sorted(withheld)
        return result
