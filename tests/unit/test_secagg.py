"""Secure aggregation's arithmetic: the coordinator's unmasked sum equals the
plain sum within the quantization bound, with a site dropping after the key
exchange or after sending its masked input; below the threshold nothing is
unmasked; what the coordinator receives from a site is unrelated to its vector;
a site never reveals both shares of one peer."""

from __future__ import annotations

import numpy as np
import pytest

from secagg.masking import (
    SecAggError,
    SiteKeys,
    dequantize_sum,
    masked_input,
    quantization_bound,
    receive_shares,
    reveal_shares,
    share_secrets,
    unmask_sum,
)

CLIP = 4.0


def _run(
    vectors: dict[int, np.ndarray],
    threshold: int,
    *,
    drop_before_input: set[int] = frozenset(),
    drop_before_reveal: set[int] = frozenset(),
    seen: list[np.ndarray] | None = None,
) -> np.ndarray:
    """One round among ``vectors``' sites as the coordinator relays it."""
    ids = sorted(vectors)
    keys = {i: SiteKeys.generate() for i in ids}
    public = {i: keys[i].public for i in ids}
    seeds, outbox = {}, {}
    for i in ids:  # stage 2: every site sends its encrypted shares
        seeds[i], outbox[i] = share_secrets(i, keys[i], public, threshold)
    received = {
        j: receive_shares(j, keys[j], public, {i: outbox[i][j] for i in ids})
        for j in ids
    }
    mask_keys = {i: public[i].mask_key for i in ids}
    masked = {}
    for i in ids:  # stage 3
        if i in drop_before_input:
            continue
        masked[i] = masked_input(i, keys[i], seeds[i], mask_keys, vectors[i], CLIP)
        if seen is not None:
            seen.append(masked[i])
    survivors = sorted(masked)
    dropped = sorted(set(ids) - set(masked))
    revealed = {  # stage 4
        j: reveal_shares(received[j], survivors, dropped)
        for j in survivors
        if j not in drop_before_reveal
    }
    total = unmask_sum(masked, revealed, mask_keys, threshold)
    return dequantize_sum(total, CLIP, len(masked))


@pytest.fixture()
def vectors() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {i: rng.uniform(-3, 3, size=50) for i in (11, 12, 13, 14)}


def test_the_unmasked_sum_is_the_plain_sum(vectors: dict[int, np.ndarray]) -> None:
    got = _run(vectors, threshold=3)
    plain = sum(vectors.values())
    assert np.max(np.abs(got - plain)) <= quantization_bound(CLIP, 4)
    assert quantization_bound(CLIP, 4) / np.max(np.abs(plain)) < 1e-6


def test_a_site_dropping_after_the_key_exchange(vectors: dict[int, np.ndarray]) -> None:
    got = _run(vectors, threshold=3, drop_before_input={12})
    plain = vectors[11] + vectors[13] + vectors[14]
    assert np.max(np.abs(got - plain)) <= quantization_bound(CLIP, 3)


def test_a_site_dropping_after_its_masked_input(vectors: dict[int, np.ndarray]) -> None:
    got = _run(vectors, threshold=3, drop_before_reveal={14})
    plain = sum(vectors.values())
    assert np.max(np.abs(got - plain)) <= quantization_bound(CLIP, 4)


def test_below_the_threshold_nothing_is_unmasked(
    vectors: dict[int, np.ndarray],
) -> None:
    with pytest.raises(SecAggError, match="threshold"):
        _run(vectors, threshold=3, drop_before_input={12}, drop_before_reveal={13})


def test_what_the_coordinator_receives_is_unrelated_to_the_vector(
    vectors: dict[int, np.ndarray],
) -> None:
    seen: list[np.ndarray] = []
    _run(vectors, threshold=3, seen=seen)
    for masked, vector in zip(seen, (vectors[i] for i in sorted(vectors)), strict=True):
        assert masked.size == 2 * vector.size  # two limbs
        for half in (masked[: vector.size], masked[vector.size :]):
            values = half.astype(np.float64)
            assert not np.allclose(values, vector)
            assert abs(np.corrcoef(values, vector)[0, 1]) < 0.5  # 50 values: |r| ~ 0.14


def test_a_site_never_reveals_both_shares_of_a_peer() -> None:
    received = {1: (b"seed-share", b"key-share"), 2: (b"s", b"k")}
    with pytest.raises(SecAggError, match="both"):
        reveal_shares(received, survivors=[1, 2], dropped=[2])
    with pytest.raises(SecAggError, match="no shares"):
        reveal_shares(received, survivors=[1, 3], dropped=[])
    assert reveal_shares(received, [1], [2]) == {
        1: ("seed", b"seed-share"),
        2: ("key", b"k"),
    }


def test_shares_relayed_to_the_wrong_site_are_refused() -> None:
    keys = {i: SiteKeys.generate() for i in (1, 2, 3)}
    public = {i: k.public for i, k in keys.items()}
    _, outbox = share_secrets(1, keys[1], public, 2)
    with pytest.raises(SecAggError, match="do not decrypt"):
        receive_shares(3, keys[3], public, {1: outbox[2]})


def test_a_site_own_shares_reflected_back_are_refused() -> None:
    """The pair's key is the same both ways: a coordinator handing site 3 its own
    shares for site 1 as if site 1 sent them is caught by the address inside."""
    keys = {i: SiteKeys.generate() for i in (1, 2, 3)}
    public = {i: k.public for i, k in keys.items()}
    _, from_three = share_secrets(3, keys[3], public, 2)
    with pytest.raises(SecAggError, match="addressed otherwise"):
        receive_shares(3, keys[3], public, {1: from_three[1]})
