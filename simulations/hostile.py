"""One hostile site among honest ones: a catalogue of what it can send, and a
grid that runs the coordinator's real loop against it.

:class:`HostileGrid` stands behind Flower's Grid interface for
:func:`server.server_app.run_federation` (in process, no Ray, no training):
three honest, deterministic sites (``alpha``, ``bravo``, ``charlie``) answer
each round with the weights they received moved by a site- and
round-specific amount, and a fourth node, registered as ``mallory``, answers
with whatever the :class:`Hostile` kind under test makes of an honest reply.
Every node is registered under its name, as in a deployment with node
authentication. Evaluation replies are counts from a fixed seed.

:data:`HOSTILE` holds the kinds: malformed records and values, partial DP
accounts, names that are not site names, impostors, scaled updates and
inflated declarations. ``simulations/benchmarks/hostile.py`` runs each through
a whole run and prints what became of it; the unit tests run them too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from shared_model.federated_metrics import ScoreCounts
from shared_model.messages import COUNT_KEYS, GROUPS, SHARED, expert_group
from shared_model.policy_value import PolicySums
from shared_model.site_evaluation import SiteEvaluation

HONEST = ("alpha", "bravo", "charlie")
ATTACKER = "mallory"
EXPERTS = {"alpha": "nCRT", "bravo": "TNT", ATTACKER: "nCRT"}
"""Sites that also train an expert (the attacker shares alpha's)."""
NODES = {100: "alpha", 101: "bravo", 102: "charlie", 104: ATTACKER}


@dataclass(frozen=True)
class Node:
    """What Flower's ``grid.get_nodes()`` gives: the id and registered name."""

    node_id: int
    name: str = ""


Content = RecordDict | None
Maker = Callable[[RecordDict, int], Content]
"""Turns the attacker's honest reply content (and the round) into the
hostile one; None sends an error reply."""


@dataclass(frozen=True)
class Hostile:
    """One kind of hostile reply.

    Attributes:
        name: what it is.
        phase: ``train`` or ``evaluate``: which replies it changes.
        make: the change (:data:`Maker`).
        expect: ``excluded`` (refused with a reason), ``bounded`` (accepted,
            its influence held to the bound) or ``accepted`` (harmless, e.g.
            fewer patients than declared).
        rounds: the rounds it is sent in (None: every round; the others are
            honest).
        factor: the attacker's update (its arrays minus the weights it
            received) is multiplied by this after ``make``.
    """

    name: str
    phase: str
    make: Maker
    expect: str = "excluded"
    rounds: tuple[int, ...] | None = None
    factor: float | None = None

    def sent_in(self, rnd: int) -> bool:
        """Whether the attacker sends this kind in round ``rnd``."""
        return self.rounds is None or rnd in self.rounds


def _site_counts(site: str) -> dict[str, int]:
    index = [*HONEST, ATTACKER].index(site)
    counts = {SHARED: 10 + 5 * index}
    if site in EXPERTS:
        counts[expert_group(EXPERTS[site])] = 7 + index
    return counts


def honest_train(
    site: str, rnd: int, received: Mapping[str, np.ndarray], groups: Any
) -> RecordDict:
    """An honest site's reply: the groups it trains, moved deterministically."""
    index = [*HONEST, ATTACKER].index(site)
    counts = _site_counts(site)
    scale = np.float32(1.0 - 0.01 * (index % 3 + 1))
    shift = np.float32(0.001 * rnd * (index % 3 + 1))
    upload = {
        n: (received[n] * scale + np.sin(received[n] + shift) * shift).astype(
            np.float32
        )
        for g in counts
        for n in groups[g]
    }
    values = {COUNT_KEYS[g]: int(counts.get(g, 0)) for g in GROUPS}
    return RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in upload.items()}),
            "metrics": MetricRecord({**values, "steps": 1, "seconds": 0.0}),
            "info": ConfigRecord({"site": site}),
        }
    )


def honest_evaluation(site: str) -> RecordDict:
    """An honest site's validation counts (fixed per site)."""
    rng = np.random.default_rng(sum(map(ord, site)))
    counts = {
        r: ScoreCounts.from_scores(
            rng.random(20).tolist(), (rng.random(20) < 0.3).astype(float).tolist()
        )
        for r in ("nCRT", "TNT", "nCT")
    }
    values = SiteEvaluation(site, "validation", counts, 10.0, 20, PolicySums())
    return RecordDict(
        {
            "metrics": MetricRecord(values.to_values()),
            "info": ConfigRecord({"site": site}),
        }
    )


class HostileGrid:
    """Three honest sites and one hostile, behind Flower's Grid interface.

    ``received``: per round, the global weights each training message carried
    (the coordinator's model before the round), for the benchmark's bound
    check.
    """

    def __init__(self, groups: Mapping[str, list[str]], hostile: Hostile | None):
        self.groups = groups
        self.hostile = hostile
        self.nodes = dict(NODES)
        self.received: dict[int, dict[str, np.ndarray]] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def get_nodes(self) -> list[Node]:
        return [Node(n, s) for n, s in self.nodes.items()]

    def send_and_receive(
        self, messages: list[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return [self._answer(msg) for msg in messages]

    def _answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        site = self.nodes[node]
        rnd = msg.content.config_records["config"]["server-round"]
        assert isinstance(rnd, int)
        phase = msg.metadata.message_type
        if phase == "train":
            received = {
                k: v.numpy() for k, v in msg.content.array_records["arrays"].items()
            }
            self.received.setdefault(rnd, received)
            content = honest_train(site, rnd, received, self.groups)
        else:
            content = honest_evaluation(site)
        h = self.hostile
        if site == ATTACKER and h is not None and h.phase == phase and h.sent_in(rnd):
            made = h.make(content, rnd)
            if made is None:
                return Message(Error(code=1099, reason=ERROR_TEXT), reply_to=msg)
            content = made if h.factor is None else _scale(made, received, h.factor)
        reply = Message(content, reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = node
        return reply


ERROR_TEXT = "Traceback (most recent call last): /data/WCH_R0001.nii.gz\n" + "x" * 5000


def _scale(
    content: RecordDict, received: Mapping[str, np.ndarray], factor: float
) -> RecordDict:
    parts = _records(content)
    with np.errstate(over="ignore"):  # 1e30 times an update overflows float32
        parts["arrays"] = {
            k: Array(
                (
                    received[k].astype(np.float64)
                    + factor * (v.numpy().astype(np.float64) - received[k])
                ).astype(np.float32)
            )
            for k, v in parts["arrays"].items()
        }
    return _build(parts)


# --- the catalogue ---------------------------------------------------------------


def _records(content: RecordDict) -> dict[str, Any]:
    return {
        "arrays": dict(content.array_records.get("arrays", {}) or {}),
        "metrics": dict(content.metric_records.get("metrics", {}) or {}),
        "info": dict(content.config_records.get("info", {}) or {}),
    }


def _build(parts: Mapping[str, Any], **extra: Any) -> RecordDict:
    out: dict[str, Any] = {}
    if parts.get("arrays") is not None:
        out["arrays"] = ArrayRecord(dict(parts["arrays"]))
    if parts.get("metrics") is not None:
        out["metrics"] = MetricRecord(dict(parts["metrics"]))
    if parts.get("info") is not None:
        out["info"] = ConfigRecord(dict(parts["info"]))
    return RecordDict({**out, **extra})


def metrics(**change: Any) -> Maker:
    """The honest reply with metric values changed (None removes a key)."""

    def make(content: RecordDict, rnd: int) -> RecordDict:
        parts = _records(content)
        for k, v in change.items():
            key = k.replace("_", "-")
            if v is None:
                parts["metrics"].pop(key, None)
            else:
                parts["metrics"][key] = v
        return _build(parts)

    return make


def info(**change: Any) -> Maker:
    """The honest reply with info entries changed."""

    def make(content: RecordDict, rnd: int) -> RecordDict:
        parts = _records(content)
        parts["info"].update(change)
        return _build(parts)

    return make


def arrays(fn: Callable[[np.ndarray], Any], only: str | None = None) -> Maker:
    """The honest reply with every array (or only ``only``) replaced by
    ``fn(array)``."""

    def make(content: RecordDict, rnd: int) -> RecordDict:
        parts = _records(content)
        parts["arrays"] = {
            k: Array(np.asarray(fn(v.numpy()))) if only in (None, k) else v
            for k, v in parts["arrays"].items()
        }
        return _build(parts)

    return make


def _unchanged(content: RecordDict, rnd: int) -> RecordDict:
    return content


def drop(record: str) -> Maker:
    def make(content: RecordDict, rnd: int) -> RecordDict:
        parts = _records(content)
        parts[record] = None
        return _build(parts)

    return make


def extra(kind: str) -> Maker:
    """The honest reply with a record Flower allows but ours never has."""

    def make(content: RecordDict, rnd: int) -> RecordDict:
        parts = _records(content)
        if kind == "arrays":
            return _build(parts, more=ArrayRecord({"x": Array(np.zeros(2))}))
        if kind == "config":
            return _build(parts, more=ConfigRecord({"x": 1}))
        return _build(parts, more=MetricRecord({"x": 1.0}))

    return make


def declined(reason: Any, **dp: Any) -> Maker:
    """A declined round (no arrays) with a DP account of ``dp``."""

    def make(content: RecordDict, rnd: int) -> RecordDict:
        parts = _records(content)
        parts["arrays"] = None
        parts["info"]["declined"] = reason
        for k, v in dp.items():
            parts["metrics"][k.replace("_", "-")] = v
        return _build(parts)

    return make


def evaluation(**change: Any) -> Maker:
    return metrics(**change)


DP = {"dp_epsilon": 1.0, "dp_target_epsilon": 8.0, "dp_delta": 1e-5}
"""A complete DP account (the keys every DP reply carries)."""


def _impostor_of(name: str, **counts: int) -> Maker:
    def make(content: RecordDict, rnd: int) -> RecordDict:
        parts = _records(content)
        parts["info"]["site"] = name
        parts["metrics"].update({k.replace("_", "-"): v for k, v in counts.items()})
        return _build(parts)

    return make


def scaled_kind(factor: float) -> Hostile:
    """The attacker's honest update, scaled by ``factor``, every round."""
    return Hostile(
        f"update scaled {factor:g}x", "train", _unchanged, "bounded", factor=factor
    )


def _kinds() -> list[Hostile]:
    t, e = "train", "evaluate"
    nan, inf = float("nan"), float("inf")
    out = [
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
    return out


def _one_nan(v: np.ndarray) -> np.ndarray:
    out = v.copy()
    out.flat[0] = np.nan
    return out


HOSTILE: dict[str, Hostile] = {h.name: h for h in _kinds()}
"""Every kind, by name."""

SCALES = (2.0, 5.0, 10.0, 50.0, 1e3, 1e6, 1e30)
"""The scaled-update sweep."""


# --- running a kind through the coordinator's loop ---------------------------------


@contextmanager
def in_process_task() -> Iterator[None]:
    """Flower's Message reads the running task's identity, which only its
    runtime sets; give a loop run in process (this module's grid, the tests)
    one for the duration."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 0, 0, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@dataclass
class Verdict:
    """What became of one hostile kind in a whole run.

    Attributes:
        kind: the kind's name; ``expect``: what it should come to.
        finished: the run finished (its record says so).
        outcome: ``excluded`` (refused in every round it was sent, with a
            reason), ``bounded`` (accepted and scaled to the bound or held to
            the share cap), ``accepted`` (taken as it was), or ``failed``.
        reason: the first reason the run record gives for it.
        move_over_bound: the largest ratio, over rounds and groups, of the
            model's move to the round's bound (at most 1 under ``mean``).
        distance: the final model's distance from the all-honest run's, over
            the all-honest run's distance from the initial model.
    """

    kind: str
    expect: str
    finished: bool
    outcome: str
    reason: str
    move_over_bound: float
    distance: float


ROUNDS = 3


def run_config(run_dir: Any, plan: Any, **override: Any) -> dict[str, Any]:
    """A three-round joint run on a tiny network, evaluation every round."""
    return {
        "run-dir": str(run_dir),
        "plan": str(plan),
        "num-server-rounds": ROUNDS,
        "training": "joint",
        "min-sites": 2,
        "resume": False,
        "evaluate-every": 1,
        "base-filters": 2,
        "max-filters": 4,
        **override,
    }


def play(
    hostile: Hostile | None, run_dir: Any, plan: Any, **override: Any
) -> tuple[dict[str, Any], HostileGrid]:
    """Run the coordinator's loop against ``hostile`` (None: four honest
    sites); the run record (``status`` "failed" with the error when the loop
    raised) and the grid."""
    from pathlib import Path

    from server.server_app import run_federation
    from shared_model.federation_config import FederationConfig
    from shared_model.model import build_model, model_config_for, parameter_groups
    from shared_model.plan import Plan

    config = run_config(run_dir, plan, **override)
    fed = FederationConfig.from_run_config(config)
    groups = parameter_groups(build_model(model_config_for(fed, Plan.load(Path(plan)))))
    grid = HostileGrid(groups, hostile)
    try:
        with in_process_task():
            record = run_federation(grid, config)  # type: ignore[arg-type]
    except Exception as e:  # what the benchmark counts: a run that ended
        record = {"status": "failed", "error": repr(e)[:300], "rounds": []}
    return record, grid


def judge(
    hostile: Hostile,
    record: dict[str, Any],
    run_dir: Any,
    grid: HostileGrid,
    honest_final: Mapping[str, np.ndarray],
) -> Verdict:
    """The verdict on one run (see :class:`Verdict`)."""
    from pathlib import Path

    from safetensors.numpy import load

    finished = record.get("status") == "finished"
    rounds = record.get("rounds", [])
    if not finished:
        return Verdict(
            hostile.name,
            hostile.expect,
            False,
            "failed",
            str(record.get("error", "")),
            float("nan"),
            float("nan"),
        )
    sent = [r for r in rounds if hostile.sent_in(r["round"])]
    reasons: list[str] = []
    if hostile.phase == "train":
        refused = [
            next(
                (v[0] for k, v in r["excluded"].items() if k not in HONEST),
                None,
            )
            for r in sent
        ]
        bounded = any(
            ATTACKER in (r.get("bounds") or {}).get("clipped", {})
            or _capped(r, ATTACKER)
            for r in sent
        )
        reasons = [x for x in refused if x]
        if all(refused):
            outcome = "excluded"
        elif bounded:
            outcome = "bounded"
        else:
            outcome = "accepted"
        flags = [f for r in rounds for f in r.get("flags", {}).get(ATTACKER, [])]
        reasons += flags
    else:
        included = [ATTACKER in r.get("evaluate", {}).get("sites", {}) for r in sent]
        outcome = "accepted" if any(included) else "excluded"
        reasons = ["left out of the round's evaluation (logged with its reason)"]
    folder = Path(run_dir) / "checkpoints"
    start = grid.received[1]
    previous = start
    worst = 0.0
    for r in rounds:
        now = load((folder / f"round_{r['round']:03d}.safetensors").read_bytes())
        bounds = r.get("bounds") or {}
        ref, multiple = bounds.get("reference_rms"), bounds.get("multiple", 0)
        if ref and multiple:
            for g, info_g in r["groups"].items():
                if not info_g["updated"]:
                    continue
                names = grid.groups[g]
                size = sum(int(np.size(previous[n])) for n in names)
                move = np.sqrt(
                    sum(
                        float(np.sum((now[n].astype(np.float64) - previous[n]) ** 2))
                        for n in names
                    )
                )
                worst = max(worst, move / (multiple * ref * np.sqrt(size)))
        previous = now
    final = load((Path(run_dir) / "model.safetensors").read_bytes())
    gap = _l2({k: final[k].astype(np.float64) - honest_final[k] for k in final})
    span = _l2({k: honest_final[k].astype(np.float64) - start[k] for k in final})
    return Verdict(
        hostile.name,
        hostile.expect,
        True,
        outcome,
        reasons[0] if reasons else "",
        worst,
        gap / span if span else float("nan"),
    )


def _capped(entry: Mapping[str, Any], site: str) -> bool:
    """Whether the share cap lowered ``site``'s weight in a round's entry."""
    counts = entry.get("sites", {}).get(site, {})
    for g, shares in (entry.get("bounds") or {}).get("capped_shares", {}).items():
        total = entry["groups"][g]["n"]
        natural = counts.get(COUNT_KEYS[g], 0) / total if total else 0.0
        if site in shares and shares[site] < natural - 1e-12:
            return True
    return False


def _l2(arrays: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(a * a)) for a in arrays.values())))


def scaling_client_app(site: str, factor: float) -> Any:
    """moefl's ClientApp, except that ``site`` sends its trained update scaled
    by ``factor`` every round (an attacker inside a real simulated federation;
    the other sites are untouched)."""
    from flwr.app import Context
    from flwr.clientapp import ClientApp

    from client.client_app import error_reply
    from client.client_app import evaluate as honest_evaluate
    from client.site_round import train_round
    from shared_model.messages import SiteTrainReply
    from wire.records import read_request, train_reply_content

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        try:
            request, received = read_request(msg)
            reply = train_round(request, received, dict(context.node_config))
            if reply.site == site and reply.declined is None:
                reply = SiteTrainReply(
                    reply.site,
                    reply.reply,
                    {
                        k: (
                            received[k].astype(np.float64)
                            + factor * (v.astype(np.float64) - received[k])
                        ).astype(v.dtype)
                        for k, v in reply.arrays.items()
                    },
                )
            return Message(train_reply_content(reply), reply_to=msg)
        except Exception as e:
            return error_reply(msg, e, "training")

    app.evaluate()(honest_evaluate)
    return app
