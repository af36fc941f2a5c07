"""A site's checks on the coordinator's secure-aggregation messages, the
messages' readers, and the YAML and run-config keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from client.data.secure_config import SecureAggregationConfig, parse_secure_aggregation
from client.node.secure_round import shares_round, unmask_round
from secagg.masking import MODULUS, SiteKeys
from secagg.records import (
    MASKED,
    RELEASED,
    SECAGG,
    VECTOR,
    MaskedReply,
    SharesQuery,
    UnmaskQuery,
    read_unmask_reply,
    unmask_reply,
)
from shared_model.errors import ConfigError
from shared_model.federation_config import FederationConfig


def _state(keys: SiteKeys, **more: Any) -> dict[str, Any]:
    return {
        "site": "alpha",
        "round": 3,
        "share-private": keys.share_private,
        "mask-private": keys.mask_private,
        "share-key": keys.public.share_key,
        "mask-key": keys.public.mask_key,
        **more,
    }


def _peers(n: int, me: SiteKeys) -> dict[int, Any]:
    return {1: me.public, **{i: SiteKeys.generate().public for i in range(2, n + 1)}}


def test_a_site_refuses_a_low_threshold_or_a_substituted_key() -> None:
    me = SiteKeys.generate()
    peers = _peers(5, me)
    with pytest.raises(ConfigError, match="majority"):
        shares_round(SharesQuery(3, 1, 2, peers), _state(me))  # 2 of 5
    forged = {**peers, 1: SiteKeys.generate().public}
    with pytest.raises(ConfigError, match="own keys"):
        shares_round(SharesQuery(3, 1, 3, forged), _state(me))
    with pytest.raises(ConfigError, match="another round"):
        shares_round(SharesQuery(4, 1, 3, peers), _state(me))
    ciphertexts, state = shares_round(SharesQuery(3, 1, 3, peers), _state(me))
    assert sorted(ciphertexts) == [1, 2, 3, 4, 5] and state["threshold"] == 3
    with pytest.raises(ConfigError, match="second share request"):
        shares_round(SharesQuery(3, 1, 3, peers), state)


def test_a_site_reveals_once_and_only_for_the_sites_it_masked_with() -> None:
    me = SiteKeys.generate()
    state = _state(
        me,
        me=1,
        threshold=2,
        sent=True,
        **{
            "masked-with": [1, 2, 3],
            "from-ids": [1, 2, 3],
            "from-seed": [b"s1", b"s2", b"s3"],
            "from-key": [b"k1", b"k2", b"k3"],
        },
    )
    with pytest.raises(ConfigError, match="partition"):
        unmask_round(UnmaskQuery(3, [1, 2], []), state)  # site 3 unaccounted for
    with pytest.raises(ConfigError, match="partition"):
        unmask_round(UnmaskQuery(3, [1], [2, 3]), state)  # below the threshold
    revealed, after = unmask_round(UnmaskQuery(3, [1, 2], [3]), state)
    assert revealed == {1: ("seed", b"s1"), 2: ("seed", b"s2"), 3: ("key", b"k3")}
    with pytest.raises(ConfigError, match="second unmasking"):
        unmask_round(UnmaskQuery(3, [1, 3], [2]), after)  # would give away site 2
    with pytest.raises(ConfigError, match="before"):
        unmask_round(UnmaskQuery(3, [1, 2], [3]), {**state, "sent": False})
    assert read_unmask_reply(RecordDict({SECAGG: unmask_reply(revealed)})) == revealed


def _masked(vector: np.ndarray, **config: Any) -> RecordDict:
    values = {
        "small-groups": [],
        "choices": [],
        "clear-groups": [],
        "clear-counts": [],
        **config,
    }
    return RecordDict(
        {
            MASKED: ArrayRecord({VECTOR: Array(vector)}),
            RELEASED: ArrayRecord({}),
            SECAGG: ConfigRecord(values),
        }
    )


def test_a_masked_reply_is_read_strictly() -> None:
    good = np.arange(8, dtype=np.uint32)
    assert MaskedReply.read(_masked(good), 8).vector.tolist() == list(range(8))
    for bad, why in (
        (good.astype(np.float64), "unsigned"),
        (good[:7], "unsigned"),
        (np.full(8, MODULUS, dtype=np.uint64), "unsigned 32-bit"),
    ):
        with pytest.raises(ValueError, match=why):
            MaskedReply.read(_masked(bad), 8)
    with pytest.raises(ValueError, match="choices"):
        MaskedReply.read(_masked(good, **{"small-groups": ["expert/nCT"]}), 8)


def test_the_site_yaml_section() -> None:
    problems: list[Any] = []
    assert parse_secure_aggregation("required", problems).required
    assert parse_secure_aggregation(None, problems) == SecureAggregationConfig()
    got = parse_secure_aggregation(
        {"mode": "optional", "small_groups": "dp", "small_group_noise": 2.0}, problems
    )
    assert got == SecureAggregationConfig(False, "dp", 2.0) and not problems
    for raw, key in (
        ("always", "secure_aggregation.mode"),
        ({"small_groups": "share"}, "secure_aggregation.small_groups"),
        ({"small_group_noise": 0}, "secure_aggregation.small_group_noise"),
        ({"colour": 1}, "secure_aggregation.colour"),
        (3, "secure_aggregation"),
    ):
        problems = []
        parse_secure_aggregation(raw, problems)
        assert problems and key in str(problems[0]), raw


def test_the_run_config_needs_a_clip_and_the_mean(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="client-dp-clip"):
        FederationConfig(secure_aggregation=True)
    with pytest.raises(ConfigError, match="aggregation"):
        FederationConfig(
            secure_aggregation=True, client_dp_clip=1.0, aggregation="median"
        )
    with pytest.raises(ConfigError, match="secagg-threshold"):
        FederationConfig(secagg_threshold=1)
    assert FederationConfig(
        secure_aggregation=True, client_dp_clip=1.0
    ).secure_aggregation
