"""Federated planning over Flower's simulation runtime: `moefl plan
--simulate` equals the plan read on one machine, and a run without a plan
starts with the planning query (under DP, charged once to each site's
ledger, and not asked again on a resume)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from client.privacy.ledger import PrivacyLedger
from shared_model.errors import MoeflError
from shared_model.plan import Plan
from simulations.simulate import run_simulated_federation

pytestmark = pytest.mark.integration
SITES = ["sah_sysu", "sysucc", "west_china"]


def test_the_planning_query_gives_the_plan_read_on_one_machine(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    sites = str(tiny_cohort / "site_configs")
    local = runner.invoke(app, ["plan", sites, "--out", str(tmp_path / "a/plan.json")])
    assert local.exit_code == 0, local.output
    federated = runner.invoke(
        app, ["plan", sites, "--simulate", "--out", str(tmp_path / "b/plan.json")]
    )
    assert federated.exit_code == 0, federated.output
    a = json.loads((tmp_path / "a/plan_fingerprint.json").read_text())
    b = json.loads((tmp_path / "b/plan_fingerprint.json").read_text())
    assert a["plan"] == b["plan"] and a["fingerprint"] == b["fingerprint"]
    assert b["sites"] == SITES and b["cases"] == a["cases"] and not b["excluded"]
    assert b["identified_by"] == "simulation" and not b["privacy"]
    assert Plan.load(tmp_path / "b/plan.json") == Plan.from_dict(a["plan"])


def test_a_run_without_a_plan_asks_the_sites_first_and_once(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_cohort, tmp_path / "cohort")
    (tmp_path / "cohort" / "plan.json").unlink()  # no preset: the sites decide
    config = {
        "num-server-rounds": 1,
        "local-steps": 1,
        "training": "joint",
        "base-filters": 4,
        "max-filters": 16,
        "evaluate-every": 0,
    }
    record = run_simulated_federation(tmp_path, preset="tiny", overrides=config)
    planning = record["planning"]
    assert planning["sites"] == SITES and sum(planning["cases"].values()) == 33
    assert "fingerprint" not in planning  # the histograms stay in their own file
    run = tmp_path / "federated"
    plan = Plan.load(run / "plan.json")
    assert plan.to_dict() == planning["plan"]
    assert plan.patch_size == (12, 40, 40) and plan.spacing == (3.0, 2.5, 2.5)
    assert json.loads((run / "config.json").read_text())["model"]["patch_size"] == [
        12,
        40,
        40,
    ]
    resumed = run_simulated_federation(
        tmp_path, preset="tiny", overrides={**config, "num-server-rounds": 2}
    )
    assert resumed["planning"] == planning  # the same plan, not asked again
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]


def test_dp_sites_pay_for_their_fingerprints_once_and_too_few_cases_fail_clearly(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    """Ten patients a site are under the noise floor at any usual budget: the
    run stops before any round and says what to do; each site paid once."""
    shutil.copytree(tiny_cohort, tmp_path / "cohort")
    (tmp_path / "cohort" / "plan.json").unlink()
    privacy = {"target_epsilon": 3.0, "delta": 1e-3, "max_grad_norm": 1.0}
    config = {"training": "joint", "num-server-rounds": 1}
    with pytest.raises(MoeflError, match="too few cases to plan from"):
        run_simulated_federation(
            tmp_path, preset="tiny", overrides=config, privacy=privacy
        )
    for site in SITES:
        ledger = PrivacyLedger.for_site(tmp_path / "federated" / "sites" / site)
        assert [e["kind"] for e in ledger.entries] == ["fingerprint"]
        assert 0.9 < ledger.epsilon(1e-3) <= 1.0  # privacy.fingerprint_epsilon
    assert not (tmp_path / "federated" / "checkpoints").exists()
