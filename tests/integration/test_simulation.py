"""Flower simulation of the tiny cohort: grouped experts, records, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from shared_model.errors import MoeflError
from simulations.simulate import run_simulated_federation

pytestmark = pytest.mark.integration
SMALL = {"base-filters": 4, "max-filters": 32, "training": "joint"}
"""Small widths; joint training, whose every round trains every group (the
staged schedule has its own test)."""


@pytest.fixture()
def sim_dir(tiny_cohort: Path, tmp_path: Path) -> Path:
    shutil.copytree(tiny_cohort, tmp_path / "cohort")
    return tmp_path


def _weights(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "model.safetensors"))


def test_federation_trains_experts_only_where_their_patients_are(sim_dir: Path) -> None:
    record = run_simulated_federation(
        sim_dir, preset="tiny", overrides={"num-server-rounds": 2, **SMALL}
    )
    run = sim_dir / "federated"
    assert record["status"] == "finished" and len(record["rounds"]) == 2
    for name in (
        "model.safetensors",
        "config.json",
        "plan.json",
        "run_config.json",
        "checkpoints/round_001.safetensors",
        "checkpoints/round_002.safetensors",
    ):
        assert (run / name).is_file(), name
    r2 = record["rounds"][1]
    assert sorted(r2["sites"]) == ["sah_sysu", "sysucc", "west_china"]
    assert r2["groups"]["expert/nCT"]["sites"] == ["west_china"]
    assert r2["groups"]["shared"]["n"] == sum(
        s["n-shared"] for s in r2["sites"].values()
    )
    # sites without nCT patients do not upload the nCT expert
    assert r2["sites"]["sysucc"]["bytes_up"] < r2["sites"]["west_china"]["bytes_up"]
    assert r2["sites"]["sysucc"]["n-nCT"] == 0
    ev = r2["evaluate"]
    assert (
        ev["n"] == 7 and 0 <= ev["dice"] <= 1 and set(ev["sites"]) == set(r2["sites"])
    )
    # the model moved, and `moefl predict` can read the run folder
    from shared_model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(run)
    assert sum(p.numel() for p in model.parameters()) > 0
    first = load_file(str(run / "checkpoints" / "round_001.safetensors"))
    assert any(not np.array_equal(first[k], v) for k, v in _weights(run).items())
    nct = [k for k in first if k.startswith("experts.nCT.")]
    assert any(not np.array_equal(first[k], _weights(run)[k]) for k in nct)


def test_staged_federation_trains_heads_over_cached_features(
    sim_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Segmentation rounds leave the heads alone; head rounds leave the backbone
    bit-identical (so each site's feature cache stays valid) and train the
    experts where their patients are; the experts' support is recorded."""
    config = {
        "num-server-rounds": 2,
        "head-fit": "rounds",
        "head-type": "mlp",
        "head-rounds": 2,
        "head-epochs": 3,
        "min-expert-support": 5,
        "base-filters": 4,
        "max-filters": 32,
    }
    record = run_simulated_federation(sim_dir, preset="tiny", overrides=config)
    printed = capfd.readouterr()
    assert "DEPRECATED FEATURE" not in printed.out + printed.err  # nothing to act on
    assert "round 4/4 (heads)" in printed.out + printed.err
    assert [r["stage"] for r in record["rounds"]] == [
        "segmentation",
        "segmentation",
        "heads",
        "heads",
    ]
    ckpt = sim_dir / "federated" / "checkpoints"
    r = [load_file(str(ckpt / f"round_00{i}.safetensors")) for i in (1, 2, 3, 4)]
    backbone = [k for k in r[0] if k.startswith("backbone.")]
    heads = [k for k in r[0] if not k.startswith("backbone.")]
    assert any(not np.array_equal(r[0][k], r[1][k]) for k in backbone)
    assert all(np.array_equal(r[0][k], r[1][k]) for k in heads)
    assert all(np.array_equal(r[1][k], r[3][k]) for k in backbone)
    for prefix in ("experts.nCT.", "experts.TNT.", "prognosis.", "encode_adc."):
        keys = [k for k in heads if k.startswith(prefix)]
        assert any(not np.array_equal(r[1][k], r[3][k]) for k in keys), prefix
    r3 = record["rounds"][2]
    assert r3["groups"]["expert/nCT"]["sites"] == ["west_china"]
    assert all(s["bytes_up"] < 100_000 for s in r3["sites"].values())  # heads only
    support = {"nCRT": 14, "TNT": 9, "nCT": 3}
    assert record["expert_support"] == support
    saved = json.loads((sim_dir / "federated" / "config.json").read_text())
    assert saved["expert_support"] == support
    for site in ("sah_sysu", "sysucc", "west_china"):
        cache = sim_dir / "cohort" / "runs" / site / "feature_cache"
        assert len(list(cache.glob("train-*.safetensors"))) == 1, site
    # every round is evaluated by every site (segmentation rounds withhold advice:
    # no expert is trained yet)
    assert all(r["evaluate"]["n"] == 7 for r in record["rounds"])
    first = record["rounds"][0]["evaluate"]["policy_value"]["directions"]
    assert first["maintain"] == 7
    # in-round evaluation follows the support guard: nCT (3 patients) is not advised
    advised = record["rounds"][3]["evaluate"]["policy_value"]["recommended"]
    assert advised["nCT"] == 0 and sum(advised.values()) == 7


def test_nct_expert_changes_only_through_the_nct_site(sim_dir: Path) -> None:
    """Without the nCT site the nCT expert stays bit-for-bit at its initial value
    while everything else trains; with it (previous test) it changes."""
    (sim_dir / "cohort" / "site_configs" / "west_china.yaml").unlink()
    run_simulated_federation(
        sim_dir, preset="tiny", overrides={"num-server-rounds": 2, **SMALL}
    )
    ckpt = sim_dir / "federated" / "checkpoints"
    import torch

    from shared_model.checkpoint import load_checkpoint
    from shared_model.model import build_model
    from shared_model.model_config import ModelConfig

    model, _ = load_checkpoint(sim_dir / "federated")
    torch.manual_seed(0)  # the server seeds its initial model with the run seed
    init = build_model(ModelConfig.from_dict(model.config.to_dict())).state_dict()
    final = _weights(sim_dir / "federated")
    r1 = load_file(str(ckpt / "round_001.safetensors"))
    nct = [k for k in final if k.startswith("experts.nCT.")]
    assert nct and all(np.array_equal(final[k], init[k].numpy()) for k in nct)
    assert all(np.array_equal(r1[k], final[k]) for k in nct)
    others = [k for k in final if k.startswith("experts.nCRT.")]
    assert any(not np.array_equal(final[k], init[k].numpy()) for k in others)


def test_resume_continues_as_if_never_stopped(sim_dir: Path, tmp_path: Path) -> None:
    """A run that crashed after round 2's checkpoint, resumed, ends where an
    uninterrupted run ends (FedAdam moments and the seeded schedule included)."""
    config = {"num-server-rounds": 3, "strategy": "fedadam", "server-lr": 0.01, **SMALL}
    run_simulated_federation(sim_dir, preset="tiny", overrides=config)
    straight = sim_dir / "federated"
    crashed = tmp_path / "crashed"
    shutil.copytree(sim_dir / "cohort", crashed / "cohort")
    shutil.copytree(straight, crashed / "federated")
    for p in (crashed / "federated" / "checkpoints").glob("round_003*"):
        p.unlink()
    record = json.loads((crashed / "federated" / "metrics.json").read_text())
    record.update(status="running", rounds=record["rounds"][:2])
    (crashed / "federated" / "metrics.json").write_text(json.dumps(record))
    assert (
        crashed / "federated" / "checkpoints" / "round_002.adam.safetensors"
    ).is_file()

    # the copy reads its cohort from another folder: a changed `cohort-dir`
    # is refused unless the resume says so
    with pytest.raises(MoeflError, match="cohort-dir"):
        run_simulated_federation(crashed, preset="tiny", overrides=config)
    moved = {**config, "resume-changed-config": True}
    resumed = run_simulated_federation(crashed, preset="tiny", overrides=moved)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    a, b = _weights(straight), _weights(crashed / "federated")
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst < 1e-6, worst


def test_bad_run_config_fails_before_starting(sim_dir: Path) -> None:
    with pytest.raises(MoeflError, match="unknown run config key"):
        run_simulated_federation(sim_dir, preset="tiny", overrides={"num-rounds": 2})


def test_dp_simulation_stays_within_every_sites_budget_across_a_resume(
    sim_dir: Path,
) -> None:
    """Every site trains under DP-SGD and reports epsilon each round; the noise
    is derived so the planned rounds spend the budget; when the coordinator
    then adds a round, every site declines (its ledger survived the restart)
    and the federation finishes without it."""
    from client.privacy.ledger import PrivacyLedger

    privacy = {"target_epsilon": 2.0, "delta": 1e-3, "max_grad_norm": 1.0}
    config = {"num-server-rounds": 2, "local-steps": 2, **SMALL}
    record = run_simulated_federation(
        sim_dir, preset="tiny", overrides=config, privacy=privacy
    )
    sites = ["sah_sysu", "sysucc", "west_china"]
    for r in record["rounds"]:
        assert sorted(r["sites"]) == sites and r["updated"]
        assert r["identified_by"] == "simulation"  # the simulation maps its nodes
        for m in r["sites"].values():
            p = m["privacy"]
            assert 0 < p["epsilon"] <= 2.0 and p["noise_multiplier"] > 0.3
            assert p["steps"] == 2 and m["train_loss"] is None  # loss not released
    last = record["rounds"][-1]["sites"]
    assert all(m["privacy"]["epsilon"] >= 0.95 * 2.0 for m in last.values())
    for site in sites:
        ledger = PrivacyLedger.for_site(sim_dir / "federated" / "sites" / site)
        assert len(ledger.entries) == 2
        assert ledger.epsilon(1e-3) == pytest.approx(last[site]["privacy"]["epsilon"])

    record = run_simulated_federation(
        sim_dir,
        preset="tiny",
        overrides={**config, "num-server-rounds": 3},
        privacy=privacy,
    )
    r3 = record["rounds"][2]
    assert record["status"] == "finished" and not r3["updated"]
    assert sorted(r3["declined"]) == sites and not r3["sites"]
    for d in r3["declined"].values():
        assert "privacy budget" in d["reason"] and d["privacy"]["epsilon"] <= 2.0
    ckpt = sim_dir / "federated" / "checkpoints"
    before = load_file(str(ckpt / "round_002.safetensors"))
    after = load_file(str(ckpt / "round_003.safetensors"))
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_dp_heads_over_a_public_backbone_stay_within_budget_across_a_resume(
    sim_dir: Path, tmp_path: Path
) -> None:
    """Every site trains only the heads, under DP-SGD, over features of a
    frozen public backbone: the backbone in every checkpoint is the artifact's,
    each site's epsilon in metrics.json equals its ledger and stays within its
    budget, evaluation counts are withheld; a resumed run with one more round
    finds the budget spent and every site declines."""
    from client.privacy.ledger import PrivacyLedger
    from client.training.engine import TrainConfig
    from client.training.pretrain import pretrain
    from shared_model.backbone import backbone_digest
    from shared_model.plan import PRESET_PLANS
    from simulations.synth import synthesize

    synthesize(tmp_path / "public", preset="public-tiny", seed=0, workers=2)
    backbone = tmp_path / "backbone.safetensors"
    widths = {"base_filters": 4, "max_filters": 32}
    done = pretrain(
        sorted((tmp_path / "public" / "site_configs").glob("*.yaml")),
        backbone,
        cfg=TrainConfig(optimizer="adamw", lr=1e-3, epochs=1, augment=False),
        plan=PRESET_PLANS["tiny"],
        source="test",
        model_overrides=widths,
    )
    privacy = {"target_epsilon": 2.0, "delta": 1e-3, "max_grad_norm": 1.0}
    config = {
        "base-filters": 4,
        "max-filters": 32,
        "backbone": str(backbone),
        "head-rounds": 2,
        "head-epochs": 2,
        "embed-dim": 4,
    }
    record = run_simulated_federation(
        sim_dir, preset="tiny", overrides=config, privacy=privacy
    )
    run = sim_dir / "federated"
    sites = ["sah_sysu", "sysucc", "west_china"]
    assert record["backbone"]["sha256"] == done.sha256
    model_config = json.loads((run / "config.json").read_text())["model"]
    assert len(model_config["feature_centre"]) == len(model_config["feature_scale"]) > 0
    assert [r["stage"] for r in record["rounds"]] == ["heads", "heads"]
    for r in record["rounds"]:
        assert sorted(r["sites"]) == sites and r["updated"]
        assert r["evaluate"]["withheld"] == sites
        for m in r["sites"].values():
            assert m["privacy"]["steps"] == 4 and m["privacy"]["sample_rate"] == 0.5
            assert m["train_loss"] is None
    for site in sites:
        ledger = PrivacyLedger.for_site(run / "sites" / site)
        last = record["rounds"][-1]["sites"][site]["privacy"]
        assert ledger.epsilon(1e-3) == pytest.approx(last["epsilon"])
        assert last["epsilon"] <= 2.0
        assert ledger.entries[-1]["stage"] == "heads"
    for ckpt in sorted((run / "checkpoints").glob("round_*[0-9].safetensors")):
        assert backbone_digest(load_file(str(ckpt))) == done.sha256
    from server.report import build_report

    md, _ = build_report(run, {})
    assert "withheld (DP)" in md.read_text()
    record = run_simulated_federation(
        sim_dir, preset="tiny", overrides={**config, "head-rounds": 3}, privacy=privacy
    )
    r3 = record["rounds"][2]
    assert record["status"] == "finished" and sorted(r3["declined"]) == sites
    for site in sites:
        ledger = PrivacyLedger.for_site(run / "sites" / site)
        assert len(ledger.entries) == 2 and ledger.epsilon(1e-3) <= 2.0


def test_a_staged_dp_federation_needs_a_public_backbone(sim_dir: Path) -> None:
    privacy = {"target_epsilon": 2.0, "delta": 1e-3, "max_grad_norm": 1.0}
    with pytest.raises(MoeflError, match="pretrained public backbone"):
        run_simulated_federation(
            sim_dir, preset="tiny", overrides={"training": "staged"}, privacy=privacy
        )
    assert not (sim_dir / "federated").exists()


def test_a_newton_federation_carries_its_posterior_and_rule(sim_dir: Path) -> None:
    """The default staged federation: segmentation rounds, then the linear head
    fitted by Newton steps over the sites' cached features, recalibrated, and
    the advice rule chosen on validation; the checkpoint carries the rule and
    its posterior, and `moefl evaluate` scores with them."""
    from multisite.evaluation import run_evaluation
    from shared_model.checkpoint import load_checkpoint, load_rule

    config = {"num-server-rounds": 2, "base-filters": 4, "max-filters": 32}
    record = run_simulated_federation(sim_dir, preset="tiny", overrides=config)
    assert [r["stage"] for r in record["rounds"]] == ["segmentation", "segmentation"]
    advice = record["advice"]
    fit = advice["fit"]
    assert fit["converged"] and fit["sites"] == ["sah_sysu", "sysucc", "west_china"]
    assert fit["expert_support"] == {"nCRT": 14, "TNT": 9, "nCT": 3}
    assert fit["lam"] in (0.3, 1.0, 3.0, 10.0, 30.0)
    assert advice["evaluate"]["n"] == 7  # the final model, under its rule
    run = sim_dir / "federated"
    rule = load_rule(run)
    assert rule is not None and rule.posterior is not None
    assert rule.to_dict() == advice["rule"]
    model, _ = load_checkpoint(run)
    assert np.allclose(model.glm_coefficients(), rule.posterior.mean, atol=1e-5)
    cohort = sim_dir / "cohort"
    report = run_evaluation(
        run, sorted((cohort / "site_configs").glob("*.yaml")), sim_dir / "ev"
    )
    assert report["rule"]["from_checkpoint"] and "what_if" not in report["rule"]
    assert report["rule"]["kind"] == rule.kind
