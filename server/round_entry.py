"""What aggregation did in a round (:class:`RoundOutcome`), its entry in the
run record, and what the coordinator's log line and missing-site list say of
it (plain functions over the round's outcome)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared_model.aggregation import GroupResult
from shared_model.federated_metrics import format_metric
from wire.records import claimed_site


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
    secure: dict[str, Any] | None = None  # a secure round's waves and choices


def round_entry(
    rnd: int,
    stage: str,
    outcome: RoundOutcome,
    missing: list[str],
    identified_by: str,
) -> dict[str, Any]:
    """The run record's entry for one round (evaluation and time added later)."""
    entry: dict[str, Any] = {
        "round": rnd,
        "stage": stage,
        "updated": outcome.updated,
        "sites": outcome.sites,
        "excluded": outcome.excluded,
        "declined": outcome.declined,
        "missing": missing,
        # sites named by their nodes' registrations, the simulation's map of
        # its nodes, or (allow-unregistered-sites) their replies
        "identified_by": identified_by,
        "groups": {
            g: {"sites": r.sites, "n": r.n, "updated": r.updated}
            for g, r in outcome.groups.items()
        },
    }
    if outcome.client_dp is not None:
        entry["client_dp"] = outcome.client_dp
    if outcome.bounds is not None:
        entry["bounds"] = outcome.bounds
    if outcome.flags:
        entry["flags"] = outcome.flags
    if outcome.secure is not None:
        entry["secure_aggregation"] = outcome.secure
    return entry


def learn_sites(
    heard: dict[int, str],
    sent: list[Any],
    replies: list[Any],
    names: Mapping[int, str],
) -> list[str]:
    """Remember which node is which site; name the nodes that did not reply.

    Node ids are random per run, so they only map replies within this run; a
    node that did not reply is reported by its known name (``names``: the
    round's identities), else by the site its replies named, else by id.
    """
    answered = set()
    for msg in replies:
        node = msg.metadata.src_node_id
        answered.add(node)
        name = names.get(node) or claimed_site(msg)
        if name:
            heard[node] = name
    return sorted(
        names.get(
            m.metadata.dst_node_id,
            heard.get(m.metadata.dst_node_id, f"node {m.metadata.dst_node_id}"),
        )
        for m in sent
        if m.metadata.dst_node_id not in answered
    )


def privacy_line(entry: dict[str, Any]) -> str:
    """``; epsilon site 1.23/8 ...`` for the sites that trained under DP."""
    parts = [
        f"{site} {format_metric(p.get('epsilon'), 2)}/"
        f"{format_metric(p.get('target_epsilon'), 1)}"
        for site, m in sorted({**entry["sites"], **entry["declined"]}.items())
        if isinstance(m, dict) and isinstance(p := m.get("privacy"), dict)
    ]
    if entry.get("client_dp"):
        parts.append(f"client-level {format_metric(entry['client_dp'].get('epsilon'))}")
    return f"; epsilon {', '.join(parts)}" if parts else ""


def round_line(
    rnd: int, total: int, stage: str, outcome: RoundOutcome, entry: dict[str, Any]
) -> str:
    """The coordinator's log line for a finished round."""
    ev = entry.get("evaluate", {})
    return (
        f"round {rnd}/{total} ({stage}): {len(outcome.sites)} sites, excluded "
        f"{sorted(outcome.excluded) or 'none'}, declined "
        f"{sorted(outcome.declined) or 'none'}, val AUC "
        f"{format_metric(ev.get('auc'))}, Dice {format_metric(ev.get('dice'))}, "
        f"{entry['seconds']:.0f} s{privacy_line(entry)}"
    )
