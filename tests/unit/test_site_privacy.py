"""A site's privacy through its one owner: the DP round as the site runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from opacus.optimizers import DPOptimizer

from client.data.privacy_config import PrivacyConfig
from client.data.site_config import SiteConfig
from client.node import site_round
from client.node.site_state import RoundSetup, SiteState
from client.privacy.rounds import RoundShape
from client.privacy.site_privacy import SitePrivacy
from shared_model.clinical import REGIMENS
from shared_model.federation_config import FederationConfig
from shared_model.messages import SHARED, RoundRequest, expert_group
from shared_model.model import build_model
from shared_model.plan import Plan
from tests.unit.test_engine import CFG, Toy


class _Transform:
    def set_random_state(self, seed: int) -> None:
        pass


class _Train(Toy):
    """Toy patients with the dataset's seeding hook, as a site's split."""

    transform = _Transform()

    def regimen_indices(self) -> list[int]:
        return [int(x["regimen"]) for x in self.items]


def _joint_round(tmp_path: Path, *, secure_mode: bool) -> RoundSetup:
    """A DP site's joint round, without data on disk."""
    privacy = PrivacyConfig(8.0, 1e-3, 1.0, secure_mode=secure_mode)
    config = SiteConfig(
        path=tmp_path / "site.yaml",
        site_name="s",
        role="train",
        dataset_dir=tmp_path,
        adc_unit="1e-3",
        run_dir=tmp_path / "run",
        min_cases=1,
        device="cpu",
        num_workers=0,
        val_fraction=0.2,
        split_seed=0,
        privacy=privacy,
    )
    train = _Train(8)
    regimens = train.regimen_indices()
    counts = {
        SHARED: len(train),
        **{expert_group(r): regimens.count(j) for j, r in enumerate(REGIMENS)},
    }
    fed = FederationConfig(
        training="joint",
        num_server_rounds=1,
        local_steps=1,
        batch_size=4,
        dp_noise_multiplier=1.0,
    )
    request = RoundRequest(run_config={}, plan={}, model_config={}, server_round=1)
    site = SiteState(config, Plan(), train, train, counts)  # type: ignore[arg-type]
    return RoundSetup(fed, site, build_model(CFG), torch.device("cpu"), request, True)


@pytest.mark.parametrize("secure_mode", [True, False])
def test_a_joint_dp_round_uses_the_sites_secure_mode(
    secure_mode: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``privacy.secure_mode`` reaches opacus in joint rounds, as in head rounds
    (it used to be dropped: the joint loop built its opacus wrapper without it)."""
    setup = _joint_round(tmp_path, secure_mode=secure_mode)
    monkeypatch.setattr(site_round, "prepare_round", lambda *a: setup)
    seen: list[bool] = []
    real_init = DPOptimizer.__init__

    def spy(self: DPOptimizer, *args: Any, **kwargs: Any) -> None:
        seen.append(bool(kwargs.get("secure_mode", False)))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(DPOptimizer, "__init__", spy)
    reply = site_round.train_round(setup.request, {}, {})
    assert reply.declined is None or not reply.declined
    assert reply.reply.privacy is not None
    assert seen == [secure_mode]


BUDGET = PrivacyConfig(8.0, 1e-5, 1.0)
WIDE = PrivacyConfig(30.0, 1e-5, 1.0)

# (noise, epsilon before, epsilon after) of a run planned by the code before
# privacy had one owner (three derived joint rounds, a derived head round, a
# fixed-noise round); the accounting must not move.
BEFORE = {
    "rdp": [
        (0.7244873046875, 0.0, 5.812069385465025),
        (0.7244873046875, 5.812069385465025, 7.038817913844578),
        (0.7237797975540161, 7.038817913844578, 7.995085344485976),
        (1.28631591796875, 7.995085344485976, 13.539455937642922),
        (1.3, 7.995085344485976, 8.074062496609045),
    ],
    "prv": [
        (0.6768798828125, 0.0, 5.617786760559446),
        (0.6768798828125, 5.617786760559446, 6.944665140742792),
        (0.6762188673019409, 6.944665140742792, 7.9982161981815185),
        (1.232147216796875, 7.9982161981815185, 13.464047427738532),
        (1.3, 7.9982161981815185, 8.069492256897927),
    ],
}
FINGERPRINT_NOISE_BEFORE = {"rdp": 4.048722457885742, "prv": 3.766519546508789}


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_plans_and_their_epsilons_are_those_of_before(
    accountant: str, tmp_path: Path
) -> None:
    from client.checks.fingerprint import fingerprint_noise
    from client.privacy.rounds import HEAD_MAX_NOISE, RoundShape, sample_rate_for

    site = SitePrivacy(BUDGET, tmp_path, accountant)
    wide = SitePrivacy(WIDE, tmp_path, accountant)
    got = []
    for rnd in range(1, 4):
        shape = RoundShape(60, sample_rate_for(4, 60), 15, 4 - rnd)
        plan = site.open_round(shape, server_round=rnd, run="r")
        assert plan.dp is not None
        got.append((plan.dp.noise_multiplier, plan.epsilon_spent, plan.epsilon_after))
    for shape in (
        RoundShape(60, 0.5, 20, 5, max_noise=HEAD_MAX_NOISE, stage="heads"),
        RoundShape(60, sample_rate_for(4, 60), 15, 1, noise_multiplier=1.3),
    ):
        plan = wide.preview(shape)
        assert plan.dp is not None
        got.append((plan.dp.noise_multiplier, plan.epsilon_spent, plan.epsilon_after))
    flat = [x for row in got for x in row]
    assert flat == pytest.approx(
        [x for row in BEFORE[accountant] for x in row], rel=1e-9
    )
    assert fingerprint_noise(1.0, 1e-5, accountant) == pytest.approx(
        FINGERPRINT_NOISE_BEFORE[accountant], rel=1e-12
    )
    assert site.ledger().accountants == [accountant] * 3


def test_the_ledger_names_its_accountant_and_reads_older_ledgers(
    tmp_path: Path,
) -> None:
    import json

    from client.privacy.ledger import PrivacyLedger, ledger_path
    from client.privacy.rounds import DPRound
    from shared_model.errors import ConfigError, DataError

    path = ledger_path(tmp_path)
    path.parent.mkdir(parents=True)
    old = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "round": 1}
    path.write_text(json.dumps({"version": 1, "entries": [old]}))
    ledger = PrivacyLedger.for_site(tmp_path)  # a version-1 ledger still loads
    assert ledger.accountants == [None] and ledger.history == [(1.0, 0.1, 10)]
    ledger.record(DPRound(1.0, 1.0, 0.1, 10, 40), accountant="prv", round=2)
    again = PrivacyLedger.for_site(tmp_path)
    assert again.accountants == [None, "prv"]
    assert json.loads(path.read_text())["version"] == 2
    with pytest.raises(ConfigError, match="accountant"):
        again.record(DPRound(1.0, 1.0, 0.1, 10, 40), accountant="gdp")
    path.write_text(json.dumps({"entries": [{**old, "accountant": "gdp"}]}))
    with pytest.raises(DataError, match="unreadable"):
        PrivacyLedger.for_site(tmp_path)


def test_the_sampling_rate_is_worked_out_in_one_place() -> None:
    from client.privacy.rounds import HEAD_MAX_NOISE, MAX_NOISE, RoundShape

    joint = RoundShape.of(
        FederationConfig(training="joint", batch_size=4, num_server_rounds=5), 60, 2
    )
    assert (joint.sample_rate, joint.steps, joint.rounds_left) == (4 / 60, 15, 4)
    assert joint.max_noise == MAX_NOISE and joint.stage == "joint"
    staged = FederationConfig(
        backbone="b.safetensors", head_rounds=4, head_fit="rounds"
    )
    heads = RoundShape.of(staged, 60, 1)
    assert (heads.sample_rate, heads.steps, heads.rounds_left) == (0.5, 20, 4)
    assert heads.max_noise == HEAD_MAX_NOISE and heads.stage == "heads"


def test_a_head_round_gets_secure_mode_from_the_same_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client.training.heads import HeadConfig, train_heads_private
    from tests.unit.test_dp_heads import _features, _model

    model = _model(embed_dim=4)
    data = _features(model, 20)
    site = SitePrivacy(PrivacyConfig(8.0, 1e-3, 1.0, secure_mode=True), tmp_path)
    plan = site.preview(
        RoundShape.of(FederationConfig(backbone="b", head_fit="rounds"), 20, 1)
    )
    assert plan.dp is not None
    seen: list[bool] = []
    real_init = DPOptimizer.__init__

    def spy(self: DPOptimizer, *args: Any, **kwargs: Any) -> None:
        seen.append(bool(kwargs.get("secure_mode", False)))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(DPOptimizer, "__init__", spy)
    private = site.private_round(plan.dp, device="cpu", seed=0)
    train_heads_private(model, data, HeadConfig(lr=0.01), private)
    assert seen == [True]


def test_the_fingerprint_is_charged_through_the_sites_privacy(tmp_path: Path) -> None:
    from shared_model.errors import ConfigError

    site = SitePrivacy(PrivacyConfig(2.0, 1e-5, 1.0), tmp_path, "prv", site_name="s")
    account = site.charge_release(4.0, 2.0, 30, "fingerprint")
    ledger = site.ledger()
    assert ledger.entries[-1]["kind"] == "fingerprint"
    assert ledger.accountants == ["prv"]
    assert account.epsilon == pytest.approx(ledger.epsilon(1e-5, "prv"))
    with pytest.raises(ConfigError, match="s: the fingerprint's release.*past 2"):
        site.charge_release(0.5, 2.0, 30, "fingerprint")
    assert len(site.ledger().entries) == 1  # a refused release spends nothing
