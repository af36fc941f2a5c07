"""The federation's plan from aggregate fingerprints: nnU-Net v2's rules on
histograms, no per-case list, and agreement with nnU-Net's own planner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.checks.fingerprint import site_fingerprint
from client.data.site_config import load_site_config
from shared_model.fingerprint import (
    REFERENCE_VOXELS,
    Fingerprint,
    feature_map_voxels,
    plan_from_fingerprint,
    target_spacing,
    topology,
)

# nnU-Net v2 2.8.1 (fingerprint extraction and ExperimentPlanner, 3d_fullres) run
# on the tiny preset's seed-0 sites, each alone and pooled: (spacing, patch).
NNUNET = {
    "west_china": ((3.0, 2.2, 2.2), (12, 40, 40)),
    "sysucc": ((3.0, 2.5, 2.5), (12, 40, 40)),
    "sah_sysu": ((3.0, 3.0, 3.0), (10, 32, 32)),
    "pooled": ((3.0, 2.5, 2.5), (12, 40, 40)),
}


def _site_fingerprints(cohort: Path) -> dict[str, Fingerprint]:
    return {
        load_site_config(y).site_name: site_fingerprint(load_site_config(y))
        for y in sorted((cohort / "site_configs").glob("*.yaml"))
    }


def test_plans_agree_with_nnunet_on_each_site_and_pooled(tiny_cohort: Path) -> None:
    fps = _site_fingerprints(tiny_cohort)
    pooled = fps["west_china"].merge(fps["sysucc"]).merge(fps["sah_sysu"])
    assert pooled.n_cases == sum(fp.n_cases for fp in fps.values())
    for name, fp in {**fps, "pooled": pooled}.items():
        plan = plan_from_fingerprint(fp)
        spacing, patch = NNUNET[name]
        assert np.allclose(plan.spacing, spacing, rtol=0.1), (name, plan)
        assert plan.patch_size == patch, (name, plan)


def test_a_fingerprint_does_not_grow_with_the_cases(tiny_cohort: Path) -> None:
    fps = _site_fingerprints(tiny_cohort)
    one = json.dumps(fps["sah_sysu"].to_values())
    pooled = fps["sah_sysu"].merge(fps["west_china"]).merge(fps["sysucc"])
    assert len(json.dumps(pooled.to_values())) == pytest.approx(len(one), rel=0.02)
    assert {k: np.shape(v) for k, v in pooled.histograms.items()} == {
        k: np.shape(v) for k, v in fps["sah_sysu"].histograms.items()
    }
    assert Fingerprint.from_values(pooled.to_values()).to_values() == pooled.to_values()


@pytest.mark.parametrize(
    "change",
    [
        {"n_cases": 0},
        {"n_cases": True},
        {"spacing": [[1, 2]]},
        {"size": "counts"},
    ],
)
def test_a_malformed_fingerprint_is_refused(change: dict, tiny_cohort: Path) -> None:
    values = _site_fingerprints(tiny_cohort)["sysucc"].to_values()
    with pytest.raises(ValueError):
        Fingerprint.from_values({**values, **change})
    bad = json.loads(json.dumps(values))
    bad["extent"][0][0] = -1
    with pytest.raises(ValueError, match="whole counts"):
        Fingerprint.from_values(bad)


def test_thick_slices_take_the_tenth_percentile() -> None:
    rng = np.random.default_rng(0)
    z = rng.uniform(4.0, 7.0, 40)
    spacings = np.stack([z, np.full(40, 0.5), np.full(40, 0.5)], axis=1)
    sizes = np.tile([20, 512, 512], (40, 1))
    target = target_spacing(Fingerprint.of(spacings, sizes))
    assert target[0] == pytest.approx(np.quantile(z, 0.1), abs=0.05)
    assert target[0] < np.median(z)
    assert target[1:] == pytest.approx([0.5, 0.5])


def test_a_large_image_gets_a_patch_within_the_memory_budget() -> None:
    spacings = np.tile([1.0, 1.0, 1.0], (10, 1))
    sizes = np.tile([400, 400, 400], (10, 1))
    plan = plan_from_fingerprint(Fingerprint.of(spacings, sizes))
    strides, padded = topology(np.array(plan.spacing), list(plan.patch_size))
    assert list(plan.patch_size) == padded
    assert feature_map_voxels(padded, strides) <= REFERENCE_VOXELS
    assert max(plan.patch_size) < 400  # shrunk from the 256^3 start


def test_moefl_plan_writes_the_plan_and_its_fingerprint(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from cli.main import app
    from shared_model.plan import Plan

    out = tmp_path / "plan.json"
    result = CliRunner().invoke(
        app, ["plan", str(tiny_cohort / "site_configs"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    plan = Plan.load(out)
    assert plan.patch_size == NNUNET["pooled"][1]
    record = json.loads((tmp_path / "plan_fingerprint.json").read_text())
    assert record["sites"] == ["sah_sysu", "sysucc", "west_china"]
    assert Fingerprint.from_values(record["fingerprint"]).n_cases == sum(
        record["cases"].values()
    )
