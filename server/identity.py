"""Who sent a reply: a site's identity comes from its node, never from its claim.

Three sources, in the order a run uses them:

* ``registration`` (deployment): the name the node's key was registered under
  (``flwr supernode register --name``), read from the SuperLink's node list
  each round. A node with no registered name is refused unless the run config
  sets ``allow-unregistered-sites``.
* ``simulation`` (``moefl simulate``): the simulation runner maps each
  simulated node to the site whose YAML its partition reads
  (:func:`simulations.simulate.simulated_node_sites`).
* ``reply`` (only with ``allow-unregistered-sites``): the name the reply gives
  itself. The first node to use a name keeps it for the rest of the run, so a
  second node claiming it is refused; this is what an insecure deployment can
  offer, and the run record says ``identified_by: reply``.

Under the first two, a reply that claims a name other than its node's is
refused. A claimed name must be a site name (:data:`SITE_NAME`), so nothing a
site says about itself reaches the run record's keys or the logs unchecked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.serverapp import Grid

from shared_model.federation_config import is_site_name
from shared_model.messages import INFO, SITE
from wire.records import claimed_site, error_text

log = logging.getLogger(__name__)

NodeSites = Callable[[Grid], dict[int, str]]
"""Maps the grid's nodes to site names (a simulation's own map)."""


class ReplyRejected(Exception):
    """One reply is unusable; ``reason`` says why (the site is excluded)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RegisteredNodes:
    """Flower node id -> the name its node was registered under, and its
    public key (PEM) where the SuperLink reports one."""

    names: Mapping[int, str] = field(default_factory=dict)
    keys: Mapping[int, bytes] = field(default_factory=dict)


def registered_nodes(grid: Grid, known: RegisteredNodes) -> RegisteredNodes:
    """The nodes' registered names and keys; no names in simulation and for
    nodes registered without one. A failure to ask keeps what was known. A
    name that is not a site name is left out (its node is then unregistered)."""
    try:
        nodes = list(grid.get_nodes())
    except Exception as e:  # the SuperLink's node list is advisory here
        log.warning("could not read the nodes' registered names: %s", e)
        return known
    return RegisteredNodes(
        {n.node_id: n.name for n in nodes if is_site_name(getattr(n, "name", ""))},
        {
            n.node_id: bytes(n.public_key)
            for n in nodes
            if isinstance(getattr(n, "public_key", None), bytes) and n.public_key
        },
    )


@dataclass
class SiteIdentities:
    """Who each node is, for the replies of one round.

    Attributes:
        names: Flower node id -> site name (registration or simulation).
        source: ``registration``, ``simulation`` or ``reply``.
        allow_claims: a node missing from ``names`` is named by its reply
            (``allow-unregistered-sites``); else its reply is refused.
        bound: site name -> the node that first used it under ``reply``
            (kept by the caller across rounds).
        keys: Flower node id -> its registered public key (PEM).
    """

    names: Mapping[int, str]
    source: str
    allow_claims: bool = False
    bound: dict[str, int] = field(default_factory=dict)
    keys: Mapping[int, bytes] = field(default_factory=dict)

    def node_key(self, msg: Any) -> bytes | None:
        """The registered public key of the node that sent ``msg``, if known."""
        return self.keys.get(msg.metadata.src_node_id)

    @classmethod
    def from_claims(cls) -> SiteIdentities:
        """Every reply named by its claim (a loop without Flower's nodes: tests
        and benchmarks that build replies themselves)."""
        return cls({}, "reply", allow_claims=True)

    def identify(self, msg: Any, position: int) -> str:
        """The site that sent ``msg``; raises :class:`Unidentified` (with the
        record key to file the refusal under) when the reply cannot be
        attributed or claims another site's name."""
        node = msg.metadata.src_node_id
        claimed = claimed_site(msg)
        named = self.names.get(node)
        if named is not None:
            if msg.has_content() and claimed != named:
                raise Unidentified(
                    named,
                    f"the node known as {named} ({self.source}) replies as "
                    f"{_shown(msg)}; it is excluded (a site's name is its node's)",
                )
            return named
        if not self.allow_claims:
            raise Unidentified(
                f"node-{node}",
                "the node has no registered name; register its key with `flwr "
                "supernode register --name SITE`, or set run config "
                "allow-unregistered-sites=true to accept the name a reply claims",
            )
        if claimed is None:
            raise Unidentified(
                f"reply-{position}",
                f"site reported an error: {error_text(msg)}"
                if msg.has_error()
                else f"the reply names no valid site ({_shown(msg)}); a site name "
                "is lower-case letters, digits and _",
            )
        owner = self.bound.setdefault(claimed, node)
        if owner != node:
            raise Unidentified(
                f"reply-{position}",
                f"claims {claimed}, a name first used by a different node in this "
                "run; it is excluded",
            )
        return claimed


class Unidentified(ReplyRejected):
    """A reply that cannot be attributed to a site; ``key`` is where the run
    record files it (the node's site, ``node-ID`` or ``reply-N``)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key


def _shown(msg: Any) -> str:
    """The name a reply claims, safe to log: its repr, cut to 40 characters."""
    if not msg.has_content():
        return "an error reply"
    try:
        info = msg.content.config_records.get(INFO)
        raw = None if info is None else info.get(SITE)
    except Exception:
        raw = None
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def round_identities(
    grid: Grid,
    *,
    allow_claims: bool,
    node_sites: NodeSites | None,
    known: RegisteredNodes,
    bound: dict[str, int],
) -> tuple[SiteIdentities, RegisteredNodes]:
    """This round's identities: the simulation's map when there is one, else
    the nodes' registered names (``known``: the last ones read, returned
    updated)."""
    if node_sites is not None:
        return SiteIdentities(
            node_sites(grid), "simulation", allow_claims, bound
        ), known
    nodes = registered_nodes(grid, known)
    source = "registration" if nodes.names or not allow_claims else "reply"
    identities = SiteIdentities(nodes.names, source, allow_claims, bound, nodes.keys)
    return identities, nodes
