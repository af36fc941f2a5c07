"""One hostile kind through the coordinator's loop, and the verdict on it:
:func:`play` runs :func:`server.server_app.run_federation` against a
:class:`simulations.hostile.HostileGrid`, :func:`judge` reads the run record
and checkpoints; :func:`scaling_client_app` plays an attacker inside a real
Flower simulation."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message

from shared_model.messages import COUNT_KEYS
from simulations.hostile import ATTACKER, HONEST, Hostile, HostileGrid


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
    from shared_model.model import build_model
    from shared_model.model_config import model_config_for
    from shared_model.parameter_groups import parameter_groups
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
    if hostile.phase == "train":
        outcome, reasons = _train_outcome(sent, rounds)
    else:
        included = [ATTACKER in r.get("evaluate", {}).get("sites", {}) for r in sent]
        outcome = "accepted" if any(included) else "excluded"
        reasons = ["left out of the round's evaluation (logged with its reason)"]
    start = grid.received[1]
    worst = _worst_step(Path(run_dir) / "checkpoints", rounds, grid, start)
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


def _train_outcome(
    sent: list[dict[str, Any]], rounds: list[dict[str, Any]]
) -> tuple[str, list[str]]:
    """Whether the rounds the attacker sent in excluded, bounded or accepted it,
    and the reasons given (refusals first, then the flags raised on it)."""
    refused = [
        next(
            (v[0] for k, v in r["excluded"].items() if k not in HONEST),
            None,
        )
        for r in sent
    ]
    bounded = any(
        ATTACKER in (r.get("bounds") or {}).get("clipped", {}) or _capped(r, ATTACKER)
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
    return outcome, reasons + flags


def _worst_step(
    folder: Path,
    rounds: list[dict[str, Any]],
    grid: HostileGrid,
    start: Mapping[str, np.ndarray],
) -> float:
    """The largest move of an updated group in a round, as a share of the move
    the round's bound allowed (``multiple`` x reference RMS x sqrt(size))."""
    from safetensors.numpy import load

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
    return worst


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
    by ``factor`` every round, and its Newton sums (gradients, Hessians,
    log-likelihoods) times ``factor`` (an attacker inside a real simulated
    federation; the other sites are untouched)."""
    from flwr.app import Context
    from flwr.clientapp import ClientApp

    from client.node.client_app import error_reply
    from client.node.client_app import evaluate as honest_evaluate
    from client.node.posterior_round import newton_round
    from client.node.site_round import train_round
    from shared_model.messages import SiteTrainReply
    from wire.records import (
        newton_reply_content,
        read_newton_query,
        read_request,
        train_reply_content,
    )

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

    @app.query("newton")
    def newton(msg: Message, context: Context) -> Message:
        try:
            request, arrays, beta = read_newton_query(msg)
            reply = newton_round(request, arrays, beta, dict(context.node_config))
            if reply.site == site:
                reply = replace(
                    reply,
                    grad=reply.grad * factor,
                    hess=reply.hess * factor,
                    loglik=reply.loglik * factor,
                    val_grad=reply.val_grad * factor,
                    val_hess=reply.val_hess * factor,
                )
            return Message(newton_reply_content(reply), reply_to=msg)
        except Exception as e:
            return error_reply(msg, e, "the Newton query")

    app.evaluate()(honest_evaluate)
    return app
