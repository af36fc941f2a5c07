"""What the strategy's round loop (:meth:`server.strategy.GroupedStrategy.run`)
works with besides the strategy: what the rounds start from, who each node
is from round to round, and the run record's opening entries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from server.identity import (
    NodeSites,
    RegisteredNodes,
    SiteIdentities,
    round_identities,
)
from server.round_entry import learn_sites
from server.run_folder import RunFolder, StrategyState, expert_support
from shared_model.messages import RoundRequest
from shared_model.model_config import ModelConfig
from shared_model.plan import Plan


class RunStart(Protocol):
    """What the rounds start from (:class:`server.federation_start.FederationStart`
    is one): the initial weights, the request sent with every round's weights,
    and what each round's checkpoint is written with."""

    plan: Plan
    model_cfg: ModelConfig
    arrays: dict[str, np.ndarray]
    request: RoundRequest
    backbone: dict[str, Any] | None


class SiteTracker:
    """Who each node is, asked again each round (registrations can change),
    and which site each node was when it replied (to name the silent ones).

    Call it for the current :class:`server.identity.SiteIdentities`; the
    advice step after the rounds uses the same tracker.
    """

    def __init__(
        self, grid: Grid, *, allow_claims: bool, node_sites: NodeSites | None = None
    ) -> None:
        self.grid = grid
        self.allow_claims = allow_claims
        self.node_sites = node_sites
        self.known = RegisteredNodes()  # the nodes' registered names and keys
        self.bound: dict[str, int] = {}  # site -> node, where replies name their site
        self.heard: dict[int, str] = {}  # Flower node id -> site name, from replies

    def __call__(self) -> SiteIdentities:
        """Who each node is now (the registrations are read again each time)."""
        found, self.known = round_identities(
            self.grid,
            allow_claims=self.allow_claims,
            node_sites=self.node_sites,
            known=self.known,
            bound=self.bound,
        )
        return found

    def missing(
        self, sent: list[Message], replies: list[Message], identities: SiteIdentities
    ) -> list[str]:
        """The sites (else nodes) that did not reply to ``sent``."""
        return learn_sites(self.heard, sent, replies, identities.names)


def opening_record(
    planning: Mapping[str, Any] | None,
    backbone: Mapping[str, Any] | None,
    roster: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The run record before its first round: the planning step's summary,
    the pretrained backbone and the roster, where the run has them."""
    record: dict[str, Any] = {"status": "running", "rounds": []}
    if planning is not None:
        record["planning"] = dict(planning)
    if backbone is not None:
        record["backbone"] = dict(backbone)
    if roster is not None:
        record["roster"] = dict(roster)
    return record


def save_round(
    folder: RunFolder,
    rnd: int,
    arrays: dict[str, np.ndarray],
    state: StrategyState,
    start: RunStart,
    record: dict[str, Any],
) -> None:
    """Round ``rnd``'s checkpoint: weights, the strategy's state (a snapshot),
    the run record (with the declared counts and expert support), latest model."""
    record["declared_counts"] = state.declared
    record["expert_support"] = expert_support(record["rounds"])
    folder.save_round(
        rnd,
        arrays,
        state,
        record,
        start.model_cfg,
        start.plan,
        extra_config={
            "expert_support": record["expert_support"],
            **({"backbone": start.backbone} if start.backbone else {}),
        },
    )
