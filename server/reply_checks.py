"""Replies are untrusted input: each is read and checked on its own, and
anything wrong with one excludes its site for the round with a reason.

Plain functions over what the strategy passes in (its groups, its sites'
declared counts, the roster): :class:`server.strategy.GroupedStrategy` calls
them for every training and evaluation reply.

Declared counts: a site's first valid reply declares its patients per group
(inside its roster range when the run folder has ``roster.yaml``,
:mod:`server.roster`); later replies may not claim more (an aggregation
weight a site could inflate at will would let it take the model), and a
smaller count is accepted and flagged.
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

from server.identity import ReplyRejected, SiteIdentities, Unidentified
from server.roster import Roster
from server.round_entry import RoundOutcome
from shared_model.aggregation import verify_update
from shared_model.messages import COUNT_KEYS, SiteTrainReply
from shared_model.robust import SiteUpdate
from shared_model.site_evaluation import SiteEvaluation
from wire.records import read_evaluation_reply, read_train_reply

log = logging.getLogger(__name__)


@dataclass
class ReadReplies:
    """A round's training replies, read: the typed replies, how many replies
    named each site (readable or not), and each site's node key."""

    replies: list[SiteTrainReply] = field(default_factory=list)
    claimed: Counter[str] = field(default_factory=Counter)
    node_keys: dict[str, bytes | None] = field(default_factory=dict)


def read_train_replies(
    replies: Iterable[Message], identities: SiteIdentities, outcome: RoundOutcome
) -> ReadReplies:
    """Read every reply in its own guard; the unreadable or unattributable
    ones are excluded in ``outcome``. A reply is filed under its node's site,
    never under the name it claims."""
    read = ReadReplies()
    for i, msg in enumerate(replies):
        try:
            name = identities.identify(msg, i)
        except Unidentified as e:
            outcome.excluded.setdefault(e.key, []).append(e.reason)
            continue
        if msg.has_content():
            read.claimed[name] += 1
        read.node_keys[name] = identities.node_key(msg)
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
        read.replies.append(dataclasses.replace(got, site=name))
    return read


@dataclass(frozen=True)
class ReplyContext:
    """What a reply is checked against: the round's global arrays and groups,
    the sites' declared counts and the run's roster (None: no roster)."""

    current: Mapping[str, np.ndarray]
    groups: Mapping[str, list[str]]
    declared: Mapping[str, Mapping[str, int]]
    roster: Roster | None = None


def accept_reply(
    got: SiteTrainReply,
    context: ReplyContext,
    outcome: RoundOutcome,
    node_key: bytes | None = None,
) -> tuple[SiteUpdate, dict[str, Any]] | None:
    """One read reply, checked: the update and its run-record entry, or None
    for a declined round (recorded in ``outcome``). Raises ReplyRejected when
    the reply is unusable."""
    declared = context.declared
    if context.roster is not None:
        refused = context.roster.verify_node(got.site, node_key)
        if refused is None and got.declined is None and got.site not in declared:
            refused = context.roster.verify_counts(got.site, got.reply.counts)
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
    problems = verify_update(update, context.current, context.groups)
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ReplyRejected("; ".join(problems[:3]) + more)
    above = {
        g: (n, declared[name].get(g, 0))
        for g, n in counts.items()
        if name in declared and n > declared[name].get(g, 0)
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


def declare(
    declared: dict[str, dict[str, int]],
    name: str,
    counts: Mapping[str, Any],
    outcome: RoundOutcome,
) -> None:
    """Record a site's first counts in ``declared``; flag a later drop below
    them in ``outcome``."""
    if name not in declared:
        declared[name] = {g: int(n) for g, n in counts.items()}
        log.info("site %s declared %s", name, declared[name])
        return
    fewer = [
        f"`{g}` {int(n)} (declared {declared[name][g]})"
        for g, n in counts.items()
        if int(n) < declared[name].get(g, 0)
    ]
    if fewer:
        outcome.flags[name] = [
            "counts below those declared when it joined: " + ", ".join(fewer)
        ]


def read_evaluation_replies(
    replies: Iterable[Message], identities: SiteIdentities, roster: Roster | None
) -> tuple[dict[str, SiteEvaluation], set[str]]:
    """Each site's evaluation counts, and the DP sites that withheld theirs;
    a reply that cannot be attributed, is refused by the roster, is malformed,
    or names a site another reply also named is left out with a warning."""
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
            if roster is not None and (
                refused := roster.verify_node(name, identities.node_key(msg))
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
    return sites, withheld
