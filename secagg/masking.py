"""The arithmetic of secure aggregation (SecAgg, Bonawitz et al. 2017, over the
complete graph of a round's sites), one function per stage and side.

1. Keys: every site makes two key pairs (:class:`SiteKeys`): one to encrypt the
   shares it sends its peers, one whose agreement with each peer seeds their
   pairwise mask. The coordinator relays the public keys.
2. Shares: a site draws a self-mask seed and splits it, and its mask private key,
   into Shamir shares with threshold ``t``; each peer's pair of shares travels
   encrypted for that peer alone (:func:`share_secrets`), relayed by the
   coordinator.
3. Masked input: a site adds to its quantized vector its self mask and, for every
   peer that sent it shares, +mask or -mask of their pair (:func:`masked_input`).
   The pairwise masks cancel in the sum; the self mask hides a site whose peers'
   masks do not cancel because a peer dropped.
4. Unmasking: every site still there hands back, for each peer, the self-mask
   share if the peer's masked input arrived, else the mask-key share, never both
   (:func:`reveal_shares`); with ``t`` of them the coordinator removes the masks
   (:func:`unmask_sum`). Fewer than ``t`` and it learns nothing: the round is
   skipped.

The cryptography is the libraries': elliptic-curve key agreement and Fernet
encryption from ``flwr.supercore.primitives.asymmetric`` and
``flwr.common.secure_aggregation.crypto``, Shamir's sharing from the same, and
ChaCha20 from ``cryptography`` as the masks' generator. (Flower's own
``pseudo_rand_gen`` folds its seed to 32 bits, which a coordinator could search;
a 256-bit key to a stream cipher cannot be.)

Vectors are quantized to integers in ``[0, 2^QUANT_BITS]`` over a clipping range
``[-clip, clip]`` with Flower's stochastic rounding, in two limbs (the coarse
integer, then its rounding residual over one coarse step), and added modulo
``2^MOD_BITS`` (2^32: a coordinate's two limbs travel as two unsigned 32-bit
integers, twice a float32's bytes): up to ``2^(MOD_BITS - QUANT_BITS) - 1``
sites sum without wrapping. The error of the dequantized sum is at most ``n * 4
* clip / 2^(2 QUANT_BITS)`` per coordinate plus float64's rounding
(:func:`quantization_bound`): 48 bits, against float32's 24 bits of mantissa, so a
range fit for the worst case (a whole update on one coordinate, weighted by a
thousand patients) still leaves the sum within float32's resolution of the plain
one.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.quantization import quantize
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

QUANT_BITS = 24
"""Quantization levels ``2^QUANT_BITS`` over ``[-clip, clip]`` per limb (Flower's
stochastic rounding casts to int32, so at most 31)."""
MOD_BITS = 32
"""Sums are taken modulo ``2^MOD_BITS``: a masked coordinate travels as one
unsigned 32-bit integer per limb, and up to ``2^(MOD_BITS - QUANT_BITS) - 1``
(255) sites sum without wrapping."""
WIRE_DTYPE = np.uint32
"""The masked vector's type on the wire."""
MODULUS = 1 << MOD_BITS
LIMBS = 2
"""Each coordinate travels as two quantized integers, the second the first's
rounding residual, so the sum's error is ``2^-QUANT_BITS`` of one coarse step."""
SEED_BYTES = 32


def majority(n_sites: int) -> int:
    """The smallest threshold a site accepts for ``n_sites``: a majority, at
    least 2 (below a majority, two disjoint groups of sites could each unmask)."""
    return max(2, n_sites // 2 + 1)


class SecAggError(ValueError):
    """A stage's input breaks the protocol: the round is skipped, never unmasked."""


@dataclass(frozen=True)
class PublicKeys:
    """What a site advertises: the share-encryption key and the mask key."""

    share_key: bytes
    mask_key: bytes


@dataclass(frozen=True)
class SiteKeys:
    """A site's two key pairs for one round (private parts never leave it)."""

    share_private: bytes
    mask_private: bytes
    public: PublicKeys

    @classmethod
    def generate(cls) -> SiteKeys:
        c_sk, c_pk = generate_key_pairs()
        s_sk, s_pk = generate_key_pairs()
        return cls(
            private_key_to_bytes(c_sk),
            private_key_to_bytes(s_sk),
            PublicKeys(public_key_to_bytes(c_pk), public_key_to_bytes(s_pk)),
        )


@dataclass(frozen=True)
class SiteSecrets:
    """What a site keeps between stages 2 and 4."""

    self_seed: bytes
    received: Mapping[
        int, tuple[bytes, bytes]
    ]  # peer -> (its seed share, its key share)


def _agree(private: bytes, public: bytes) -> bytes:
    return generate_shared_key(
        bytes_to_private_key(private), bytes_to_public_key(public)
    )


def _stream(seed: bytes, size: int) -> np.ndarray:
    """``size`` pseudo-random integers modulo ``MODULUS`` (2^32) from a 32-byte
    seed, as 64-bit integers for the arithmetic."""
    key = seed[:SEED_BYTES].ljust(SEED_BYTES, b"\0")
    cipher = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    raw = cipher.update(bytes(4 * size))
    return np.frombuffer(raw, dtype=np.uint32).astype(np.uint64)


def _pair_seed(private: bytes, public: bytes) -> bytes:
    """The seed of a pair's mask (the urlsafe base64 of a 32-byte key)."""
    return base64.urlsafe_b64decode(_agree(private, public))


def _frame(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "little") + p for p in parts)


def _unframe(data: bytes) -> list[bytes]:
    parts, at = [], 0
    while at < len(data):
        n = int.from_bytes(data[at : at + 4], "little")
        parts.append(data[at + 4 : at + 4 + n])
        at += 4 + n
    return parts


def share_secrets(
    me: int,
    keys: SiteKeys,
    peers: Mapping[int, PublicKeys],
    threshold: int,
) -> tuple[bytes, dict[int, bytes]]:
    """Stage 2 at site ``me``: its self-mask seed, and for each peer (every site
    of the round, ``me`` included in ``peers``) the encrypted pair of shares.
    The site keeps its own pair (``ciphertexts[me]``) like any other."""
    ids = sorted(peers)
    if me not in peers or not 1 < threshold <= len(ids):
        raise SecAggError(
            f"threshold {threshold} for {len(ids)} sites, or site unknown"
        )
    seed = os.urandom(SEED_BYTES)
    seed_shares = create_shares(seed, threshold, len(ids))
    key_shares = create_shares(keys.mask_private, threshold, len(ids))
    out = {}
    for k, peer in enumerate(ids):
        plain = _frame(me.to_bytes(8, "little"), peer.to_bytes(8, "little"))
        plain += _frame(seed_shares[k], key_shares[k])
        out[peer] = encrypt(_agree(keys.share_private, peers[peer].share_key), plain)
    return seed, out


def receive_shares(
    me: int, keys: SiteKeys, peers: Mapping[int, PublicKeys], sent: Mapping[int, bytes]
) -> dict[int, tuple[bytes, bytes]]:
    """Stage 2 at site ``me``: the shares each peer sent it (``sent``: sender ->
    ciphertext), decrypted and checked to be from that sender for this site."""
    out = {}
    for sender, blob in sent.items():
        if sender not in peers:
            raise SecAggError(f"shares from site {sender}, not in the round")
        try:
            plain = decrypt(_agree(keys.share_private, peers[sender].share_key), blob)
        except InvalidToken as e:
            raise SecAggError(
                f"shares from site {sender} do not decrypt for this site"
            ) from e
        head, body = plain[:24], _unframe(plain[24:])
        src, dst = (int.from_bytes(p, "little") for p in _unframe(head))
        if (src, dst) != (sender, me) or len(body) != 2:
            raise SecAggError(f"shares relayed from {sender} were addressed otherwise")
        out[sender] = (body[0], body[1])
    return out


def _pairwise(
    me: int, mask_private: bytes, peers: Mapping[int, bytes], size: int
) -> np.ndarray:
    """Sum of +mask for peers above ``me`` and -mask for those below, mod M."""
    total = np.zeros(size, dtype=np.uint64)
    for peer, public in peers.items():
        if peer == me:
            continue
        mask = _stream(_pair_seed(mask_private, public), size)
        total = (total + mask) if peer > me else (total + (MODULUS - mask))
        total %= np.uint64(MODULUS)
    return total


def quantize_vector(
    vector: np.ndarray, clip: float, seed: Sequence[int] | None = None
) -> np.ndarray:
    """Flower's stochastic quantization of ``vector`` over ``[-clip, clip]``, in
    two limbs (:data:`LIMBS`): the coarse integers, then the rounding residual's
    over one coarse step; twice the length of ``vector``. It draws its
    rounding from numpy's global generator: ``seed`` (the rounding is not
    secret) makes it repeatable, and the generator's state is kept."""
    saved = np.random.get_state()
    if seed is not None:
        np.random.seed(np.random.SeedSequence(list(seed)).generate_state(4))
    try:
        v = np.asarray(vector, dtype=np.float64)
        levels, step = 1 << QUANT_BITS, 2.0 * clip / (1 << QUANT_BITS)
        coarse = quantize([v], clip, levels)[0].astype(np.int64)
        residual = v - (coarse * step - clip)
        fine = quantize([residual], step, levels)[0].astype(np.int64)
    finally:
        np.random.set_state(saved)
    return np.concatenate([coarse, fine]).astype(np.uint64)


def masked_input(
    me: int,
    keys: SiteKeys,
    self_seed: bytes,
    mask_peers: Mapping[int, bytes],
    vector: np.ndarray,
    clip: float,
    rounding_seed: Sequence[int] | None = None,
) -> np.ndarray:
    """Stage 3 at site ``me``: its quantized vector plus its self mask and the
    pairwise masks with every peer in ``mask_peers`` (peer -> public mask key;
    the sites whose shares it received)."""
    q = quantize_vector(vector, clip, rounding_seed)
    size = q.size
    out = (q + _stream(self_seed, size)) % np.uint64(MODULUS)
    out = (out + _pairwise(me, keys.mask_private, mask_peers, size)) % np.uint64(
        MODULUS
    )
    return out.astype(WIRE_DTYPE)


def reveal_shares(
    received: Mapping[int, tuple[bytes, bytes]],
    survivors: Sequence[int],
    dropped: Sequence[int],
) -> dict[int, tuple[str, bytes]]:
    """Stage 4 at a site: for each survivor its self-mask share, for each dropped
    site its mask-key share. A site named in both, or one whose shares this site
    never received, is refused: revealing both shares of one site would unmask
    its input."""
    if set(survivors) & set(dropped):
        raise SecAggError("a site cannot be both a survivor and dropped")
    out: dict[int, tuple[str, bytes]] = {}
    for peer in survivors:
        if peer not in received:
            raise SecAggError(f"no shares were received from site {peer}")
        out[peer] = ("seed", received[peer][0])
    for peer in dropped:
        if peer not in received:
            raise SecAggError(f"no shares were received from site {peer}")
        out[peer] = ("key", received[peer][1])
    return out


def unmask_sum(
    masked: Mapping[int, np.ndarray],
    revealed: Mapping[int, Mapping[int, tuple[str, bytes]]],
    mask_keys: Mapping[int, bytes],
    threshold: int,
) -> np.ndarray:
    """Stage 4 at the coordinator: the sum of the quantized vectors of the sites
    in ``masked`` (site -> its masked input). ``revealed`` is what each
    responding site handed back; ``mask_keys`` the public mask keys of every
    site that took part in stage 3's masking (survivors and dropped). Raises
    SecAggError, unmasking nothing, when fewer than ``threshold`` sites
    responded or a site's shares do not reconstruct."""
    if len(revealed) < threshold or len(masked) < threshold:
        raise SecAggError(
            f"{len(revealed)} sites revealed shares and {len(masked)} sent input; "
            f"the threshold is {threshold}: the round is skipped"
        )
    survivors = sorted(masked)
    dropped = sorted(set(mask_keys) - set(masked))
    size = next(iter(masked.values())).size
    total = np.zeros(size, dtype=np.uint64)
    for v in masked.values():
        total = (total + v.astype(np.uint64)) % np.uint64(MODULUS)
    for peer in survivors:
        seed = _combine(revealed, peer, "seed", threshold)
        total = (total + (MODULUS - _stream(seed, size))) % np.uint64(MODULUS)
    for peer in dropped:
        key = _combine(revealed, peer, "key", threshold)
        others = {s: mask_keys[s] for s in survivors}
        # the survivors' sum holds -(dropped's net pairwise mask with them)
        total = (total + _pairwise(peer, key, others, size)) % np.uint64(MODULUS)
    return total


def _combine(
    revealed: Mapping[int, Mapping[int, tuple[str, bytes]]],
    peer: int,
    kind: str,
    t: int,
) -> bytes:
    shares = [r[peer][1] for r in revealed.values() if peer in r and r[peer][0] == kind]
    if len(shares) < t:
        raise SecAggError(f"{len(shares)} {kind} shares of site {peer}; {t} needed")
    try:
        return combine_shares(shares[:t])
    except ValueError as e:
        raise SecAggError(f"the {kind} shares of site {peer} do not reconstruct") from e


def dequantize_sum(total: np.ndarray, clip: float, n_sites: int) -> np.ndarray:
    """The float sum of ``n_sites`` quantized vectors from their integer sum
    (both limbs; half the length of ``total``)."""
    d = total.size // LIMBS
    step = 2.0 * clip / (1 << QUANT_BITS)
    fine = 2.0 * step / (1 << QUANT_BITS)
    coarse_sum = total[:d].astype(np.float64) * step - n_sites * clip
    return coarse_sum + (total[d:].astype(np.float64) * fine - n_sites * step)


def quantization_bound(clip: float, n_sites: int) -> float:
    """Largest error per coordinate of the dequantized sum (for coordinates
    within ``[-clip, clip]``): one fine step per site, plus float64 rounding."""
    step = 2.0 * clip / (1 << QUANT_BITS)
    return n_sites * 2.0 * step / (1 << QUANT_BITS) + 1e-15 * n_sites * clip


def masked_size(size: int) -> int:
    """The length of a masked vector for a packed vector of ``size``."""
    return LIMBS * size
