"""Secure aggregation end to end: the coordinator's loop against the sites' real
ClientApp (in process, and once in Flower's simulation), on the tiny cohort."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from flwr.app import Message
from safetensors.numpy import load_file

from client.data.site_config import load_site_config
from client.node.client_app import app
from secagg.records import MASKED_TRAIN, SHARES_QUERY, UNMASK_QUERY
from server.server_app import run_federation
from simulations.hostile_run import in_process_task
from simulations.in_process import FIRST_NODE, InProcessGrid, node_sites_of

pytestmark = pytest.mark.integration
NCT_SITE = "west_china"  # the tiny cohort's one site with nCT patients
CLIP = 10.0


@pytest.fixture()
def cohort(tiny_cohort: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, dst, ignore=shutil.ignore_patterns("runs"))
    return dst


def _set_site(cohort: Path, site: str, **values: Any) -> None:
    for path in (cohort / "site_configs").glob("*.yaml"):
        raw = yaml.safe_load(path.read_text())
        if raw["site_name"] == site:
            path.write_text(yaml.safe_dump({**raw, **values}))


def _run(
    cohort: Path,
    name: str,
    *,
    observe: Callable[[Message], None] | None = None,
    drop: Callable[[int, str, int], bool] | None = None,
    **override: Any,
) -> tuple[dict[str, Any], Path, InProcessGrid]:
    yamls = sorted((cohort / "site_configs").glob("*.yaml"))
    names = {FIRST_NODE + i: load_site_config(p).site_name for i, p in enumerate(yamls)}
    config = {
        "cohort-dir": str(cohort),
        "run-dir": str(cohort.parent / name),
        "num-server-rounds": 1,
        "training": "joint",
        "resume": False,
        "evaluate-every": 0,
        "base-filters": 2,
        "max-filters": 4,
        "local-steps": 2,
        "client-dp-clip": CLIP,
        "dp-reproducible": True,
        **override,
    }
    grid = InProcessGrid(app, len(yamls), observe=observe, drop=drop)
    with in_process_task():
        record = run_federation(grid, config, node_sites_of(names))  # type: ignore[arg-type]
    return record, cohort.parent / name, grid


def _round1(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "checkpoints" / "round_001.safetensors"))


def _node(cohort: Path, site: str) -> int:
    yamls = sorted((cohort / "site_configs").glob("*.yaml"))
    sites = [load_site_config(p).site_name for p in yamls]
    return FIRST_NODE + sites.index(site)


def _max_diff(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], skip: str = ""
) -> float:
    return max(
        float(np.max(np.abs(a[k].astype(np.float64) - b[k])))
        for k in a
        if not (skip and skip in k)
    )


def test_the_secure_aggregate_is_the_plain_one_and_records_its_waves(
    cohort: Path,
) -> None:
    _set_site(cohort, NCT_SITE, secure_aggregation={"small_groups": "clear"})
    plain, plain_run, _ = _run(cohort, "plain")
    secure, secure_run, grid = _run(cohort, "secure", **{"secure-aggregation": True})
    entry = secure["rounds"][0]
    assert entry["updated"] and not entry["excluded"]
    waves = entry["secure_aggregation"]
    assert waves["waves"] == 4 and waves["threshold"] == 2 and waves["skipped"] is None
    assert waves["sites"] == {"keys": 3, "shares": 3, "masked": 3, "unmasked": 3}
    # the nCT expert has one site: not summed; that site's YAML consents to clear
    assert waves["small_groups"] == {NCT_SITE: {"expert/nCT": "clear"}}
    assert waves["quantization_bound"] < 1e-9
    # the same weights, to float32 storage (the weights are about 0.1-1)
    assert _max_diff(_round1(secure_run), _round1(plain_run)) < 1e-6
    for g in ("shared", "expert/nCRT", "expert/TNT", "expert/nCT"):
        assert entry["groups"][g]["n"] == plain["rounds"][0]["groups"][g]["n"]
    assert grid.sent.count(MASKED_TRAIN) == 3 and "train" not in grid.sent


def test_the_coordinator_holds_nothing_like_a_sites_update(cohort: Path) -> None:
    plain_replies: list[Message] = []
    secure_replies: list[Message] = []
    _, plain_run, _ = _run(cohort, "plain", observe=plain_replies.append)
    start = load_file(str(plain_run / "checkpoints" / "round_001.safetensors"))
    updates = {}
    for reply in plain_replies:  # each site's update, in the clear
        arrays = reply.content.array_records["arrays"]
        updates[reply.metadata.src_node_id] = np.concatenate(
            [arrays[k].numpy().ravel().astype(np.float64) for k in sorted(arrays)]
        )
    _run(
        cohort, "secure", observe=secure_replies.append, **{"secure-aggregation": True}
    )
    seen = [
        (r.metadata.src_node_id, a.numpy())
        for r in secure_replies
        for record in r.content.array_records.values()
        for a in record.values()
    ]
    assert seen and start  # masked vectors arrived
    for node, array in seen:
        update = updates[node]
        values = array.astype(np.float64).ravel()
        assert values.size != update.size or not np.allclose(values, update)
        for half in np.array_split(values, 2):
            n = min(half.size, update.size)
            r = np.corrcoef(half[:n], update[:n])[0, 1]
            assert abs(r) < 0.1, (node, r)
    # no counts, steps or losses travel beside them
    for r in secure_replies:
        for record in r.content.metric_records.values():
            assert all(not k.startswith("n-") or v == 0 for k, v in record.items())
            assert "train-loss" not in record and "steps" not in record


def test_a_site_dropping_after_the_key_exchange_or_after_its_input(
    cohort: Path,
) -> None:
    gone = _node(cohort, "sysucc")
    secure, _, grid = _run(
        cohort,
        "dropped_keys",
        drop=lambda node, kind, rnd: node == gone and kind == SHARES_QUERY,
        **{"secure-aggregation": True},
    )
    waves = secure["rounds"][0]["secure_aggregation"]
    assert waves["sites"] == {"keys": 3, "shares": 2, "masked": 2, "unmasked": 2}
    assert secure["rounds"][0]["updated"]
    assert sorted(secure["rounds"][0]["sites"]) == ["sah_sysu", "west_china"]
    _, plain_run, _ = _run(cohort, "plain")
    late, late_run, grid = _run(
        cohort,
        "dropped_input",
        drop=lambda node, kind, rnd: node == gone and kind == UNMASK_QUERY,
        **{"secure-aggregation": True},
    )
    waves = late["rounds"][0]["secure_aggregation"]
    assert waves["sites"] == {"keys": 3, "shares": 3, "masked": 3, "unmasked": 2}
    # its input arrived: the sum is all three sites', unmasked without it
    assert _max_diff(_round1(late_run), _round1(plain_run), skip="nCT") < 1e-6


def test_below_the_threshold_nothing_is_unmasked(cohort: Path) -> None:
    keep = _node(cohort, "sah_sysu")
    record, _, grid = _run(
        cohort,
        "below",
        drop=lambda node, kind, rnd: node != keep and kind == MASKED_TRAIN,
        **{"secure-aggregation": True},
    )
    entry = record["rounds"][0]
    assert (
        not entry["updated"]
        and "nothing was unmasked" in entry["secure_aggregation"]["skipped"]
    )
    assert UNMASK_QUERY not in grid.sent


def test_a_site_requiring_secure_aggregation_refuses_a_plain_round(
    cohort: Path,
) -> None:
    _set_site(cohort, "sysucc", secure_aggregation="required")
    plain, _, _ = _run(cohort, "plain")
    reason = " ".join(plain["rounds"][0]["excluded"]["sysucc"])
    assert "1005" in reason and "secure" in reason
    secure, _, _ = _run(cohort, "secure", **{"secure-aggregation": True})
    assert "sysucc" in secure["rounds"][0]["sites"]


def test_distributed_dp_noise_matches_the_central_noise_it_replaces(
    cohort: Path,
) -> None:
    noise = {"client-dp-noise-multiplier": 0.5, "client-dp-clip": 0.05}
    central, central_run, _ = _run(cohort, "central", **noise)
    dist, dist_run, _ = _run(cohort, "dist", **noise, **{"secure-aggregation": True})
    dp = dist["rounds"][0]["client_dp"]
    assert dp["distributed"] and dp["releases"] == 1
    assert dp["contributing_sites"]["shared"] == 3
    assert dp["epsilon"] == central["rounds"][0]["client_dp"]["epsilon"]
    # shared group: 3 sites, threshold 2; each site adds (z C)^2 / 2, so the
    # sum's noise is 3/2 of the central (z C)^2; on the mean, both over 3
    a, b = _round1(dist_run), _round1(central_run)
    diff = np.concatenate(
        [
            (a[k].astype(np.float64) - b[k]).ravel()
            for k in a
            if k.startswith("backbone")
        ]
    )
    expected = 0.5 * 0.05 * np.sqrt(3 / 2 + 1) / 3
    assert diff.size > 2000
    assert abs(np.std(diff) / expected - 1) < 0.1
    assert dp["noise_std"]["shared"] == pytest.approx(0.5 * 0.05 * np.sqrt(3 / 2) / 3)


def test_a_secure_round_in_flowers_simulation(cohort: Path) -> None:
    from simulations.simulate import run_simulated_federation

    root = cohort.parent / "flower"
    shutil.copytree(cohort, root / "cohort")
    record = run_simulated_federation(
        root,
        preset="tiny",
        overrides={
            "num-server-rounds": 2,
            "base-filters": 2,
            "max-filters": 4,
            "training": "joint",
            "local-steps": 2,
            "evaluate-every": 0,
            "secure-aggregation": True,
            "client-dp-clip": CLIP,
        },
    )
    assert record["status"] == "finished"
    for entry in record["rounds"]:  # the site keeps its keys across waves
        assert (
            entry["updated"] and entry["secure_aggregation"]["sites"]["unmasked"] == 3
        )


def test_a_small_group_released_with_dp_or_withheld(cohort: Path) -> None:
    _, plain_run, _ = _run(cohort, "plain")
    withheld, withheld_run, _ = _run(cohort, "withheld", **{"secure-aggregation": True})
    entry = withheld["rounds"][0]
    assert entry["secure_aggregation"]["small_groups"] == {
        NCT_SITE: {"expert/nCT": "withhold"}
    }
    assert entry["groups"]["expert/nCT"]["updated"] is False
    other = cohort.parent / "dp_cohort" / "cohort"  # sites load their YAML once
    shutil.copytree(cohort, other, ignore=shutil.ignore_patterns("runs"))
    _set_site(other, NCT_SITE, secure_aggregation={"small_groups": "dp"})
    dp, dp_run, _ = _run(other, "dp", **{"secure-aggregation": True})
    assert dp["rounds"][0]["secure_aggregation"]["small_groups"] == {
        NCT_SITE: {"expert/nCT": "dp"}
    }
    a, b = _round1(dp_run), _round1(plain_run)
    noise = np.concatenate(
        [(a[k].astype(np.float64) - b[k]).ravel() for k in a if "experts.nCT" in k]
    )
    assert noise.size > 40
    assert abs(np.std(noise) / CLIP - 1) < 0.3  # noise 1 x clip; 43 draws: se 11 %
    assert _max_diff(_round1(withheld_run), b, skip="nCT") < 1e-6


def test_a_required_site_refuses_the_newton_fits_clear_sums(cohort: Path) -> None:
    _set_site(cohort, "sysucc", secure_aggregation="required")
    record, _, _ = _run(
        cohort,
        "staged",
        training="staged",
        **{"secure-aggregation": True, "min-sites": 2, "newton-rounds": 2},
    )
    assert record["status"] == "finished"
    assert "sysucc" in record["rounds"][0]["sites"]  # its secure round
    excluded = record["advice"]["fit"]["excluded"]
    assert "sysucc" in excluded and "1005" in excluded["sysucc"]


def test_head_rounds_are_securely_aggregated_too(cohort: Path) -> None:
    record, _, grid = _run(
        cohort,
        "heads",
        training="staged",
        **{"secure-aggregation": True, "head-fit": "rounds", "head-rounds": 1},
    )
    stages = [(r["stage"], r["updated"]) for r in record["rounds"]]
    assert stages == [("segmentation", True), ("heads", True)]
    heads = record["rounds"][1]
    assert heads["groups"]["expert/TNT"]["updated"]
    assert heads["secure_aggregation"]["small_groups"] == {
        NCT_SITE: {"expert/nCT": "withhold"}
    }
    assert grid.sent.count(MASKED_TRAIN) == 6 and "train" not in grid.sent
