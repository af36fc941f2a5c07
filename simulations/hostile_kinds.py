"""The catalogue of hostile replies (:data:`HOSTILE`): what one site can send,
each kind a :class:`simulations.hostile.Hostile` that turns an honest reply
into a hostile one, with what it should come to (excluded, bounded or
accepted)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from simulations.hostile import Hostile, Maker, build_content, records_of


def metrics(**change: Any) -> Maker:
    """The honest reply with metric values changed (None removes a key)."""

    def make(content: RecordDict, rnd: int) -> RecordDict:
        parts = records_of(content)
        for k, v in change.items():
            key = k.replace("_", "-")
            if v is None:
                parts["metrics"].pop(key, None)
            else:
                parts["metrics"][key] = v
        return build_content(parts)

    return make


def info(**change: Any) -> Maker:
    """The honest reply with info entries changed."""

    def make(content: RecordDict, rnd: int) -> RecordDict:
        parts = records_of(content)
        parts["info"].update(change)
        return build_content(parts)

    return make


def arrays(fn: Callable[[np.ndarray], Any], only: str | None = None) -> Maker:
    """The honest reply with every array (or only ``only``) replaced by
    ``fn(array)``."""

    def make(content: RecordDict, rnd: int) -> RecordDict:
        parts = records_of(content)
        parts["arrays"] = {
            k: Array(np.asarray(fn(v.numpy()))) if only in (None, k) else v
            for k, v in parts["arrays"].items()
        }
        return build_content(parts)

    return make


def _unchanged(content: RecordDict, rnd: int) -> RecordDict:
    return content


def drop(record: str) -> Maker:
    def make(content: RecordDict, rnd: int) -> RecordDict:
        parts = records_of(content)
        parts[record] = None
        return build_content(parts)

    return make


def extra(kind: str) -> Maker:
    """The honest reply with a record Flower allows but ours never has."""

    def make(content: RecordDict, rnd: int) -> RecordDict:
        parts = records_of(content)
        if kind == "arrays":
            return build_content(parts, more=ArrayRecord({"x": Array(np.zeros(2))}))
        if kind == "config":
            return build_content(parts, more=ConfigRecord({"x": 1}))
        return build_content(parts, more=MetricRecord({"x": 1.0}))

    return make


def declined(reason: Any, **dp: Any) -> Maker:
    """A declined round (no arrays) with a DP account of ``dp``."""

    def make(content: RecordDict, rnd: int) -> RecordDict:
        parts = records_of(content)
        parts["arrays"] = None
        parts["info"]["declined"] = reason
        for k, v in dp.items():
            parts["metrics"][k.replace("_", "-")] = v
        return build_content(parts)

    return make


def evaluation(**change: Any) -> Maker:
    return metrics(**change)


DP = {"dp_epsilon": 1.0, "dp_target_epsilon": 8.0, "dp_delta": 1e-5}
"""A complete DP account (the keys every DP reply carries)."""


def _impostor_of(name: str, **counts: int) -> Maker:
    def make(content: RecordDict, rnd: int) -> RecordDict:
        parts = records_of(content)
        parts["info"]["site"] = name
        parts["metrics"].update({k.replace("_", "-"): v for k, v in counts.items()})
        return build_content(parts)

    return make


def scaled_kind(factor: float) -> Hostile:
    """The attacker's honest update, scaled by ``factor``, every round."""
    return Hostile(
        f"update scaled {factor:g}x", "train", _unchanged, "bounded", factor=factor
    )


def _kinds() -> list[Hostile]:
    return [
        *_malformed_reply_kinds(),
        *_account_and_identity_kinds(),
        *_influence_kinds(),
        *_evaluation_kinds(),
    ]


def _malformed_reply_kinds() -> list[Hostile]:
    """Training replies malformed in their records, arrays, counts or metrics."""
    t = "train"
    nan, inf = float("nan"), float("inf")
    return [
        Hostile("error reply carrying a traceback", t, lambda c, r: None),
        Hostile("empty content", t, lambda c, r: RecordDict({})),
        Hostile("string arrays", t, arrays(lambda v: np.full(v.shape, "x"))),
        Hostile("float64 arrays", t, arrays(lambda v: v.astype(np.float64))),
        Hostile("complex arrays", t, arrays(lambda v: v.astype(np.complex64))),
        Hostile("integer arrays", t, arrays(lambda v: v.astype(np.int32))),
        Hostile("wrong shape", t, arrays(lambda v: np.append(v.ravel(), 1.0))),
        Hostile("NaN weights", t, arrays(lambda v: np.full_like(v, nan))),
        Hostile("infinite weights", t, arrays(lambda v: np.full_like(v, inf))),
        Hostile("one NaN among the weights", t, arrays(_one_nan)),
        Hostile("no arrays record", t, drop("arrays")),
        Hostile("no metrics record", t, drop("metrics")),
        Hostile("no info record", t, drop("info")),
        Hostile("an extra arrays record", t, extra("arrays")),
        Hostile("an extra config record", t, extra("config")),
        Hostile("an extra metrics record", t, extra("metrics")),
        Hostile("a missing count", t, metrics(n_TNT=None)),
        Hostile("fractional count", t, metrics(n_shared=10.5)),
        Hostile("negative count", t, metrics(n_shared=-5)),
        Hostile("count above the cap", t, metrics(n_shared=10**12)),
        Hostile("count sent as a float", t, metrics(n_shared=25.0)),
        Hostile("list-valued count", t, metrics(n_shared=[1, 2])),
        Hostile("expert count without its arrays", t, metrics(n_nCT=5)),
        Hostile("list-valued seconds", t, metrics(seconds=[1.0, 2.0])),
        Hostile("NaN seconds", t, metrics(seconds=nan)),
        Hostile("negative steps", t, metrics(steps=-1)),
        Hostile("steps beyond belief", t, metrics(steps=10**12)),
        Hostile("list-valued train loss", t, metrics(train_loss=[1.0])),
        Hostile("NaN train loss", t, metrics(train_loss=nan)),
        Hostile("an unknown metric", t, metrics(accuracy=0.99)),
        Hostile("an unknown info entry", t, info(note="hello")),
    ]


def _account_and_identity_kinds() -> list[Hostile]:
    """Training replies with a bad DP account, a bad declined round or a false site name."""
    t = "train"
    inf = float("inf")
    return [
        Hostile("dp-foo alone", t, metrics(dp_foo=1.0)),
        Hostile("dp-epsilon alone", t, metrics(dp_epsilon=1.0)),
        Hostile(
            "dp account without delta",
            t,
            metrics(dp_epsilon=1.0, dp_target_epsilon=8.0),
        ),
        Hostile("dp account with an unknown key", t, metrics(**DP, dp_bar=2.0)),
        Hostile("dp value a list", t, metrics(**{**DP, "dp_epsilon": [1.0, 2.0]})),
        Hostile("dp value infinite", t, metrics(**{**DP, "dp_epsilon": inf})),
        Hostile("dp epsilon negative", t, metrics(**{**DP, "dp_epsilon": -1.0})),
        Hostile("dp delta of 1", t, metrics(**{**DP, "dp_delta": 1.0})),
        Hostile(
            "dp epsilon before above after",
            t,
            metrics(**DP, dp_epsilon_before=5.0),
        ),
        Hostile("declined round without a DP account", t, declined("budget")),
        Hostile("declined round, partial DP account", t, declined("budget", dp_foo=1)),
        Hostile("declined round, reason not a text", t, declined(7, **DP)),
        Hostile(
            "declined round, 1 MB reason",
            t,
            declined("budget\n" + "x" * 1_000_000, **DP),
            expect="accepted",
        ),
        Hostile("site name with ../ and a newline", t, info(site="../etc\nx")),
        Hostile("site name of 1 MB", t, info(site="x" * 1_000_000)),
        Hostile("site name not a text", t, info(site=7)),
        Hostile("site name in capitals", t, info(site="ALPHA")),
        Hostile("impostor of a present site", t, _impostor_of("alpha")),
        Hostile(
            "impostor of an absent site with a small count",
            t,
            _impostor_of("dora", n_shared=1, n_nCRT=1),
        ),
    ]


def _influence_kinds() -> list[Hostile]:
    """Well-formed training replies that push the model too far."""
    t = "train"
    return [
        scaled_kind(50.0),
        scaled_kind(1e30),
        Hostile("update sign-flipped, 10x", t, _unchanged, "bounded", factor=-10.0),
        Hostile(
            "declares 100,000 patients in round 1",
            t,
            metrics(n_shared=100_000, n_nCRT=100_000),
            expect="bounded",
        ),
        Hostile(
            "declares 25, then claims 1,000",
            t,
            metrics(n_shared=1000, n_nCRT=1000),
            rounds=(2, 3),
        ),
        Hostile(
            "declares 25, then fewer",
            t,
            metrics(n_shared=5, n_nCRT=5),
            expect="accepted",
            rounds=(2, 3),
        ),
    ]


def _evaluation_kinds() -> list[Hostile]:
    """Malformed or false evaluation replies."""
    e = "evaluate"
    nan = float("nan")
    return [
        Hostile("evaluation: NaN Dice sum", e, evaluation(dice_sum=nan)),
        Hostile("evaluation: Dice sum above its count", e, evaluation(dice_sum=1e9)),
        Hostile("evaluation: negative count", e, evaluation(dice_n=-3)),
        Hostile("evaluation: an unknown key", e, evaluation(auc=0.99)),
        Hostile(
            "evaluation: calibration bins of the wrong length",
            e,
            evaluation(**{"nCRT-calib": [0.5] * 3}),
        ),
        Hostile("evaluation: impostor of a present site", e, info(site="alpha")),
        Hostile("evaluation: error reply", e, lambda c, r: None),
    ]


def _one_nan(v: np.ndarray) -> np.ndarray:
    out = v.copy()
    out.flat[0] = np.nan
    return out


HOSTILE: dict[str, Hostile] = {h.name: h for h in _kinds()}
"""Every kind, by name."""

SCALES = (2.0, 5.0, 10.0, 50.0, 1e3, 1e6, 1e30)
"""The scaled-update sweep."""
