"""The federation's plan from its sites' fingerprints: the first step of a run
without a plan (run config ``plan``, :meth:`FederationConfig.plans_from_fingerprints`).

The server sends every node the planning query (message type
``query.fingerprint``); each site answers with its
:class:`shared_model.fingerprint.Fingerprint` (aggregate counts; noised under
a DP budget). Replies are untrusted: a malformed fingerprint, a reply from a
node that cannot be attributed to a site or naming another site than its
node's (:mod:`server.identity`), a second reply for one site and an error
reply are excluded with the reason, never fatal. The accepted ones are
merged and planned with nnU-Net's rules
(:func:`shared_model.fingerprint.plan_from_fingerprint`), within
``plan-memory-gb``. Fewer than ``min-sites`` accepted fingerprints end the run
with a ConfigError that names them.

The run folder keeps the outcome in ``plan_fingerprint.json`` (the sites, their
case counts, the exclusions, the DP accounting, the pooled histograms and the
plan) and ``plan.json``; a resumed run reuses them instead of asking again, so
a DP site's budget pays for its fingerprint once.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from server.identity import NodeSites, RegisteredNodes, Unidentified, round_identities
from shared_model.durable import json_bytes, write_atomic
from shared_model.errors import ConfigError
from shared_model.federation_config import FederationConfig
from shared_model.fingerprint import Fingerprint, plan_from_fingerprint
from shared_model.plan import Plan
from wire.records import FINGERPRINT_QUERY, fingerprint_query, read_fingerprint_reply

log = logging.getLogger(__name__)

RECORD = "plan_fingerprint.json"


def connected_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    """The connected nodes, once ``wanted`` of them are (or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            break
        log.info("planning: %d of %d nodes connected; waiting", len(nodes), wanted)
        time.sleep(1)
    return nodes


def ask_fingerprints(
    grid: Grid, fed: FederationConfig, node_sites: NodeSites | None = None
) -> tuple[dict[str, Fingerprint], dict[str, Any]]:
    """Send the planning query to every node; the accepted fingerprints by
    site, and what the record says of the others and of DP."""
    nodes = connected_nodes(grid, fed.min_sites, fed.round_timeout)
    query = fingerprint_query(fed.to_run_config())
    messages = [
        Message(query, dst_node_id=node, message_type=FINGERPRINT_QUERY)
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout))
    identities, _ = round_identities(
        grid,
        allow_claims=fed.allow_unregistered_sites,
        node_sites=node_sites,
        known=RegisteredNodes(),
        bound={},
    )
    accepted: dict[str, Fingerprint] = {}
    excluded: dict[str, str] = {}
    privacy: dict[str, dict[str, float]] = {}
    answered = set()
    for position, msg in enumerate(replies):
        node = msg.metadata.src_node_id
        answered.add(node)
        try:
            name = identities.identify(msg, position)
        except Unidentified as e:
            log.warning("planning: %s excluded: %s", e.key, e.reason)
            excluded[e.key if e.key not in excluded else f"{e.key} ({node})"] = e.reason
            continue
        try:
            reply = read_fingerprint_reply(msg)
            if name in accepted:
                raise ValueError("a second fingerprint for the same site")
            fp = Fingerprint.from_values(reply.fingerprint)
        except ValueError as e:
            log.warning("planning: %s excluded: %s", name, e)
            excluded[name if name not in excluded else f"{name} ({node})"] = str(e)
            continue
        accepted[name] = fp
        if reply.privacy:
            privacy[name] = reply.privacy.to_dict()
    missing = sorted(
        identities.names.get(n, f"node {n}") for n in nodes if n not in answered
    )
    return accepted, {
        "nodes": len(nodes),
        "excluded": excluded,
        "missing": missing,
        "identified_by": identities.source,
        "privacy": privacy,
    }


def federated_plan(
    grid: Grid, fed: FederationConfig, node_sites: NodeSites | None = None
) -> tuple[Plan, dict[str, Any]]:
    """Ask, check and plan: the plan and its record (see the module docstring)."""
    accepted, record = ask_fingerprints(grid, fed, node_sites)
    if len(accepted) < fed.min_sites or not accepted:
        raise ConfigError(
            f"planning: {len(accepted)} usable fingerprint(s) "
            f"({', '.join(sorted(accepted)) or 'none'}), min-sites is "
            f"{fed.min_sites}; {record['nodes']} node(s) connected, excluded "
            f"{record['excluded'] or 'none'}, missing {record['missing'] or 'none'}"
        )
    plan, planned = plan_record(accepted, fed.plan_memory_gb)
    return plan, {**planned, **record}


def plan_record(
    accepted: dict[str, Fingerprint], budget_gb: float
) -> tuple[Plan, dict[str, Any]]:
    """The plan of the sites' pooled fingerprints and what its record holds of
    them (sites, case counts, medians, the pooled histograms). ConfigError
    when the pooled counts are unusable (every count noised away)."""
    sites = sorted(accepted)
    pooled = accepted[sites[0]]
    for site in sites[1:]:
        pooled = pooled.merge(accepted[site])
    try:
        plan = plan_from_fingerprint(pooled, budget_gb=budget_gb)
    except ValueError as e:  # every count noised away
        hint = (
            "; the DP sites' noised counts hold too few cases to plan from: give "
            "the run a plan.json (run config `plan`), or let the sites spend more "
            "on it (`privacy.fingerprint_epsilon`)"
            if pooled.noise_std
            else ""
        )
        raise ConfigError(
            f"planning: the pooled fingerprint is unusable ({e}){hint}"
        ) from e
    return plan, {
        "sites": sites,
        "cases": {s: accepted[s].n_cases for s in sites},
        "excluded": {},
        "plan_memory_gb": budget_gb,
        "summary": pooled.summary(),
        "plan": plan.to_dict(),
        "fingerprint": pooled.to_values(),
    }


def saved_plan(run_dir: Path) -> tuple[Plan, dict[str, Any]] | None:
    """The plan a previous planning step of this run folder left, if any."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return Plan.from_dict(record["plan"], source=str(path)), record
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s is unreadable (%s); planning again", path, e)
        return None


def save_plan(plan_path: Path, plan: Plan, record: dict[str, Any]) -> None:
    """Write the planning record (:data:`RECORD`, beside it), then the plan
    (both atomically)."""
    plan_path = Path(plan_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(plan_path.with_name(RECORD), (json.dumps(record) + "\n").encode())
    write_atomic(plan_path, json_bytes(plan.to_dict()))


def run_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What the run record (metrics.json) keeps of the planning: all but the
    histograms (those are in plan_fingerprint.json)."""
    return {k: v for k, v in record.items() if k != "fingerprint"}
