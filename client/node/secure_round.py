"""A site's side of a securely aggregated round (:mod:`secagg.records` names
the four waves), as plain functions over the round's ``state``: what the site
keeps between waves (its private keys, its self-mask seed, the shares its peers
sent it), held by the ClientApp in Flower's ``context.state``.

The site distrusts the coordinator where it can check: its own keys must come
back as it advertised them, the threshold must be a majority of the round's
sites (at least 2), it masks once and reveals once per round, never both shares
of one peer, and only for the sites it masked with.

Before masking, the site clips its whole update to the run's ``client-dp-clip``
(:func:`shared_model.robust.clip_update`) and packs it
(:func:`secagg.grouped.pack`): per group the update weighted by its patients
(capped at ``secagg-max-patients``), or under distributed DP
(``client-dp-noise-multiplier`` > 0) unweighted with the site's share of the
noise. A group fewer than ``secagg-min-group-sites`` sites train goes out as
the site's YAML says (:mod:`client.data.secure_config`), never in the masked sum.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from client.data.secure_config import SecureAggregationConfig
from client.node.site_round import train_round
from client.node.site_state import load_site
from client.privacy.site_privacy import release_seed
from secagg.grouped import Layout, pack, quantization_range
from secagg.masking import (
    PublicKeys,
    SiteKeys,
    majority,
    masked_input,
    receive_shares,
    reveal_shares,
    share_secrets,
)
from secagg.records import (
    KeysQuery,
    KeysReply,
    MaskedQuery,
    MaskedReply,
    SharesQuery,
    UnmaskQuery,
)
from shared_model.errors import ConfigError
from shared_model.federation_config import FederationConfig
from shared_model.messages import SHARED, RoundRequest, SiteTrainReply
from shared_model.model import build_model
from shared_model.model_config import ModelConfig
from shared_model.parameter_groups import stage_parameter_groups
from shared_model.plan import Plan
from shared_model.robust import clip_update


def _refuse(condition: bool, why: str) -> None:
    if not condition:
        raise ConfigError(f"secure aggregation: {why}")


def keys_round(
    query: KeysQuery, request: RoundRequest, node_config: Mapping[str, Any]
) -> tuple[KeysReply, dict[str, Any]]:
    """Wave 1: fresh key pairs, and the round's groups the site will train."""
    fed = FederationConfig.from_run_config(dict(request.run_config))
    site = load_site(node_config, fed, Plan.from_dict(dict(request.plan)))
    groups = tuple(g for g in query.groups if g == SHARED or site.counts.get(g, 0) > 0)
    keys = SiteKeys.generate()
    state = {
        "site": site.config.site_name,
        "round": query.server_round,
        "share-private": keys.share_private,
        "mask-private": keys.mask_private,
        "share-key": keys.public.share_key,
        "mask-key": keys.public.mask_key,
    }
    return KeysReply(keys.public, groups), state


def _keys(state: Mapping[str, Any]) -> SiteKeys:
    return SiteKeys(
        state["share-private"],
        state["mask-private"],
        PublicKeys(state["share-key"], state["mask-key"]),
    )


def shares_round(
    query: SharesQuery, state: Mapping[str, Any]
) -> tuple[dict[int, bytes], dict[str, Any]]:
    """Wave 2: the site's self-mask seed and its shares, encrypted per peer."""
    _refuse(query.server_round == state.get("round"), "shares for another round")
    _refuse("me" not in state, "a second share request in one round")
    keys = _keys(state)
    _refuse(query.peers.get(query.me) == keys.public, "the site's own keys differ")
    n = len(query.peers)
    _refuse(
        majority(n) <= query.threshold <= n,
        f"threshold {query.threshold} for {n} sites is not a majority",
    )
    seed, ciphertexts = share_secrets(query.me, keys, query.peers, query.threshold)
    ids = sorted(query.peers)
    return ciphertexts, {
        **state,
        "me": query.me,
        "threshold": query.threshold,
        "self-seed": seed,
        "ids": ids,
        "peer-share-keys": [query.peers[i].share_key for i in ids],
        "peer-mask-keys": [query.peers[i].mask_key for i in ids],
    }


def _peers(state: Mapping[str, Any]) -> dict[int, PublicKeys]:
    return {
        i: PublicKeys(s, m)
        for i, s, m in zip(
            state["ids"], state["peer-share-keys"], state["peer-mask-keys"], strict=True
        )
    }


def masked_round(
    query: MaskedQuery,
    request: RoundRequest,
    arrays: Mapping[str, np.ndarray],
    node_config: Mapping[str, Any],
    state: Mapping[str, Any],
) -> tuple[SiteTrainReply, MaskedReply, dict[str, Any]]:
    """Wave 3: train, clip, pack, mask (see the module docstring)."""
    _refuse(
        (query.server_round, query.me, query.threshold)
        == (state.get("round"), state.get("me"), state.get("threshold")),
        "the training request does not match the round's key exchange",
    )
    _refuse(not state.get("sent"), "a second training request in one round")
    peers = _peers(state)
    _refuse(
        set(query.mask_keys) == set(query.shares)
        and query.me in query.mask_keys
        and len(query.mask_keys) >= query.threshold
        and all(
            peers.get(i, PublicKeys(b"", b"")).mask_key == k
            for i, k in query.mask_keys.items()
        ),
        "the peers to mask with are not those of the key exchange",
    )
    keys = _keys(state)
    received = receive_shares(query.me, keys, peers, query.shares)
    trained = train_round(request, arrays, node_config, secure=True)
    fed = FederationConfig.from_run_config(dict(request.run_config))
    config = load_site(node_config, fed, Plan.from_dict(dict(request.plan))).config
    vector, releases = _pack_update(
        fed, request, arrays, trained, query, config.secure_aggregation
    )
    r = fed.client_dp_noise_multiplier
    masked = masked_input(
        query.me,
        keys,
        state["self-seed"],
        query.mask_keys,
        vector,
        quantization_range(fed.client_dp_clip, fed.secagg_max_patients, r),
        rounding_seed=_site_seed(fed, trained.site, request.server_round, 1),
    )
    out = {
        **state,
        "sent": True,
        "masked-with": sorted(query.mask_keys),
        "from-ids": sorted(received),
        "from-seed": [received[i][0] for i in sorted(received)],
        "from-key": [received[i][1] for i in sorted(received)],
    }
    return trained, MaskedReply(masked, *releases), out


def _site_seed(fed: FederationConfig, site: str, rnd: int, kind: int) -> list[int]:
    return [fed.seed, zlib.crc32(site.encode()), rnd, kind]


def _noise_rng(fed: FederationConfig, site: str, rnd: int) -> np.random.Generator:
    """DP noise: OS entropy, unless ``dp-reproducible`` (simulation)."""
    return np.random.default_rng(release_seed(fed, site, rnd, 2))


def _pack_update(
    fed: FederationConfig,
    request: RoundRequest,
    arrays: Mapping[str, np.ndarray],
    trained: SiteTrainReply,
    query: MaskedQuery,
    config: SecureAggregationConfig,
) -> tuple[np.ndarray, tuple[dict[str, np.ndarray], dict[str, str], dict[str, int]]]:
    """The site's packed vector and its small-group releases."""
    stage = fed.stage_of(request.server_round)
    model = build_model(ModelConfig.from_dict(dict(request.model_config)))
    all_groups = stage_parameter_groups(model, stage)
    groups = {g: all_groups[g] for g in sorted(query.contributors)}
    counts = dict(trained.reply.counts)
    delta = {
        g: {n: np.asarray(trained.arrays[n], np.float64) - arrays[n] for n in names}
        for g, names in groups.items()
        if names and counts.get(g, 0) > 0 and trained.declined is None
    }
    clipped = clip_update(delta, fed.client_dp_clip).delta if delta else {}
    rng = _noise_rng(fed, trained.site, request.server_round)
    small = {g for g in clipped if query.contributors[g] < fed.secagg_min_group_sites}
    releases = _release_small(config, fed, clipped, small, counts, rng)
    big = {g: d for g, d in clipped.items() if g not in small}
    cap = {g: min(int(counts[g]), fed.secagg_max_patients) for g in big}
    z = fed.client_dp_noise_multiplier
    if z > 0:
        for g, d in big.items():
            share = min(query.contributors[g], query.threshold)
            std = z * fed.client_dp_clip / math.sqrt(share)
            big[g] = {n: v + rng.normal(0.0, std, v.shape) for n, v in d.items()}
    weights = dict.fromkeys(big, 1.0) if z > 0 else None
    return pack(Layout.of(arrays, groups), big, cap, weights), releases


def _release_small(
    config: SecureAggregationConfig,
    fed: FederationConfig,
    clipped: Mapping[str, Mapping[str, np.ndarray]],
    small: set[str],
    counts: Mapping[str, int],
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, int]]:
    """The small groups' releases per the site's YAML (name -> array), the
    choice applied per group, and the clear groups' weights."""
    released: dict[str, np.ndarray] = {}
    choices: dict[str, str] = {}
    clear_counts: dict[str, int] = {}
    how = config.small_groups
    for g in sorted(small):
        choices[g] = how
        if how == "withhold":
            continue
        for name, value in clipped[g].items():
            if how == "dp":
                std = config.small_group_noise * fed.client_dp_clip
                value = value + rng.normal(0.0, std, value.shape)
            released[name] = np.asarray(value, np.float32)
        if how == "clear":
            clear_counts[g] = min(int(counts[g]), fed.secagg_max_patients)
    return released, choices, clear_counts


def unmask_round(
    query: UnmaskQuery, state: Mapping[str, Any]
) -> tuple[dict[int, tuple[str, bytes]], dict[str, Any]]:
    """Wave 4: one share per peer: its self-mask seed's if its input arrived,
    its mask key's if it dropped; once per round."""
    _refuse(query.server_round == state.get("round"), "unmasking another round")
    _refuse(bool(state.get("sent")), "unmasking before the site sent its input")
    _refuse(not state.get("revealed"), "a second unmasking request in one round")
    masked_with = set(state["masked-with"])
    survivors, dropped = set(query.survivors), set(query.dropped)
    _refuse(
        state["me"] in survivors
        and survivors | dropped == masked_with
        and len(survivors) >= state["threshold"],
        "the survivors and dropped sites do not partition the round's sites, "
        "or fewer than the threshold survive",
    )
    received = {
        i: (s, k)
        for i, s, k in zip(
            state["from-ids"], state["from-seed"], state["from-key"], strict=True
        )
    }
    revealed = reveal_shares(received, sorted(survivors), sorted(dropped))
    return revealed, {**state, "revealed": True}
