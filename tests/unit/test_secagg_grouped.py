"""Grouped updates through secure aggregation: three sites, the nCT expert at
one of them, each site's update clipped, packed, masked and summed; the
coordinator's new arrays equal grouped_mean's (count-weighted mean, no share
cap) within the quantization bound, and it learns per group the number of
sites that trained it, so it can see that a one-site group is not hidden."""

from __future__ import annotations

import numpy as np

from secagg.grouped import Layout, clip_range, pack, secure_group_means, unpack
from secagg.masking import (
    QUANT_BITS,
    SiteKeys,
    dequantize_sum,
    masked_input,
    receive_shares,
    reveal_shares,
    share_secrets,
    unmask_sum,
)
from shared_model.aggregation import grouped_mean
from shared_model.robust import SiteUpdate, clip_update, deltas

GROUPS = {"shared": ["enc", "dec"], "expert/nCRT": ["e0"], "expert/nCT": ["e2"]}
BOUND = 2.0
MAX_COUNT = 100


def _world() -> tuple[dict[str, np.ndarray], list[SiteUpdate]]:
    rng = np.random.default_rng(1)
    current = {
        "enc": rng.normal(size=(4, 3)).astype(np.float32),
        "dec": rng.normal(size=5).astype(np.float32),
        "e0": rng.normal(size=3).astype(np.float32),
        "e2": rng.normal(size=3).astype(np.float32),
    }
    counts = {
        "a": {"shared": 40, "expert/nCRT": 25, "expert/nCT": 0},
        "b": {"shared": 60, "expert/nCRT": 30, "expert/nCT": 0},
        "c": {"shared": 80, "expert/nCRT": 40, "expert/nCT": 20},
    }
    updates = []
    for site, n in counts.items():
        arrays = {
            k: (v + rng.normal(scale=0.3, size=v.shape)).astype(np.float32)
            for k, v in current.items()
            if n["expert/nCT"] or k != "e2"
        }
        updates.append(SiteUpdate(site, arrays, n))
    return current, updates


def _secure_sum(vectors: dict[int, np.ndarray], clip: float) -> np.ndarray:
    ids = sorted(vectors)
    keys = {i: SiteKeys.generate() for i in ids}
    public = {i: keys[i].public for i in ids}
    sent = {i: share_secrets(i, keys[i], public, 2) for i in ids}
    received = {
        j: receive_shares(j, keys[j], public, {i: sent[i][1][j] for i in ids})
        for j in ids
    }
    mask_keys = {i: public[i].mask_key for i in ids}
    masked = {
        i: masked_input(i, keys[i], sent[i][0], mask_keys, vectors[i], clip)
        for i in ids
    }
    revealed = {j: reveal_shares(received[j], ids, []) for j in ids}
    return dequantize_sum(unmask_sum(masked, revealed, mask_keys, 2), clip, len(ids))


def test_secure_grouped_means_equal_the_plain_ones() -> None:
    current, updates = _world()
    # clipped as a site clips before masking; the plain path gets the same updates
    clipped = []
    for u in updates:
        d = clip_update(deltas(current, u, GROUPS), BOUND).delta
        arrays = {n: current[n] + d[g][n] for g in d for n in d[g]}
        clipped.append(SiteUpdate(u.site, arrays, u.counts))
    plain, info = grouped_mean(current, clipped, GROUPS)

    layout = Layout.of(current, GROUPS)
    clip = clip_range(BOUND, MAX_COUNT)
    vectors = {
        k: pack(layout, deltas(current, u, GROUPS), u.counts)
        for k, u in enumerate(clipped, start=1)
    }
    assert all(v.size == layout.size for v in vectors.values())
    assert max(np.max(np.abs(v)) for v in vectors.values()) <= clip
    sums = unpack(layout, _secure_sum(vectors, clip))
    got, trained = secure_group_means(current, sums)

    step = 2 * clip / (1 << QUANT_BITS)
    for group, names in GROUPS.items():
        total = info[group].n
        assert round(sums[group].patients) == total
        assert trained[group] == len(info[group].sites)
        for name in names:
            error = np.max(np.abs(got[name] - plain[name]))
            assert error <= len(clipped) * step / total + 1e-6  # float32 storage
    assert trained["expert/nCT"] == 1  # the coordinator sees this group is one site's


def test_a_group_below_min_sites_keeps_its_values() -> None:
    current, updates = _world()
    layout = Layout.of(current, GROUPS)
    total = sum(pack(layout, deltas(current, u, GROUPS), u.counts) for u in updates)
    got, trained = secure_group_means(current, unpack(layout, total), min_sites=2)
    assert trained["expert/nCT"] == 1
    assert np.array_equal(got["e2"], current["e2"])
    assert not np.array_equal(got["e0"], current["e0"])
