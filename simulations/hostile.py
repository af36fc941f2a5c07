"""One hostile site among honest ones: a catalogue of what it can send, and a
grid that runs the coordinator's real loop against it.

:class:`HostileGrid` stands behind Flower's Grid interface for
:func:`server.server_app.run_federation` (in process, no Ray, no training):
three honest, deterministic sites (``alpha``, ``bravo``, ``charlie``) answer
each round with the weights they received moved by a site- and
round-specific amount, and a fourth node, registered as ``mallory``, answers
with whatever the :class:`Hostile` kind under test makes of an honest reply.
Every node is registered under its name, as in a deployment with node
authentication. Evaluation replies are counts from a fixed seed.

:data:`simulations.hostile_kinds.HOSTILE` holds the kinds: malformed records
and values, partial DP accounts, names that are not site names, impostors,
scaled updates and inflated declarations;
:mod:`simulations.hostile_run` runs one through a whole run and judges what
became of it, for ``simulations/benchmarks/hostile.py`` and the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from shared_model.federated_metrics import ScoreCounts
from shared_model.messages import COUNT_KEYS, GROUPS, SHARED, expert_group
from shared_model.policy_value import PolicySums
from shared_model.site_evaluation import SiteEvaluation

HONEST = ("alpha", "bravo", "charlie")
ATTACKER = "mallory"
EXPERTS = {"alpha": "nCRT", "bravo": "TNT", ATTACKER: "nCRT"}
"""Sites that also train an expert (the attacker shares alpha's)."""
NODES = {100: "alpha", 101: "bravo", 102: "charlie", 104: ATTACKER}


@dataclass(frozen=True)
class Node:
    """What Flower's ``grid.get_nodes()`` gives: the id and registered name."""

    node_id: int
    name: str = ""


Content = RecordDict | None
Maker = Callable[[RecordDict, int], Content]
"""Turns the attacker's honest reply content (and the round) into the
hostile one; None sends an error reply."""


@dataclass(frozen=True)
class Hostile:
    """One kind of hostile reply.

    Attributes:
        name: what it is.
        phase: ``train`` or ``evaluate``: which replies it changes.
        make: the change (:data:`Maker`).
        expect: ``excluded`` (refused with a reason), ``bounded`` (accepted,
            its influence held to the bound) or ``accepted`` (harmless, e.g.
            fewer patients than declared).
        rounds: the rounds it is sent in (None: every round; the others are
            honest).
        factor: the attacker's update (its arrays minus the weights it
            received) is multiplied by this after ``make``.
    """

    name: str
    phase: str
    make: Maker
    expect: str = "excluded"
    rounds: tuple[int, ...] | None = None
    factor: float | None = None

    def sent_in(self, rnd: int) -> bool:
        """Whether the attacker sends this kind in round ``rnd``."""
        return self.rounds is None or rnd in self.rounds


def _site_counts(site: str) -> dict[str, int]:
    index = [*HONEST, ATTACKER].index(site)
    counts = {SHARED: 10 + 5 * index}
    if site in EXPERTS:
        counts[expert_group(EXPERTS[site])] = 7 + index
    return counts


def honest_train(
    site: str, rnd: int, received: Mapping[str, np.ndarray], groups: Any
) -> RecordDict:
    """An honest site's reply: the groups it trains, moved deterministically."""
    index = [*HONEST, ATTACKER].index(site)
    counts = _site_counts(site)
    scale = np.float32(1.0 - 0.01 * (index % 3 + 1))
    shift = np.float32(0.001 * rnd * (index % 3 + 1))
    upload = {
        n: (received[n] * scale + np.sin(received[n] + shift) * shift).astype(
            np.float32
        )
        for g in counts
        for n in groups[g]
    }
    values = {COUNT_KEYS[g]: int(counts.get(g, 0)) for g in GROUPS}
    return RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in upload.items()}),
            "metrics": MetricRecord({**values, "steps": 1, "seconds": 0.0}),
            "info": ConfigRecord({"site": site}),
        }
    )


def honest_evaluation(site: str) -> RecordDict:
    """An honest site's validation counts (fixed per site)."""
    rng = np.random.default_rng(sum(map(ord, site)))
    counts = {
        r: ScoreCounts.from_scores(
            rng.random(20).tolist(), (rng.random(20) < 0.3).astype(float).tolist()
        )
        for r in ("nCRT", "TNT", "nCT")
    }
    values = SiteEvaluation(site, "validation", counts, 10.0, 20, PolicySums())
    return RecordDict(
        {
            "metrics": MetricRecord(values.to_values()),
            "info": ConfigRecord({"site": site}),
        }
    )


class HostileGrid:
    """Three honest sites and one hostile, behind Flower's Grid interface.

    ``received``: per round, the global weights each training message carried
    (the coordinator's model before the round), for the benchmark's bound
    check.
    """

    def __init__(self, groups: Mapping[str, list[str]], hostile: Hostile | None):
        self.groups = groups
        self.hostile = hostile
        self.nodes = dict(NODES)
        self.received: dict[int, dict[str, np.ndarray]] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def get_nodes(self) -> list[Node]:
        return [Node(n, s) for n, s in self.nodes.items()]

    def send_and_receive(
        self, messages: list[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return [self._answer(msg) for msg in messages]

    def _answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        site = self.nodes[node]
        rnd = msg.content.config_records["config"]["server-round"]
        assert isinstance(rnd, int)
        phase = msg.metadata.message_type
        if phase == "train":
            received = {
                k: v.numpy() for k, v in msg.content.array_records["arrays"].items()
            }
            self.received.setdefault(rnd, received)
            content = honest_train(site, rnd, received, self.groups)
        else:
            content = honest_evaluation(site)
        h = self.hostile
        if site == ATTACKER and h is not None and h.phase == phase and h.sent_in(rnd):
            made = h.make(content, rnd)
            if made is None:
                return Message(Error(code=1099, reason=ERROR_TEXT), reply_to=msg)
            content = made if h.factor is None else _scale(made, received, h.factor)
        reply = Message(content, reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = node
        return reply


ERROR_TEXT = "Traceback (most recent call last): /data/WCH_R0001.nii.gz\n" + "x" * 5000


def _scale(
    content: RecordDict, received: Mapping[str, np.ndarray], factor: float
) -> RecordDict:
    parts = records_of(content)
    with np.errstate(over="ignore"):  # 1e30 times an update overflows float32
        parts["arrays"] = {
            k: Array(
                (
                    received[k].astype(np.float64)
                    + factor * (v.numpy().astype(np.float64) - received[k])
                ).astype(np.float32)
            )
            for k, v in parts["arrays"].items()
        }
    return build_content(parts)


def records_of(content: RecordDict) -> dict[str, Any]:
    """A reply content's records as plain dicts (None where absent)."""
    return {
        "arrays": dict(content.array_records.get("arrays", {}) or {}),
        "metrics": dict(content.metric_records.get("metrics", {}) or {}),
        "info": dict(content.config_records.get("info", {}) or {}),
    }


def build_content(parts: Mapping[str, Any], **extra: Any) -> RecordDict:
    """A reply content from :func:`records_of`'s dicts (and extra records)."""
    out: dict[str, Any] = {}
    if parts.get("arrays") is not None:
        out["arrays"] = ArrayRecord(dict(parts["arrays"]))
    if parts.get("metrics") is not None:
        out["metrics"] = MetricRecord(dict(parts["metrics"]))
    if parts.get("info") is not None:
        out["info"] = ConfigRecord(dict(parts["info"]))
    return RecordDict({**out, **extra})
