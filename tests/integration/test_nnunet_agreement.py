"""nnU-Net v2's own tools on the tiny cohort: its fingerprint extraction and
default planner (``ExperimentPlanner``, 3d_fullres) on the training sites'
cases pooled agree with ``moefl plan`` on the same sites' merged aggregate
fingerprints, and every synthetic site passes nnU-Net's dataset check.

nnU-Net is a development dependency that ``make venv`` installs (see the
Makefile); without it these tests skip.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import reduce
from pathlib import Path

import pytest

from client.checks.fingerprint import site_fingerprint
from client.data.site_config import load_site_config
from shared_model.fingerprint import Fingerprint, plan_from_fingerprint
from simulations.benchmarks.nnunet_reference import (
    agreement,
    nnunet_plan,
    nnunet_settings,
    shown,
    training_sites,
)

pytest.importorskip("nnunetv2")

POOLED_ID = 990


@pytest.fixture(scope="module")
def nnunet_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """nnU-Net's folders under a temporary root and its settings
    (:func:`nnunet_settings`), set before any of its modules is imported (it
    reads them on import)."""
    root = tmp_path_factory.mktemp("nnunet")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in nnunet_settings(root).items():
            mp.setenv(name, value)
        yield root


def test_moefl_plan_agrees_with_nnunet_planner_on_pooled_sites(
    tiny_cohort: Path, nnunet_env: Path
) -> None:
    configs = training_sites(tiny_cohort)
    assert len(configs) >= 2
    # nnU-Net's plan of the pooled cases, in moefl's (D, H, W) (the axis mapping
    # and its checks: simulations/benchmarks/nnunet_reference.py)
    reference = nnunet_plan(configs, POOLED_ID, "TinyPooled")

    pooled = reduce(Fingerprint.merge, [site_fingerprint(c) for c in configs])
    assert pooled.n_cases == reference.n_cases
    plan = plan_from_fingerprint(pooled)
    print(shown(plan, reference))
    diff = agreement(plan, reference)
    # target spacing within 10 % per axis, patch within one stride step per axis
    assert diff["spacing_ok"], shown(plan, reference)
    assert diff["patch_ok"], shown(plan, reference)


def test_every_synthetic_site_passes_nnunet_dataset_check(
    tiny_cohort: Path, nnunet_env: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import (
        verify_dataset_integrity,
    )

    yamls = sorted(tiny_cohort.glob("**/site_configs/*.yaml"))
    folders = sorted({load_site_config(y).dataset_dir for y in yamls})
    assert len(folders) >= 3
    failed = {}
    for folder in folders:
        capfd.readouterr()
        try:
            assert re.fullmatch(r"Dataset\d{3}_\w+", folder.name), "not an nnU-Net name"
            verify_dataset_integrity(str(folder), num_processes=1)
        except (AssertionError, RuntimeError, FileNotFoundError) as e:
            failed[folder.name] = f"{type(e).__name__}: {e}"
        # its workers print mismatches of origin, direction or affine as warnings
        out = capfd.readouterr()
        said = [
            line
            for line in (out.out + out.err).splitlines()
            if line.startswith(("Warning", "WARNING", "Error"))
        ]
        if said:
            failed.setdefault(folder.name, "; ".join(said))
    assert not failed, failed
