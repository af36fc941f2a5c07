"""The messages of a securely aggregated round, as Flower records.

Four waves per round (:mod:`server.secure_round` sends them, the site's
ClientApp answers them in :mod:`client.node.secure_round`):

1. ``query.secagg_keys``: the coordinator names the round's groups; each site
   answers with its two public keys and the groups it will train.
2. ``query.secagg_shares``: the coordinator relays every site's public keys, the
   site's number in the round and the threshold; each site answers with its
   encrypted shares, one per peer.
3. ``train.secagg``: the round's weights and request as in a plain round, plus
   the shares addressed to this site and the groups' contributors; each site
   trains and answers with its masked vector (and, for a small group, its
   release: withheld, DP-noised or in the clear, as its YAML says).
4. ``query.secagg_unmask``: the coordinator names the sites whose masked input
   arrived and those that dropped; each site answers with one share per peer.

Readers refuse a malformed record with ValueError (server side) or the site's
caller turns it into an error code; every list is checked for length and type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from secagg.masking import MODULUS, WIRE_DTYPE, PublicKeys

SECAGG = "secagg"
"""The config record every secure-aggregation message carries."""
KEYS_QUERY = "query.secagg_keys"
SHARES_QUERY = "query.secagg_shares"
MASKED_TRAIN = "train.secagg"
UNMASK_QUERY = "query.secagg_unmask"
MASKED = "masked"
"""The array record of a masked reply: its vector under :data:`VECTOR`."""
VECTOR = "vector"
RELEASED = "released"
"""The array record of a masked reply's small-group releases (may be empty)."""
MAX_SITES = 10_000


def _ints(values: Any, key: str) -> list[int]:
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SITES
        for v in values
    ):
        raise ValueError(f"`{key}` is not a list of site numbers")
    return list(values)


def _blobs(values: Any, key: str, n: int) -> list[bytes]:
    if not isinstance(values, list) or len(values) != n:
        raise ValueError(f"`{key}` does not hold {n} entries")
    if not all(isinstance(v, bytes) and 0 < len(v) <= 4096 for v in values):
        raise ValueError(f"`{key}` is not a list of byte strings")
    return list(values)


def _words(values: Any, key: str) -> list[str]:
    if not isinstance(values, list) or not all(
        isinstance(v, str) and 0 < len(v) <= 64 for v in values
    ):
        raise ValueError(f"`{key}` is not a list of names")
    return list(values)


def _int(values: Mapping[str, Any], key: str) -> int:
    v = values.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"`{key}` is missing or not a whole number")
    return v


def _secagg(content: RecordDict) -> dict[str, Any]:
    if SECAGG not in content.config_records:
        raise ValueError(f"the message lacks its `{SECAGG}` record")
    return dict(content.config_records[SECAGG])


@dataclass(frozen=True)
class KeysQuery:
    """Wave 1, to every site: the round and the groups it aggregates."""

    server_round: int
    groups: tuple[str, ...]

    def record(self) -> ConfigRecord:
        return ConfigRecord({"round": self.server_round, "groups": list(self.groups)})

    @classmethod
    def read(cls, content: RecordDict) -> KeysQuery:
        v = _secagg(content)
        return cls(_int(v, "round"), tuple(_words(v.get("groups"), "groups")))


@dataclass(frozen=True)
class KeysReply:
    """Wave 1, from a site: its public keys and the groups it will train."""

    keys: PublicKeys
    groups: tuple[str, ...]

    def record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "share-key": self.keys.share_key,
                "mask-key": self.keys.mask_key,
                "groups": list(self.groups),
            }
        )

    @classmethod
    def read(cls, content: RecordDict) -> KeysReply:
        v = _secagg(content)
        share, mask = _blobs([v.get("share-key"), v.get("mask-key")], "keys", 2)
        return cls(PublicKeys(share, mask), tuple(_words(v.get("groups"), "groups")))


@dataclass(frozen=True)
class SharesQuery:
    """Wave 2, to one site: its number, the threshold and every site's keys."""

    server_round: int
    me: int
    threshold: int
    peers: Mapping[int, PublicKeys]

    def record(self) -> ConfigRecord:
        ids = sorted(self.peers)
        return ConfigRecord(
            {
                "round": self.server_round,
                "me": self.me,
                "threshold": self.threshold,
                "ids": ids,
                "share-keys": [self.peers[i].share_key for i in ids],
                "mask-keys": [self.peers[i].mask_key for i in ids],
            }
        )

    @classmethod
    def read(cls, content: RecordDict) -> SharesQuery:
        v = _secagg(content)
        ids = _ints(v.get("ids"), "ids")
        share = _blobs(v.get("share-keys"), "share-keys", len(ids))
        mask = _blobs(v.get("mask-keys"), "mask-keys", len(ids))
        if len(set(ids)) != len(ids):
            raise ValueError("`ids` names a site twice")
        peers = {i: PublicKeys(s, m) for i, s, m in zip(ids, share, mask, strict=True)}
        return cls(_int(v, "round"), _int(v, "me"), _int(v, "threshold"), peers)


def _pairs(blobs: Mapping[int, bytes]) -> dict[str, Any]:
    ids = sorted(blobs)
    return {"ids": ids, "blobs": [blobs[i] for i in ids]}


def _read_pairs(v: Mapping[str, Any], prefix: str = "") -> dict[int, bytes]:
    ids = _ints(v.get(prefix + "ids"), prefix + "ids")
    blobs = _blobs(v.get(prefix + "blobs"), prefix + "blobs", len(ids))
    if len(set(ids)) != len(ids):
        raise ValueError(f"`{prefix}ids` names a site twice")
    return dict(zip(ids, blobs, strict=True))


def shares_reply(ciphertexts: Mapping[int, bytes]) -> ConfigRecord:
    """Wave 2, from a site: peer -> the ciphertext of the peer's shares."""
    return ConfigRecord(_pairs(ciphertexts))


def read_shares_reply(content: RecordDict) -> dict[int, bytes]:
    return _read_pairs(_secagg(content))


@dataclass(frozen=True)
class MaskedQuery:
    """Wave 3, to one site (with the round's weights and request): the shares
    addressed to it, the mask keys of the sites it masks with, and per group
    how many sites announced training it."""

    server_round: int
    me: int
    threshold: int
    shares: Mapping[int, bytes]
    mask_keys: Mapping[int, bytes]
    contributors: Mapping[str, int]

    def record(self) -> ConfigRecord:
        masks = {f"mask-{k}": v for k, v in _pairs(self.mask_keys).items()}
        groups = sorted(self.contributors)
        return ConfigRecord(
            {
                "round": self.server_round,
                "me": self.me,
                "threshold": self.threshold,
                **_pairs(self.shares),
                **masks,
                "groups": groups,
                "contributors": [int(self.contributors[g]) for g in groups],
            }
        )

    @classmethod
    def read(cls, content: RecordDict) -> MaskedQuery:
        v = _secagg(content)
        groups = _words(v.get("groups"), "groups")
        counts = v.get("contributors")
        if not isinstance(counts, list) or len(counts) != len(groups):
            raise ValueError("`contributors` does not match `groups`")
        if not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= MAX_SITES
            for c in counts
        ):
            raise ValueError("`contributors` is not a list of site counts")
        contributors = dict(zip(groups, counts, strict=True))
        return cls(
            _int(v, "round"),
            _int(v, "me"),
            _int(v, "threshold"),
            _read_pairs(v),
            _read_pairs(v, "mask-"),
            contributors,
        )


@dataclass(frozen=True)
class MaskedReply:
    """Wave 3, from a site: its masked vector, its small-group releases (group
    -> name -> array), the choice it applied per small group, and the patient
    count of each group it released in the clear (weights)."""

    vector: np.ndarray
    released: Mapping[str, np.ndarray] = field(default_factory=dict)
    choices: Mapping[str, str] = field(default_factory=dict)
    clear_counts: Mapping[str, int] = field(default_factory=dict)

    def records(self) -> dict[str, Any]:
        groups = sorted(self.choices)
        clear = sorted(self.clear_counts)
        return {
            MASKED: ArrayRecord({VECTOR: Array(np.ascontiguousarray(self.vector))}),
            RELEASED: ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in self.released.items()}
            ),
            SECAGG: ConfigRecord(
                {
                    "small-groups": groups,
                    "choices": [self.choices[g] for g in groups],
                    "clear-groups": clear,
                    "clear-counts": [int(self.clear_counts[g]) for g in clear],
                }
            ),
        }

    @classmethod
    def read(cls, content: RecordDict, size: int) -> MaskedReply:
        """ValueError unless the vector holds ``size`` integers below the modulus."""
        if MASKED not in content.array_records or RELEASED not in content.array_records:
            raise ValueError("the masked reply lacks its vector or its releases")
        masked = content.array_records[MASKED]
        if list(masked) != [VECTOR]:
            raise ValueError("the masked record holds something besides its vector")
        vector = masked[VECTOR].numpy()
        if vector.dtype != WIRE_DTYPE or vector.shape != (size,):
            raise ValueError(
                f"the masked vector is not {size} unsigned 32-bit integers"
            )
        if vector.size and int(vector.max()) >= MODULUS:
            raise ValueError("the masked vector holds values past the modulus")
        v = _secagg(content)
        groups = _words(v.get("small-groups"), "small-groups")
        choices = _words(v.get("choices"), "choices")
        clear = _words(v.get("clear-groups"), "clear-groups")
        counts = v.get("clear-counts")
        if len(choices) != len(groups) or not isinstance(counts, list):
            raise ValueError("`choices` does not match `small-groups`")
        if len(counts) != len(clear) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts
        ):
            raise ValueError("`clear-counts` does not match `clear-groups`")
        released = {k: a.numpy() for k, a in content.array_records[RELEASED].items()}
        return cls(
            vector,
            released,
            dict(zip(groups, choices, strict=True)),
            dict(zip(clear, counts, strict=True)),
        )


@dataclass(frozen=True)
class UnmaskQuery:
    """Wave 4, to every site whose input arrived: who arrived and who dropped."""

    server_round: int
    survivors: Sequence[int]
    dropped: Sequence[int]

    def record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "round": self.server_round,
                "survivors": list(self.survivors),
                "dropped": list(self.dropped),
            }
        )

    @classmethod
    def read(cls, content: RecordDict) -> UnmaskQuery:
        v = _secagg(content)
        return cls(
            _int(v, "round"),
            _ints(v.get("survivors"), "survivors"),
            _ints(v.get("dropped") or [], "dropped"),
        )


def unmask_reply(revealed: Mapping[int, tuple[str, bytes]]) -> ConfigRecord:
    """Wave 4, from a site: per peer its self-mask (``seed``) or mask-key
    (``key``) share."""
    ids = sorted(revealed)
    return ConfigRecord(
        {
            "ids": ids,
            "kinds": [revealed[i][0] for i in ids],
            "blobs": [revealed[i][1] for i in ids],
        }
    )


def read_unmask_reply(content: RecordDict) -> dict[int, tuple[str, bytes]]:
    v = _secagg(content)
    ids = _ints(v.get("ids"), "ids")
    blobs = _blobs(v.get("blobs"), "blobs", len(ids))
    kinds = v.get("kinds")
    if (
        not isinstance(kinds, list)
        or len(kinds) != len(ids)
        or len(set(ids)) < len(ids)
    ):
        raise ValueError("`kinds` does not match `ids`, or a site is named twice")
    if not all(k in ("seed", "key") for k in kinds):
        raise ValueError("a share is neither a seed nor a key share")
    return {i: (k, b) for i, k, b in zip(ids, kinds, blobs, strict=True)}
