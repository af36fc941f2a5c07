"""The coordinator's run folder: the one owner of checkpoints, strategy state,
the run record and the lock.

Every file is written to a temporary name in the same folder, flushed to disk
and renamed over the old one, so a crash leaves either the old file or the new
one, never half of either (a temporary left by a kill is removed when the next
run takes the lock). A round is complete when its ``state.json`` exists: it is
written last, after the weights, the FedAdam moments, the run record that
includes the round and the latest model files. Resume starts from the newest complete round whose
files all read back; a newer, incomplete round (a crash mid-save) is ignored
and done again, and its record is dropped with it.

Layout::

    checkpoints/round_NNN.safetensors        global weights after round NNN
    checkpoints/round_NNN.adam.safetensors   FedAdam moments, when used
    checkpoints/round_NNN.state.json         strategy state; marks NNN complete
    model.safetensors, config.json, plan.json   the latest model
    run_config.json                          the resolved federation config
    metrics.json                             the run record (RUN_RECORD)
    .lock                                    held while a run uses the folder

The run record is read through :func:`read_run_record` (the report, the
simulation and the benchmarks); the record's name stays ``metrics.json``, as
run folders already on sites' and coordinators' disks have it.
"""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load, save

from shared_model.aggregation import AdamState
from shared_model.checkpoint import (
    ADVICE,
    CONFIG,
    MODEL,
    PLAN,
    checkpoint_files,
)
from shared_model.clinical import REGIMENS
from shared_model.durable import json_bytes, read_record, write_atomic
from shared_model.errors import ConfigError
from shared_model.messages import expert_group
from shared_model.model_config import ModelConfig
from shared_model.plan import Plan
from shared_model.policy import RecommendationRule

log = logging.getLogger(__name__)

RUN_RECORD = "metrics.json"
"""The run record's file in a run folder: status, rounds, privacy, advice."""
RUN_CONFIG = "run_config.json"
"""The resolved federation config a resume is checked against."""

RESUMABLE_CHANGES = (
    "num-server-rounds",
    "head-rounds",
    "round-timeout",
    "evaluate-every",
    "resume",
    "run-dir",
)
"""Run-config keys a resume may change (``run-dir``: the folder was moved); any
other change is refused unless the run config says ``resume-changed-config=true``."""


@dataclass
class StrategyState:
    """What a resumed strategy needs beyond the weights: the server
    optimiser's state (FedAdam's moments and step), the patients per group
    each site declared when it joined, the client-level DP releases so far
    (its epsilon), and the round these describe (0: none yet). Written with
    each round (``state.json`` and the moments file), read back on a resume."""

    adam: AdamState = field(default_factory=AdamState)
    declared: dict[str, dict[str, int]] = field(default_factory=dict)
    client_dp_releases: int = 0
    round: int = 0

    def copy(self) -> StrategyState:
        """A copy apart from this one (its arrays are shared: the strategy
        replaces FedAdam's moments, never changes them in place)."""
        adam = AdamState(dict(self.adam.m), dict(self.adam.v), self.adam.t)
        declared = {site: dict(counts) for site, counts in self.declared.items()}
        return StrategyState(adam, declared, self.client_dp_releases, self.round)


@dataclass
class Checkpoint:
    """A complete round read back from the run folder."""

    round: int
    arrays: dict[str, np.ndarray]
    state: StrategyState
    rounds: list[dict[str, Any]]  # the run record's rounds up to this one


class RunFolder:
    """Reads and writes one run folder (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).resolve()
        self.checkpoints = self.path / "checkpoints"

    def _ckpt(self, rnd: int, suffix: str) -> Path:
        return self.checkpoints / f"round_{rnd:03d}{suffix}"

    @contextmanager
    def locked(self) -> Iterator[RunFolder]:
        """Hold the folder's lock for a run; a second run on it is refused."""
        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / ".lock").open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise ConfigError(
                    f"{self.path}: another run is using this run-dir; wait for it "
                    "to finish or choose another `run-dir`"
                ) from e
            for tmp in [*self.path.glob(".*.tmp"), *self.checkpoints.glob(".*.tmp")]:
                tmp.unlink(missing_ok=True)  # left by a run killed mid-write
            try:
                yield self
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def save_round(
        self,
        rnd: int,
        arrays: Mapping[str, np.ndarray],
        state: StrategyState,
        record: dict[str, Any],
        model_cfg: ModelConfig,
        plan: Plan,
        *,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        """Write round ``rnd``: weights, moments, the record, the latest model
        files, then the marker (so a complete round has all of them).

        ``extra_config``: more keys for ``config.json`` beside ``model`` (the
        experts' support)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        latest = checkpoint_files(arrays, model_cfg, plan, extra_config)
        write_atomic(self._ckpt(rnd, ".safetensors"), latest[MODEL])
        adam = state.adam
        if adam.m:
            moments = {f"m/{k}": v for k, v in adam.m.items()} | {
                f"v/{k}": v for k, v in adam.v.items()
            }
            write_atomic(self._ckpt(rnd, ".adam.safetensors"), save(moments))
        self.write_record(record)
        for name, data in latest.items():
            write_atomic(self.path / name, data)
        marker = {
            "round": rnd,
            "adam_t": adam.t,
            "has_adam": bool(adam.m),
            "declared": state.declared,
            "client_dp_releases": state.client_dp_releases,
        }
        write_atomic(self._ckpt(rnd, ".state.json"), json_bytes(marker))

    def save_advice(
        self,
        arrays: Mapping[str, np.ndarray],
        record: dict[str, Any],
        model_cfg: ModelConfig,
        plan: Plan,
        rule: RecommendationRule,
        *,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        """Write the model the advice step ended with (the fitted head, its
        rule and posterior) as the latest model, then the record that says so
        (a crash before the record leaves a run that does the step again)."""
        files = checkpoint_files(arrays, model_cfg, plan, extra_config, rule)
        for name in (ADVICE, MODEL, PLAN, CONFIG):
            if name in files:
                write_atomic(self.path / name, files[name])
        self.write_record(record)

    def write_record(self, record: dict[str, Any]) -> None:
        write_atomic(self.path / RUN_RECORD, json_bytes(record))

    def read_record(self) -> dict[str, Any]:
        """The run record, or an empty one when missing or unreadable."""
        try:
            record = json.loads((self.path / RUN_RECORD).read_text())
        except (OSError, json.JSONDecodeError):
            return {"rounds": []}
        return record if isinstance(record, dict) else {"rounds": []}

    def _read_round(self, rnd: int) -> Checkpoint:
        marker = json.loads(self._ckpt(rnd, ".state.json").read_text())
        if int(marker["round"]) != rnd:
            raise ValueError("state file of another round")
        arrays = load(self._ckpt(rnd, ".safetensors").read_bytes())
        adam = AdamState(t=int(marker.get("adam_t", 0)))
        if marker.get("has_adam"):
            for k, v in load(self._ckpt(rnd, ".adam.safetensors").read_bytes()).items():
                kind, name = k.split("/", 1)
                (adam.m if kind == "m" else adam.v)[name] = v
        declared = {
            str(site): {str(g): int(n) for g, n in counts.items()}
            for site, counts in marker.get("declared", {}).items()
        }
        rounds = [
            r for r in self.read_record().get("rounds", []) if r.get("round", 0) <= rnd
        ]
        if [r.get("round") for r in rounds] != list(range(1, rnd + 1)):
            raise ValueError("the run record lacks some of its rounds")
        state = StrategyState(
            adam, declared, int(marker.get("client_dp_releases", 0)), round=rnd
        )
        return Checkpoint(rnd, arrays, state, rounds)

    def last_complete(self) -> Checkpoint | None:
        """The newest round whose files all read back, or None (start afresh).

        A round that does not read back (truncated weights, a missing or empty
        state file, a record without it) is skipped with a warning, and the one
        before it is tried.
        """
        rounds = sorted(
            {
                int(p.name[len("round_") :].split(".")[0])
                for p in self.checkpoints.glob("round_*.state.json")
            }
            | {
                int(p.name[len("round_") :].split(".")[0])
                for p in self.checkpoints.glob("round_*.safetensors")
            },
            reverse=True,
        )
        for rnd in rounds:
            try:
                return self._read_round(rnd)
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning(
                    "round %d in %s is incomplete (%s); skipped", rnd, self.path, e
                )
            except Exception as e:  # safetensors' own errors on a truncated file
                log.warning(
                    "round %d in %s does not read back (%s); skipped",
                    rnd,
                    self.path,
                    type(e).__name__,
                )
        return None

    def check_run_config(
        self, run_config: Mapping[str, Any], *, allow_changes: bool
    ) -> None:
        """Refuse to resume under a different run config (beyond
        :data:`RESUMABLE_CHANGES`), unless ``allow_changes``; then store it."""
        path = self.path / RUN_CONFIG
        if path.is_file() and not allow_changes:
            try:
                stored = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                stored = None
            if isinstance(stored, dict):
                changed = sorted(
                    k
                    for k in set(stored) | set(run_config)
                    if k not in RESUMABLE_CHANGES
                    and k != "resume-changed-config"
                    and stored.get(k) != run_config.get(k)
                )
                if changed:
                    raise ConfigError(
                        f"{self.path}: this run-dir holds a run with a different "
                        f"run config ({', '.join(changed)}); resume with the same "
                        "settings, choose another `run-dir`, or set "
                        "`resume-changed-config=true` to continue under the new ones"
                    )
        write_atomic(path, json_bytes(dict(run_config)))


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """The run record of the run folder ``run_dir``; ConfigError when the
    folder has none or it does not read (a resume uses
    :meth:`RunFolder.read_record`, which starts afresh instead)."""
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {RUN_RECORD}; give a federated run folder")
    record = read_record(path, "a run record")
    rounds = record.get("rounds", [])
    if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
        raise ConfigError(
            f"{path}: `rounds` is not a list of round entries; the run record is "
            "damaged (the checkpoints beside it are kept)"
        )
    return record


def expert_support(rounds: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Per regimen, the most patients that trained its expert in one round of a
    run record (rounds that train the pCR part: joint or heads)."""
    out = dict.fromkeys(REGIMENS, 0)
    for entry in rounds:
        if entry.get("stage", "joint") not in ("joint", "heads"):
            continue
        for r in REGIMENS:
            group = entry.get("groups", {}).get(expert_group(r), {})
            if group.get("updated"):
                out[r] = max(out[r], int(group.get("n", 0)))
    return out


def account_epsilon(entry: Any) -> float | None:
    """The epsilon of a run record's site entry (``{"privacy": {...}}``), or
    None when it has no readable DP account (records are read defensively: a
    folder written by an older version, or edited, must not break a report)."""
    account = entry.get("privacy") if isinstance(entry, dict) else None
    epsilon = account.get("epsilon") if isinstance(account, dict) else None
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        return None
    return float(epsilon)


def privacy_spent(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each DP site's latest accounting in a run record, with its rounds
    trained; entries without a readable account are skipped."""
    out: dict[str, dict[str, Any]] = {}
    for r in record.get("rounds", []):
        if not isinstance(r, dict):
            continue
        for key, trained in (("sites", 1), ("declined", 0)):
            entries = r.get(key)
            for site, m in (entries if isinstance(entries, dict) else {}).items():
                if account_epsilon(m) is None:
                    continue
                prev = out.get(site, {}).get("rounds_trained", 0)
                out[site] = {
                    **out.get(site, {}),
                    **m["privacy"],
                    "rounds_trained": prev + trained,
                }
    return out
