"""Flower ServerApp: rounds, run records, checkpoints, resume.

The run folder (``run-dir``, on the coordinator's machine) holds::

    checkpoints/round_NNN.safetensors   global weights after round NNN
    checkpoints/round_NNN.state.json    strategy state (round, FedAdam step, the
                                        sites' declared counts) ...
    checkpoints/round_NNN.adam.safetensors   ... and FedAdam moments, when used
    model.safetensors, config.json, plan.json   the latest model (moefl predict reads it)
    run_config.json                     the resolved federation config
    metrics.json                        {"status", "rounds": [...]} one entry per round:
                                        sites (counts, bytes, each site's DP-SGD
                                        accounting under "privacy"), excluded,
                                        declined (a site's budget refused the
                                        round), missing, groups, client_dp,
                                        flags (counts below a declaration),
                                        evaluate; and "declared_counts": per
                                        site, the patients per group it declared
                                        in its first valid reply

A run resumes from its last checkpoint (weights and strategy state) when
``resume`` is true and continues as if it had never stopped.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from safetensors.numpy import load_file, save_file

from client.client_app import arrays_to_record
from server.strategy import GroupedStrategy
from shared_model.aggregation import AdamState
from shared_model.errors import ConfigError
from shared_model.federation_config import FederationConfig
from shared_model.model import ModelConfig, build_model, parameter_groups
from shared_model.plan import Plan

log = logging.getLogger(__name__)


def resolve_plan(fed: FederationConfig) -> Plan:
    if fed.plan:
        return Plan.load(Path(fed.plan))
    if fed.cohort_dir and (Path(fed.cohort_dir) / "plan.json").is_file():
        return Plan.load(Path(fed.cohort_dir) / "plan.json")
    return Plan()


def last_checkpoint(run_dir: Path) -> int:
    rounds = [
        int(p.stem.split("_")[1].split(".")[0])
        for p in (run_dir / "checkpoints").glob("round_*.safetensors")
        if ".adam" not in p.name
    ]
    return max(rounds, default=0)


def save_round(
    run_dir: Path,
    rnd: int,
    arrays: Mapping[str, np.ndarray],
    adam: AdamState,
    model_cfg: ModelConfig,
    plan: Plan,
    *,
    declared: Mapping[str, Mapping[str, int]] | None = None,
) -> None:
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    save_file(tensors, str(ckpt / f"round_{rnd:03d}.safetensors"))
    if adam.m:
        moments = {f"m/{k}": v for k, v in adam.m.items()} | {
            f"v/{k}": v for k, v in adam.v.items()
        }
        save_file(moments, str(ckpt / f"round_{rnd:03d}.adam.safetensors"))
    (ckpt / f"round_{rnd:03d}.state.json").write_text(
        json.dumps({"round": rnd, "adam_t": adam.t, "declared": declared or {}})
    )
    save_file(tensors, str(run_dir / "model.safetensors"))
    (run_dir / "config.json").write_text(
        json.dumps({"model": model_cfg.to_dict()}, indent=2)
    )
    plan.save(run_dir / "plan.json")


def load_round(
    run_dir: Path, rnd: int
) -> tuple[dict[str, np.ndarray], AdamState, dict[str, dict[str, int]]]:
    """A checkpoint's weights, FedAdam state and the sites' declared counts."""
    ckpt = run_dir / "checkpoints"
    arrays = load_file(str(ckpt / f"round_{rnd:03d}.safetensors"))
    state = json.loads((ckpt / f"round_{rnd:03d}.state.json").read_text())
    adam = AdamState(t=int(state.get("adam_t", 0)))
    declared = {
        str(site): {str(g): int(n) for g, n in counts.items()}
        for site, counts in state.get("declared", {}).items()
    }
    adam_path = ckpt / f"round_{rnd:03d}.adam.safetensors"
    if adam_path.is_file():
        for k, v in load_file(str(adam_path)).items():
            kind, name = k.split("/", 1)
            (adam.m if kind == "m" else adam.v)[name] = v
    return arrays, adam, declared


def _write_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=float) + "\n")
    tmp.replace(run_dir / "metrics.json")


@dataclass
class FederationStart:
    """What a federation starts from: the initial model and the round config."""

    plan: Plan
    model_cfg: ModelConfig
    arrays: dict[str, np.ndarray]  # initial global weights
    strategy: GroupedStrategy
    config: ConfigRecord  # sent to every site with each round's weights


def start_federation(fed: FederationConfig) -> FederationStart:
    """Seed, resolve the plan, build the initial model, strategy and round config."""
    random.seed(fed.seed)
    np.random.seed(fed.seed)
    torch.manual_seed(fed.seed)
    plan = resolve_plan(fed)
    model_cfg = ModelConfig.from_plan(
        plan, base_filters=fed.base_filters, max_filters=fed.max_filters
    )
    model = build_model(model_cfg)
    config = ConfigRecord(
        {
            "run-config": json.dumps(fed.to_run_config()),
            "plan": json.dumps(plan.to_dict()),
            "model-config": json.dumps(model_cfg.to_dict()),
        }
    )
    return FederationStart(
        plan,
        model_cfg,
        {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()},
        GroupedStrategy(fed, parameter_groups(model)),
        config,
    )


def run_federation(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The coordinator's loop. Returns the run record (also in metrics.json)."""
    fed = FederationConfig.from_run_config(run_config)
    begin = start_federation(fed)
    plan, model_cfg, strategy, config = (
        begin.plan,
        begin.model_cfg,
        begin.strategy,
        begin.config,
    )
    run_dir = Path(fed.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)

    start = last_checkpoint(run_dir) if fed.resume else 0
    record: dict[str, Any] = {"status": "running", "rounds": []}
    if start:
        arrays, strategy.adam, strategy.declared = load_round(run_dir, start)
        old = json.loads((run_dir / "metrics.json").read_text())
        record["rounds"] = [r for r in old.get("rounds", []) if r["round"] <= start]
        strategy.client_dp_releases = sum(
            1 for r in record["rounds"] if r.get("client_dp")
        )
        log.info("resuming %s after round %d", run_dir, start)
    else:
        arrays = begin.arrays
    (run_dir / "run_config.json").write_text(json.dumps(fed.to_run_config(), indent=2))

    bytes_down = int(sum(a.nbytes for a in arrays.values()))
    node_sites: dict[int, str] = {}  # Flower node id -> site name, learnt from replies
    try:
        for rnd in range(start + 1, fed.num_server_rounds + 1):
            t0 = time.perf_counter()
            messages = list(
                strategy.configure_train(rnd, arrays_to_record(arrays), config, grid)
            )
            replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout))
            missing = _learn_sites(node_sites, messages, replies)
            if missing:
                log.warning(
                    "round %d: no reply within %.0f s from %s",
                    rnd,
                    fed.round_timeout,
                    ", ".join(missing),
                )
            outcome = strategy.aggregate_round(rnd, replies, arrays)
            arrays = outcome.arrays
            for site in outcome.sites.values():
                site["bytes_down"] = bytes_down
            entry: dict[str, Any] = {
                "round": rnd,
                "updated": outcome.updated,
                "sites": outcome.sites,
                "excluded": outcome.excluded,
                "declined": outcome.declined,
                "missing": missing,
                "groups": {
                    g: {"sites": r.sites, "n": r.n, "updated": r.updated}
                    for g, r in outcome.groups.items()
                },
            }
            if outcome.client_dp is not None:
                entry["client_dp"] = outcome.client_dp
            if outcome.flags:
                entry["flags"] = outcome.flags
            if fed.evaluate_every and rnd % fed.evaluate_every == 0:
                ev_msgs = strategy.configure_evaluate(
                    rnd, arrays_to_record(arrays), ConfigRecord(dict(config)), grid
                )
                ev_replies = grid.send_and_receive(ev_msgs, timeout=fed.round_timeout)
                entry["evaluate"] = strategy.aggregate_evaluation(ev_replies)
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            record["rounds"].append(entry)
            record["declared_counts"] = strategy.declared
            save_round(
                run_dir,
                rnd,
                arrays,
                strategy.adam,
                model_cfg,
                plan,
                declared=strategy.declared,
            )
            _write_metrics(run_dir, record)
            ev = entry.get("evaluate", {})
            log.info(
                "round %d/%d: %d sites, excluded %s, declined %s, val AUC %s, "
                "Dice %s, %.0f s%s",
                rnd,
                fed.num_server_rounds,
                len(outcome.sites),
                sorted(outcome.excluded) or "none",
                sorted(outcome.declined) or "none",
                _fmt(ev.get("auc")),
                _fmt(ev.get("dice")),
                entry["seconds"],
                _privacy_line(entry),
            )
    except Exception as e:
        record["status"] = "failed"
        record["error"] = repr(e)
        _write_metrics(run_dir, record)
        raise
    record["status"] = "finished"
    _write_metrics(run_dir, record)
    return record


def _learn_sites(
    node_sites: dict[int, str], sent: list[Any], replies: list[Any]
) -> list[str]:
    """Remember which node is which site; name the nodes that did not reply.

    Node ids are random per run, so they only map replies within this run; a
    node never heard from is reported by id.
    """
    answered = set()
    for msg in replies:
        node = msg.metadata.src_node_id
        answered.add(node)
        if msg.has_content():
            info = msg.content.config_records.get("info")
            if info is not None and "site" in info:
                node_sites[node] = str(info["site"])
    return sorted(
        node_sites.get(m.metadata.dst_node_id, f"node {m.metadata.dst_node_id}")
        for m in sent
        if m.metadata.dst_node_id not in answered
    )


def _privacy_line(entry: dict[str, Any]) -> str:
    """``; epsilon site 1.23/8 ...`` for the sites that trained under DP."""
    parts = [
        f"{site} {p['epsilon']:.2f}/{p['target_epsilon']:g}"
        for site, m in sorted({**entry["sites"], **entry["declined"]}.items())
        if (p := m.get("privacy"))
    ]
    if entry.get("client_dp"):
        parts.append(f"client-level {entry['client_dp']['epsilon']:.2f}")
    return f"; epsilon {', '.join(parts)}" if parts else ""


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is Flower's plus ``overrides`` (simulation)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        merged = {**dict(context.run_config), **dict(overrides or {})}
        try:
            run_federation(grid, merged)
        except ConfigError as e:
            log.error("invalid federation config: %s", e)
            raise

    return server


app = make_server_app()
