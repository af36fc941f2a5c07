"""A coordinator killed at any write of its run folder resumes to the same model.

The coordinator's loop (:func:`server.server_app.run_federation`) runs in
process against a fake grid of three deterministic sites (no Ray, no
training): each answers a round with the weights it received moved by a
site- and round-specific amount that depends on those weights, so a resume
from the wrong round, or with the wrong FedAdam moments, changes the final
model. Every file of the run folder goes through
:func:`shared_model.durable.write_atomic` (as :mod:`server.run_folder` imports
it); the test kills the coordinator at each of those writes in turn, once
mid-write (a torn temporary file is left beside an untouched target, as a
real kill would leave it) and once just after the write, then resumes the
same run folder to completion and checks:

* the final weights (``model.safetensors`` and the last round's checkpoint)
  are bit-identical to those of an uninterrupted run;
* ``metrics.json`` says ``finished`` and holds each round exactly once, in
  order, with the same content as the uninterrupted run's (timings aside);
* ``config.json`` and ``plan.json`` match the uninterrupted run's;
* the run folder's lock is free afterwards.

The kill is a ``BaseException``, so the loop's ``except Exception`` handler
(which records the run as failed) does not run, as with a real kill. Runs both
FedAvg and FedAdam (whose moments file is then among the writes).

A one-round run killed just after its marker resumes with its model in place.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from safetensors.numpy import load

import server.run_folder
from server.run_folder import RunFolder
from server.server_app import run_federation
from shared_model.federation_config import FederationConfig
from shared_model.messages import COUNT_KEYS, GROUPS, SHARED, expert_group
from shared_model.model import build_model
from shared_model.model_config import model_config_for
from shared_model.parameter_groups import parameter_groups
from shared_model.plan import PRESET_PLANS, Plan

ROUNDS = 3
SITES = ("alpha", "bravo", "charlie")
EXPERTS = {"alpha": "nCRT", "bravo": "TNT"}  # sites that also train an expert
STRATEGIES = ("fedavg", "fedadam")
VARIANTS = ("during", "after")


class Killed(BaseException):
    """The coordinator's process dies here (not an Exception: no handler runs)."""


@dataclass(frozen=True)
class Node:
    node_id: int
    name: str = ""


class FakeGrid:
    """Three honest, deterministic sites behind Flower's Grid interface.

    Each replies as a real site does (arrays, metrics with the counts, info
    with its name): every site trains the shared group, two also an expert,
    and uploads those groups whole. What it uploads depends on the weights it
    received and on the round.
    """

    def __init__(self, groups: Mapping[str, list[str]]) -> None:
        self.groups = groups
        self.sites = {100 + i: name for i, name in enumerate(SITES)}

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def get_nodes(self) -> list[Node]:
        return [Node(node_id, name) for node_id, name in self.sites.items()]

    def send_and_receive(
        self, messages: list[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return [self._train(msg) for msg in messages]

    def _train(self, msg: Message) -> Message:
        assert msg.metadata.message_type == "train"
        site = self.sites[msg.metadata.dst_node_id]
        index = SITES.index(site)
        rnd = int(msg.content.config_records["config"]["server-round"])
        received = {
            k: v.numpy() for k, v in msg.content.array_records["arrays"].items()
        }
        counts = {SHARED: 10 + 5 * index}
        if site in EXPERTS:
            counts[expert_group(EXPERTS[site])] = 7 + index
        scale = np.float32(1.0 - 0.01 * (index + 1))
        shift = np.float32(0.001 * rnd * (index + 1))
        upload = {
            n: (received[n] * scale + np.sin(received[n] + shift) * shift).astype(
                np.float32
            )
            for g in counts
            for n in self.groups[g]
        }
        values = {COUNT_KEYS[g]: int(counts.get(g, 0)) for g in GROUPS}
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in upload.items()}),
                "metrics": MetricRecord({**values, "steps": 1, "seconds": 0.0}),
                "info": ConfigRecord({"site": site}),
            }
        )
        return Message(content, reply_to=msg)


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity: None) -> None:
    """Messages built in-process need a task identity (tests/conftest.py)."""


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    PRESET_PLANS["tiny"].save(path)
    return path


@pytest.fixture(scope="module")
def groups(plan_file: Path) -> dict[str, list[str]]:
    """The federation model's parameter groups (joint: every round trains all)."""
    fed = FederationConfig.from_run_config(
        _run_config(Path("run"), plan_file, "fedavg")
    )
    return parameter_groups(build_model(model_config_for(fed, Plan.load(plan_file))))


def _run_config(run_dir: Path, plan: Path, strategy: str) -> dict[str, Any]:
    return {
        "run-dir": str(run_dir),
        "plan": str(plan),
        "num-server-rounds": ROUNDS,
        "training": "joint",
        "strategy": strategy,
        "server-lr": 0.05,
        "min-sites": 3,
        "resume": True,
        "evaluate-every": 0,
        "base-filters": 2,
        "max-filters": 4,
    }


Writer = Callable[[Path, bytes], None]
ORIGINAL_WRITE: Writer = server.run_folder.write_atomic


def _recording(written: list[str], root: Path) -> Writer:
    def write(path: Path, data: bytes) -> None:
        written.append(Path(path).resolve().relative_to(root.resolve()).as_posix())
        ORIGINAL_WRITE(path, data)

    return write


def _killing(at: int, variant: str, written: list[str], root: Path) -> Writer:
    """``write_atomic`` that dies at its ``at``-th call (1-based)."""

    def write(path: Path, data: bytes) -> None:
        path = Path(path)
        written.append(path.resolve().relative_to(root.resolve()).as_posix())
        if len(written) < at:
            ORIGINAL_WRITE(path, data)
            return
        if variant == "during":
            # killed mid-write: half a temporary file, the target untouched
            torn = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            torn.write_bytes(data[: len(data) // 2])
        else:
            ORIGINAL_WRITE(path, data)
        raise Killed(f"killed at write {at} ({written[-1]}, {variant})")

    return write


@dataclass
class Outcome:
    weights: dict[str, np.ndarray]
    last_checkpoint: dict[str, np.ndarray]
    record: dict[str, Any]
    config: Any
    plan: Any


def _outcome(run_dir: Path) -> Outcome:
    return Outcome(
        weights=load((run_dir / "model.safetensors").read_bytes()),
        last_checkpoint=load(
            (run_dir / "checkpoints" / f"round_{ROUNDS:03d}.safetensors").read_bytes()
        ),
        record=json.loads((run_dir / "metrics.json").read_text()),
        config=json.loads((run_dir / "config.json").read_text()),
        plan=json.loads((run_dir / "plan.json").read_text()),
    )


def _differences(got: Outcome, ref: Outcome) -> list[str]:
    """What a resumed run's folder has that the uninterrupted run's has not."""
    out = []
    rounds = [r.get("round") for r in got.record.get("rounds", [])]
    if rounds != list(range(1, ROUNDS + 1)):
        out.append(f"metrics.json has rounds {rounds}")
    if got.record.get("status") != "finished":
        out.append(f"metrics.json says {got.record.get('status')!r}")
    for label, arrays in (
        ("model.safetensors", got.weights),
        (f"round_{ROUNDS:03d}.safetensors", got.last_checkpoint),
    ):
        if sorted(arrays) != sorted(ref.weights):
            out.append(f"{label} holds other arrays")
        elif any(not np.array_equal(arrays[k], v) for k, v in ref.weights.items()):
            out.append(f"{label} holds other weights")
    if _without_timings(got.record) != _without_timings(ref.record):
        lost = sorted(set(ref.record) - set(got.record))
        out.append(f"metrics.json differs (lacks {lost})")
    if got.config != ref.config:
        out.append("config.json differs")
    if got.plan != ref.plan:
        out.append("plan.json differs")
    return out


def _without_timings(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@dataclass
class Reference:
    outcome: Outcome
    writes: list[str]


@pytest.fixture(scope="module")
def references(
    plan_file: Path,
    groups: dict[str, list[str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], Reference]:
    """The uninterrupted run of each strategy, made once when first asked for."""
    made: dict[str, Reference] = {}

    def reference(strategy: str) -> Reference:
        if strategy not in made:
            run_dir = tmp_path_factory.mktemp(f"reference-{strategy}") / "run"
            written: list[str] = []
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(
                    server.run_folder, "write_atomic", _recording(written, run_dir)
                )
                record = run_federation(
                    FakeGrid(groups), _run_config(run_dir, plan_file, strategy)
                )
            assert record["status"] == "finished"
            made[strategy] = Reference(_outcome(run_dir), written)
        return made[strategy]

    return reference


def _expected_writes(strategy: str) -> list[str]:
    """The run folder's writes, in order, for an uninterrupted run."""
    out = ["run_config.json"]
    for rnd in range(1, ROUNDS + 1):
        ckpt = f"checkpoints/round_{rnd:03d}"
        out += [f"{ckpt}.safetensors"]
        if strategy == "fedadam":
            out += [f"{ckpt}.adam.safetensors"]
        out += [
            "metrics.json",
            "model.safetensors",
            "config.json",
            "plan.json",
            f"{ckpt}.state.json",
        ]
    return [*out, "metrics.json"]


def test_the_reference_run_writes_each_file_once_per_round(
    references: Callable[[str], Reference],
) -> None:
    for strategy in STRATEGIES:
        ref = references(strategy)
        assert ref.writes == _expected_writes(strategy)
        assert ref.outcome.record["status"] == "finished"
        assert [r["round"] for r in ref.outcome.record["rounds"]] == [1, 2, 3]
        assert all(r["updated"] for r in ref.outcome.record["rounds"])
        for name, value in ref.outcome.weights.items():
            assert np.array_equal(value, ref.outcome.last_checkpoint[name]), name
    fedavg, fedadam = (references(s).outcome.weights for s in STRATEGIES)
    assert any(not np.array_equal(fedavg[k], fedadam[k]) for k in fedavg)


def _case(strategy: str, k: int, variant: str) -> Any:
    """One kill point, named by the file being written."""
    writes = _expected_writes(strategy)
    return pytest.param(
        strategy, k, variant, id=f"{strategy}-{k:02d}-{writes[k - 1]}-{variant}"
    )


CASES = [
    _case(strategy, k, variant)
    for strategy in STRATEGIES
    for k in range(1, len(_expected_writes(strategy)) + 1)
    for variant in VARIANTS
]


@pytest.mark.parametrize(("strategy", "k", "variant"), CASES)
def test_a_kill_at_any_write_resumes_to_the_same_model(
    strategy: str,
    k: int,
    variant: str,
    plan_file: Path,
    groups: dict[str, list[str]],
    references: Callable[[str], Reference],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = references(strategy)
    run_dir = tmp_path / "run"
    run_config = _run_config(run_dir, plan_file, strategy)
    written: list[str] = []
    monkeypatch.setattr(
        server.run_folder, "write_atomic", _killing(k, variant, written, run_dir)
    )
    with pytest.raises(Killed):
        run_federation(FakeGrid(groups), run_config)
    assert written[-1] == _expected_writes(strategy)[k - 1]
    # a kill runs no handler: the record is never marked failed
    assert RunFolder(run_dir).read_record().get("status") != "failed"

    monkeypatch.setattr(server.run_folder, "write_atomic", ORIGINAL_WRITE)
    record = run_federation(FakeGrid(groups), run_config)
    assert record["status"] == "finished"

    problems = _differences(_outcome(run_dir), ref.outcome)
    assert not problems, "; ".join(problems)
    with RunFolder(run_dir).locked():  # the lock is free
        pass
    assert not list(run_dir.rglob(".*.tmp"))  # a torn temporary is cleared


def test_a_one_round_run_killed_after_its_marker_resumes_with_its_model(
    plan_file: Path,
    groups: dict[str, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir = tmp_path / "run"
    run_config = {**_run_config(run_dir, plan_file, "fedavg"), "num-server-rounds": 1}
    marker = _expected_writes("fedavg").index("checkpoints/round_001.state.json") + 1
    written: list[str] = []
    monkeypatch.setattr(
        server.run_folder, "write_atomic", _killing(marker, "after", written, run_dir)
    )
    with pytest.raises(Killed):
        run_federation(FakeGrid(groups), run_config)
    monkeypatch.setattr(server.run_folder, "write_atomic", ORIGINAL_WRITE)
    assert run_federation(FakeGrid(groups), run_config)["status"] == "finished"

    checkpoint = load((run_dir / "checkpoints/round_001.safetensors").read_bytes())
    assert (run_dir / "model.safetensors").is_file()  # what `moefl predict` reads
    weights = load((run_dir / "model.safetensors").read_bytes())
    assert all(np.array_equal(weights[k], v) for k, v in checkpoint.items())
    assert (run_dir / "config.json").is_file() and (run_dir / "plan.json").is_file()
