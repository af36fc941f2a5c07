"""The benchmark suite's own machinery, on the tiny cohort."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml


def _ids(site_dir: Path) -> list[str]:
    with (site_dir / "clinical.csv").open(newline="") as f:
        return [row["case_id"] for row in csv.DictReader(f)]


def test_partition_keeps_every_patient_once_and_each_site_within_one_centre(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    from client.checks.preflight import run_check
    from simulations.benchmarks.scale import partition_cohort

    yamls = partition_cohort(tiny_cohort, tmp_path / "p10", n_sites=10)
    assert len(yamls) == 10
    original: dict[str, str] = {}  # case -> adc unit of its centre
    for y in sorted((tiny_cohort / "site_configs").glob("*.yaml")):
        raw = yaml.safe_load(y.read_text())
        for cid in _ids((y.parent / raw["dataset_dir"]).resolve()):
            original[cid] = raw["adc_unit"]
    seen: list[str] = []
    for y in yamls:
        raw = yaml.safe_load(y.read_text())
        ids = _ids(y.parent / raw["dataset_dir"])
        assert len({cid.split("_")[0] for cid in ids}) == 1  # one centre's prefix
        assert {original[cid] for cid in ids} == {raw["adc_unit"]}
        assert run_check(y).ok, y
        seen += ids
    assert sorted(seen) == sorted(original)

    per = partition_cohort(tiny_cohort, tmp_path / "k4", per_site=4)
    assert [len(_ids(y.parent / f"../sites/{y.stem}")) for y in per] == [4, 4, 4]
    with pytest.raises(ValueError, match="patients"):
        partition_cohort(tiny_cohort, tmp_path / "k99", per_site=99)


def test_a_site_without_validation_patients_adds_an_empty_evaluation(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    import torch

    from client.data.site_config import load_site_config
    from client.scoring.evaluation import evaluate_site
    from shared_model.model import build_model
    from shared_model.model_config import ModelConfig
    from shared_model.plan import Plan
    from shared_model.site_evaluation import combine_by_cohort
    from simulations.benchmarks.scale import partition_cohort

    yamls = partition_cohort(tiny_cohort, tmp_path / "p", per_site=2)
    plan = Plan.load(tmp_path / "p" / "plan.json")
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_plan(plan, base_filters=4, max_filters=32))
    evaluations = []
    for y in yamls:
        cfg = load_site_config(y)
        evaluations.append(evaluate_site(model, cfg, plan, device=torch.device("cpu")))
    sizes = [sum(c.n for c in e.counts.values()) for e in evaluations]
    assert 0 in sizes and sum(sizes) > 0  # 2 patients at 0.2 leave some sites none
    report = combine_by_cohort(evaluations, 0.8)
    assert report["validation"]["n"] == sum(sizes)


def test_memory_sampler_sees_a_child_process_allocate(tmp_path: Path) -> None:
    from simulations.benchmarks.common import MemorySampler

    code = (
        "import time; x = bytearray(300 * 2**20); "
        "x[::4096] = b'1' * len(x[::4096]); time.sleep(1.5)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    with MemorySampler(root=proc.pid, interval=0.1) as mem:
        proc.wait()
    assert mem.peak_process_mib is not None and mem.peak_process_mib >= 300
    assert mem.peak_total_mib is not None and mem.peak_total_mib >= 300


def test_plain_loop_and_flower_simulation_train_the_same_weights(
    tiny_copy: Path, tmp_path: Path
) -> None:
    """The overhead benchmark compares like with like: one round through
    Flower's simulation runtime gives exactly the plain loop's weights."""
    from simulations.benchmarks.overhead import report, run_overhead

    result = run_overhead(tmp_path / "o", cohort=tiny_copy, quick=True, rounds=1)
    assert result["final_weights_max_abs_diff"] == 0.0
    sites = result["per_site"]
    assert set(sites) == {"sah_sysu", "sysucc", "west_china"}
    # the nCT expert is uploaded only where nCT patients are
    assert "expert/nCT" in sites["west_china"]["groups_up"]
    assert "expert/nCT" not in sites["sysucc"]["groups_up"]
    assert sites["sysucc"]["saved_by_groups"] > 0
    assert sites["west_china"]["array_bytes_up"] == result["raw_model_bytes"]
    # Flower's encoding adds little over the raw arrays
    for s in sites.values():
        assert s["array_bytes_up"] < s["wire_up"] < 1.1 * s["array_bytes_up"]
    assert np.isfinite(result["ratio_round_1"])
    assert "raw model" in report(result)
