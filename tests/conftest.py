"""Shared fixtures: a tiny synthetic cohort made once per test session."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` preset (seed 0) with images. Treat as read-only."""
    from simulations.synth import synthesize

    out = tmp_path_factory.mktemp("tiny") / "cohort"
    synthesize(out, preset="tiny", seed=0, workers=2)
    return out


@pytest.fixture()
def tiny_copy(tiny_cohort: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the tiny cohort (sites and site configs)."""
    dst = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, dst, ignore=shutil.ignore_patterns("runs"))
    return dst


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Skip `gpu` tests where no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def flower_task_identity() -> Iterator[None]:
    """Flower's Message reads the running task's identity, which only its runtime
    sets; give the in-process loop one."""
    from simulations.hostile_run import in_process_task

    with in_process_task():
        yield
