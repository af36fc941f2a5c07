"""A training round by secure aggregation (run config ``secure-aggregation``):
the four message waves of :mod:`secagg.records`, and the round's new weights
from the unmasked sum.

1. Keys: every sampled node is asked for its public keys and the groups it will
   train; the sites that answer are numbered 1..n in the order of their names.
2. Shares: each gets every site's keys, its number and the threshold ``t``
   (``secagg-threshold``, else a majority, at least 2), and answers with one
   encrypted share pair per peer, relayed in wave 3.
3. Masked training: each site that sent its shares gets the round's weights and
   request, the shares addressed to it and, per group, how many of these sites
   announced training it; it answers with its masked vector.
4. Unmasking: each site whose vector arrived names, per peer, one share; with
   ``t`` of them the masks come off (:func:`secagg.masking.unmask_sum`).

Fewer than ``t`` sites at any wave and the round is skipped: the model is not
updated and nothing is unmasked. A reply that cannot be read, attributed or
matched to its wave excludes its site with the reason, as in a plain round.

From the sum the coordinator learns per group the summed (weighted) update,
the total patients and how many sites trained it; per site it holds only masked
vectors. Groups fewer than ``secagg-min-group-sites`` sites train are not in
the sum: each such site withholds its update, releases it with DP noise, or
releases it in the clear, as its YAML says (recorded per round).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from secagg.grouped import Layout, quantization_range, unpack
from secagg.masking import (
    SecAggError,
    dequantize_sum,
    majority,
    masked_size,
    quantization_bound,
    unmask_sum,
)
from secagg.records import (
    KEYS_QUERY,
    MASKED_TRAIN,
    SECAGG,
    SHARES_QUERY,
    UNMASK_QUERY,
    KeysQuery,
    KeysReply,
    MaskedQuery,
    MaskedReply,
    SharesQuery,
    UnmaskQuery,
    read_shares_reply,
    read_unmask_reply,
)
from server.identity import SiteIdentities, Unidentified
from server.roster import Roster
from server.round_entry import RoundOutcome
from shared_model.federation_config import FederationConfig
from shared_model.messages import CONFIG, SiteTrainReply
from wire.records import error_text, read_masked_reply_meta

log = logging.getLogger(__name__)


@dataclass
class Waves:
    """What one secure round gathered, wave by wave (the run record's
    ``secure_aggregation`` entry is made from it)."""

    ids: dict[str, int] = field(default_factory=dict)  # site -> its number
    nodes: dict[str, int] = field(default_factory=dict)  # site -> its node
    keys: dict[str, KeysReply] = field(default_factory=dict)
    threshold: int = 0
    shares: dict[str, dict[int, bytes]] = field(default_factory=dict)
    masked: dict[str, MaskedReply] = field(default_factory=dict)
    meta: dict[str, SiteTrainReply] = field(default_factory=dict)
    revealed: dict[int, dict[int, tuple[str, bytes]]] = field(default_factory=dict)
    bytes_up: Counter[str] = field(default_factory=Counter)
    skipped: str | None = None
    waves: int = 0

    def contributors(self, sites: list[str]) -> dict[str, int]:
        """Per group, how many of ``sites`` announced training it."""
        out: Counter[str] = Counter()
        for s in sites:
            out.update(self.keys[s].groups)
        return dict(out)


@dataclass
class SecureContext:
    """What the waves are sent with."""

    grid: Grid
    fed: FederationConfig
    rnd: int
    identities: SiteIdentities
    roster: Roster | None
    outcome: RoundOutcome


def _ask(
    ctx: SecureContext,
    waves: Waves,
    wave: str,
    messages: list[Message],
    read: Callable[[Message], Any],
) -> dict[str, Any]:
    """Send one wave; site -> what ``read`` made of its reply. The first wave
    learns each site's node; a later reply must come from that node. A site
    whose reply is an error, unreadable, or not its own is excluded for the
    round with the reason."""
    waves.waves += 1
    asked = {m.metadata.dst_node_id for m in messages}
    replies = ctx.grid.send_and_receive(messages, timeout=ctx.fed.round_timeout)
    out: dict[str, Any] = {}
    seen: Counter[str] = Counter()
    for i, msg in enumerate(replies):
        try:
            name = ctx.identities.identify(msg, i)
        except Unidentified as e:
            ctx.outcome.excluded.setdefault(e.key, []).append(f"{wave}: {e.reason}")
            continue
        seen[name] += 1
        refused = (
            None
            if ctx.roster is None
            else ctx.roster.verify_node(name, ctx.identities.node_key(msg))
        )
        if refused is not None:
            ctx.outcome.excluded.setdefault(name, []).append(f"{wave}: {refused}")
            continue
        node = msg.metadata.src_node_id
        if node not in asked or waves.nodes.setdefault(name, node) != node:
            ctx.outcome.excluded.setdefault(name, []).append(
                f"{wave}: a reply from a node this wave did not ask"
            )
            continue
        try:
            if msg.has_error():
                raise ValueError(f"site reported an error: {error_text(msg)}")
            out[name] = read(msg)
            waves.bytes_up[name] += _nbytes(msg.content)
        except Exception as e:  # untrusted input: never fatal
            reason = str(e) if isinstance(e, ValueError) else type(e).__name__
            ctx.outcome.excluded.setdefault(name, []).append(f"{wave}: {reason}")
    for name, n in seen.items():
        if n > 1:
            out.pop(name, None)
            ctx.outcome.excluded.setdefault(name, []).append(
                f"{wave}: the site name was claimed by {n} replies"
            )
    return out


def _nbytes(content: RecordDict) -> int:
    arrays = sum(
        a.numpy().nbytes for r in content.array_records.values() for a in r.values()
    )
    blobs = sum(
        len(v) if isinstance(v, bytes) else sum(len(b) for b in v)
        for r in content.config_records.values()
        for v in r.values()
        if isinstance(v, bytes)
        or (isinstance(v, list) and v and isinstance(v[0], bytes))
    )
    return int(arrays + blobs)


def _message(content: dict[str, Any], node: int, kind: str) -> Message:
    return Message(RecordDict(content), dst_node_id=node, message_type=kind)


def gather(
    ctx: SecureContext,
    train: list[Message],
    groups: Mapping[str, list[str]],
    layout: Layout,
) -> Waves:
    """The four waves; ``train``: the plain training messages (weights and
    request), one per sampled node. :attr:`Waves.skipped` says why nothing was
    unmasked."""
    waves = Waves()
    if not train:
        waves.skipped = "no site was sampled: nothing was unmasked"
        return waves
    config = {CONFIG: train[0].content.config_records[CONFIG]}
    named = [g for g, names in groups.items() if names]
    query = KeysQuery(ctx.rnd, tuple(named)).record()
    asked = [
        _message({**config, SECAGG: query}, m.metadata.dst_node_id, KEYS_QUERY)
        for m in train
    ]
    waves.keys = _ask(ctx, waves, "key exchange", asked, lambda m: _keys(m, named))
    sites = sorted(waves.keys)
    waves.ids = {s: i + 1 for i, s in enumerate(sites)}
    waves.threshold = ctx.fed.secagg_threshold or majority(len(sites))
    if not _enough(waves, sites, ctx, "key exchange"):
        return waves
    peers = {waves.ids[s]: waves.keys[s].keys for s in sites}
    asked = [
        _message(
            {
                SECAGG: SharesQuery(
                    ctx.rnd, waves.ids[s], waves.threshold, peers
                ).record()
            },
            waves.nodes[s],
            SHARES_QUERY,
        )
        for s in sites
    ]
    expected = set(peers)
    waves.shares = _ask(
        ctx, waves, "share exchange", asked, lambda m: _shares(m, expected)
    )
    by_node = {m.metadata.dst_node_id: m for m in train}
    _masked_wave(ctx, waves, {s: by_node[waves.nodes[s]] for s in sites}, layout)
    return waves


def _keys(msg: Message, groups: list[str]) -> KeysReply:
    reply = KeysReply.read(msg.content)
    if not set(reply.groups) <= set(groups):
        raise ValueError("announces a group the round does not aggregate")
    return reply


def _shares(msg: Message, expected: set[int]) -> dict[int, bytes]:
    got = read_shares_reply(msg.content)
    if set(got) != expected:
        raise ValueError("its shares are not one per site of the round")
    return got


def _enough(waves: Waves, sites: list[str], ctx: SecureContext, wave: str) -> bool:
    need = max(waves.threshold, ctx.fed.min_sites, 2)
    if len(sites) >= need and waves.threshold <= len(waves.ids):
        return True
    waves.skipped = (
        f"{len(sites)} sites after the {wave}, fewer than the {need} secure "
        "aggregation needs: nothing was unmasked"
    )
    return False


def _masked_wave(
    ctx: SecureContext, waves: Waves, train: Mapping[str, Message], layout: Layout
) -> None:
    """Waves 3 and 4: masked training and unmasking (see the module docstring)."""
    sites = sorted(waves.shares)
    if not _enough(waves, sites, ctx, "share exchange"):
        return
    ids = {s: waves.ids[s] for s in sites}
    contributors = waves.contributors(sites)
    mask_keys = {ids[s]: waves.keys[s].keys.mask_key for s in sites}
    asked = []
    for s in sites:
        query = MaskedQuery(
            ctx.rnd,
            ids[s],
            waves.threshold,
            {ids[o]: waves.shares[o][ids[s]] for o in sites},
            mask_keys,
            {g: contributors.get(g, 0) for g, _ in layout.groups},
        )
        content = {**dict(train[s].content.items()), SECAGG: query.record()}
        asked.append(_message(content, waves.nodes[s], MASKED_TRAIN))
    size = masked_size(layout.size)
    got = _ask(
        ctx,
        waves,
        "masked training",
        asked,
        lambda m: (read_masked_reply_meta(m), MaskedReply.read(m.content, size)),
    )
    waves.meta = {s: v[0] for s, v in got.items()}
    waves.masked = {s: v[1] for s, v in got.items()}
    survivors = sorted(waves.masked)
    if not _enough(waves, survivors, ctx, "masked training"):
        return
    dropped = sorted(ids[s] for s in sites if s not in waves.masked)
    query_record = UnmaskQuery(ctx.rnd, [ids[s] for s in survivors], dropped).record()
    asked = [
        _message({SECAGG: query_record}, waves.nodes[s], UNMASK_QUERY)
        for s in survivors
    ]
    revealed = _ask(
        ctx, waves, "unmasking", asked, lambda m: read_unmask_reply(m.content)
    )
    waves.revealed = {ids[s]: r for s, r in revealed.items()}


def unmasked_sums(
    fed: FederationConfig, waves: Waves, layout: Layout
) -> tuple[dict[str, Any] | None, float]:
    """The groups' sums (:func:`secagg.grouped.unpack`) and the quantization
    error bound per coordinate; None when the masks cannot come off."""
    if waves.skipped is not None:
        return None, 0.0
    r = quantization_range(
        fed.client_dp_clip, fed.secagg_max_patients, fed.client_dp_noise_multiplier
    )
    masked = {waves.ids[s]: m.vector for s, m in waves.masked.items()}
    mask_keys = {waves.ids[s]: waves.keys[s].keys.mask_key for s in waves.shares}
    try:
        total = unmask_sum(masked, waves.revealed, mask_keys, waves.threshold)
    except SecAggError as e:
        waves.skipped = str(e)
        return None, 0.0
    n = len(masked)
    return unpack(layout, dequantize_sum(total, r, n)), quantization_bound(r, n)
