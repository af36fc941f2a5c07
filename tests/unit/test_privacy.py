"""Sample-level DP-SGD at a site: accounting, budget stop, ledger, training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from client.data.privacy_config import PrivacyConfig, parse_privacy
from client.privacy.dp_sgd import (
    PrivateRound,
    PrivateTraining,
    dp_generator,
    sampling_generator,
)
from client.privacy.ledger import PrivacyLedger
from client.privacy.rounds import (
    DPRound,
    RoundPlan,
    RoundShape,
    check_delta,
    plan_round,
    sample_rate_for,
)
from client.training.engine import TrainConfig, train_local
from shared_model.accounting import epsilon_of
from shared_model.errors import ConfigError, DataError
from shared_model.federation_config import FederationConfig
from shared_model.loss import MoELoss
from shared_model.model import build_model
from shared_model.parameter_groups import parameter_groups
from tests.unit.test_engine import CFG, Toy

BUDGET = PrivacyConfig(target_epsilon=4.0, delta=1e-5, max_grad_norm=1.0)
CPU = torch.device("cpu")


def _plan(
    ledger: PrivacyLedger,
    privacy: PrivacyConfig = BUDGET,
    *,
    n_patients: int,
    batch_size: int,
    steps: int,
    rounds_left: int,
    noise_multiplier: float = 0.0,
) -> RoundPlan:
    """A joint round's plan at ``batch_size`` patients per step."""
    shape = RoundShape(
        n_patients,
        sample_rate_for(batch_size, n_patients),
        steps,
        rounds_left,
        noise_multiplier,
    )
    return plan_round(privacy, ledger.history, shape)


def _private(dp: DPRound, seed: int | None) -> PrivateRound:
    return PrivateRound(dp, dp_generator(seed), secure_mode=False)


def _opacus_epsilon(
    steps: list[tuple[float, float, int]], delta: float, kind: type = RDPAccountant
) -> float:
    """Epsilon the way opacus's training loop counts it: one ``step`` per step."""
    acc = kind()
    for sigma, q, n in steps:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=delta))


def test_reported_epsilon_equals_opacus_accountant(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    taken = []
    for _ in range(3):
        plan = _plan(
            ledger,
            n_patients=60,
            batch_size=4,
            steps=15,
            rounds_left=8,
            noise_multiplier=1.3,
        )
        assert plan.dp is not None
        ledger.record(plan.dp, accountant="rdp")
        taken.append((1.3, 4 / 60, 15))
        assert plan.epsilon_after == pytest.approx(
            _opacus_epsilon(taken, 1e-5), rel=1e-9
        )
    assert ledger.epsilon(1e-5, "prv") == pytest.approx(
        _opacus_epsilon(taken, 1e-5, PRVAccountant), rel=1e-6
    )


def test_derived_noise_spends_the_budget_over_the_planned_rounds(
    tmp_path: Path,
) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    sigmas = []
    for rnd in range(1, 6):
        plan = _plan(ledger, n_patients=60, batch_size=4, steps=15, rounds_left=6 - rnd)
        assert plan.dp is not None and plan.epsilon_after <= BUDGET.target_epsilon
        sigmas.append(plan.dp.noise_multiplier)
        ledger.record(plan.dp, accountant="rdp")
    final = ledger.epsilon(BUDGET.delta)
    assert 0.97 * BUDGET.target_epsilon <= final <= BUDGET.target_epsilon
    assert max(sigmas) - min(sigmas) < 0.01 * sigmas[0]  # one noise for the whole run
    assert final == pytest.approx(
        _opacus_epsilon([(s, 4 / 60, 15) for s in sigmas], BUDGET.delta), rel=1e-9
    )
    # the budget is spent: a sixth round declines, and declining spends nothing
    plan = _plan(ledger, n_patients=60, batch_size=4, steps=15, rounds_left=1)
    assert plan.dp is None and "privacy budget" in plan.declined
    assert ledger.epsilon(BUDGET.delta) == final


def test_budget_stop_with_fixed_noise(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    trained = 0
    while True:
        plan = _plan(
            ledger,
            n_patients=60,
            batch_size=4,
            steps=15,
            rounds_left=1,
            noise_multiplier=1.0,
        )
        if plan.dp is None:
            break
        ledger.record(plan.dp, accountant="rdp")
        trained += 1
    spent = ledger.epsilon(BUDGET.delta)
    assert trained >= 1 and spent <= BUDGET.target_epsilon
    assert epsilon_of([*ledger.history, (1.0, 4 / 60, 15)], 1e-5, "rdp") > 4.0
    assert f"{spent:.3f} of 4" in plan.declined


def test_epsilon_survives_a_restart_and_a_broken_ledger_is_an_error(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "site_run"
    first = PrivacyLedger.for_site(run_dir)
    first.record(DPRound(1.1, 1.0, 0.1, 20, 40), round=1, accountant="rdp")
    first.record(DPRound(1.1, 1.0, 0.1, 20, 40), round=2, accountant="rdp")
    again = PrivacyLedger.for_site(run_dir)  # a new process after a restart
    assert again.history == first.history and len(again.history) == 2
    assert again.epsilon(1e-5) == pytest.approx(
        _opacus_epsilon([(1.1, 0.1, 40)], 1e-5), rel=1e-9
    )
    path = run_dir / "privacy" / "ledger.json"
    path.write_text(path.read_text()[:-20])
    with pytest.raises(DataError, match="ledger.json.*unreadable.*budget"):
        PrivacyLedger.for_site(run_dir)
    path.write_text(json.dumps({"entries": [{"noise_multiplier": -1}]}))
    with pytest.raises(DataError, match="unreadable"):
        PrivacyLedger.for_site(run_dir)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (
            {"target_epsilon": -1.0, "delta": 1e-5, "max_grad_norm": 1.0},
            "target_epsilon",
        ),
        (
            {"target_epsilon": 0.0, "delta": 1e-5, "max_grad_norm": 1.0},
            "target_epsilon",
        ),
        ({"target_epsilon": 8.0, "delta": 1.0, "max_grad_norm": 1.0}, "delta"),
        ({"target_epsilon": 8.0, "delta": 1e-5}, "max_grad_norm"),
        ({"target_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": "x"}, "max_grad_norm"),
        (
            {"target_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1, "sigma": 1},
            "sigma",
        ),
    ],
)
def test_invalid_privacy_parameters_are_rejected(raw: dict, key: str) -> None:
    problems: list = []
    assert parse_privacy(raw, problems) is None
    assert any(p.where == f"privacy.{key}" for p in problems), problems


def test_delta_must_be_below_one_over_n() -> None:
    check_delta(BUDGET, 60, "site.yaml")
    with pytest.raises(ConfigError, match=r"site.yaml: privacy.delta = 0.02 .*1/60"):
        check_delta(PrivacyConfig(8.0, 0.02, 1.0), 60, "site.yaml")


def test_federation_privacy_keys_are_checked() -> None:
    with pytest.raises(ConfigError, match="client-dp-clip"):
        FederationConfig(client_dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="dp-accountant"):
        FederationConfig(dp_accountant="gdp")
    with pytest.raises(ConfigError, match="dp-noise-multiplier"):
        FederationConfig(dp_noise_multiplier=-1.0)


def _trainable_without_nct(model: torch.nn.Module) -> set[str]:
    groups = parameter_groups(model)
    return {n for g in ("shared", "expert/nCRT", "expert/TNT") for n in groups[g]}


def test_dp_training_freezes_absent_experts_and_survives_empty_batches() -> None:
    torch.manual_seed(0)
    model = build_model(CFG)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses: list[float] = []
    # 8 patients sampled at 0.1: about 43 % of the steps have no patient at all
    dp = DPRound(1.0, 1.0, 0.1, 12, 8)
    result = train_local(
        model,
        Toy(8),
        TrainConfig(optimizer="adamw", lr=1e-3),
        device=CPU,
        trainable=_trainable_without_nct(model),
        dp=_private(dp, 3),
        on_step=lambda step, loss: losses.append(loss),
    )
    assert result.steps == 12 and len(losses) == 12
    empty = sum(np.isnan(v) for v in losses)
    assert 1 <= empty < 12  # noise-only steps happened and were stepped through
    groups = parameter_groups(model)
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (name not in groups["expert/nCT"]), name
        assert getattr(p, "grad_sample", None) is None  # opacus detached


def test_dp_noise_is_reproducible_only_when_seeded() -> None:
    def run(seed: int | None) -> torch.Tensor:
        torch.manual_seed(0)
        model = build_model(CFG)
        train_local(
            model,
            Toy(8),
            TrainConfig(optimizer="adamw", lr=1e-3),
            device=CPU,
            dp=_private(DPRound(1.0, 1.0, 0.5, 2, 8), seed),
        )
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(None), run(None))


def _double(items: list[dict]) -> list[dict]:
    return [
        {k: (v.double() if k in ("image", "clinical") else v) for k, v in x.items()}
        for x in items
    ]


@pytest.mark.parametrize("proximal", [False, True])
def test_without_noise_or_clipping_a_dp_step_is_the_plain_step(proximal: bool) -> None:
    """Sampling rate 1 (every patient every step), noise 0, a clip no gradient
    reaches: the DP step must equal the ordinary full-batch step, so opacus's
    per-sample gradients, averaging and our batch wiring are the same maths.
    With FedProx's proximal term, which under DP is added after the noise."""
    data = _double(Toy(6).items)
    cfg = TrainConfig(
        optimizer="sgd",
        lr=0.1,
        momentum=0.5,
        weight_decay=0.0,
        batch_size=6,
        max_steps=2,
        grad_clip=0.0,
    )

    def run(dp: DPRound | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(CFG).double()
        anchor = {n: p.detach() + 0.05 for n, p in model.named_parameters()}

        def prox(m: torch.nn.Module) -> torch.Tensor:
            return 0.5 * sum(
                (p - anchor[n]).pow(2).sum() for n, p in m.named_parameters()
            )

        train_local(
            model,
            data,
            cfg,
            device=CPU,
            extra_loss=prox if proximal else None,
            dp=_private(dp, 0) if dp else None,
        )
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    plain = run(None)
    private = run(DPRound(0.0, 1e6, 1.0, 2, 6))
    for name in plain:
        assert torch.allclose(plain[name], private[name], rtol=1e-9, atol=1e-12), name


def test_clipping_bounds_each_patients_contribution() -> None:
    """With noise 0, every patient in every step (rate 1), plain SGD and a
    tiny clip c, one step moves the weights by at most lr * c."""
    torch.manual_seed(0)
    model = build_model(CFG).double()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    items = _double(Toy(6).items)
    clip, lr = 1e-3, 0.5
    train_local(
        model,
        items,
        TrainConfig(optimizer="sgd", lr=lr, momentum=1e-12, weight_decay=0.0),
        device=CPU,
        dp=_private(DPRound(0.0, clip, 1.0, 1, 6), 0),
    )
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    moved = float((after - before).norm())
    assert 0.1 * lr * clip < moved <= lr * clip * (1 + 1e-6)


def test_private_training_hooks_only_the_trainable_parameters() -> None:
    """Per-sample gradients through our wrapper (frozen nCT expert) equal a
    batch-of-one loop in float64, and the frozen expert gets none."""
    torch.manual_seed(0)
    model = build_model(CFG).double().train()
    trainable = _trainable_without_nct(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    batch = [Toy(3).items[i] for i in range(3)]
    image = torch.stack([b["image"] for b in batch]).double()
    label = torch.stack([b["label"] for b in batch])
    clinical = torch.stack([b["clinical"] for b in batch]).double()
    regimen = torch.tensor([0, 1, 2])
    pcr = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    loss_fn = MoELoss()
    reference: dict[str, list[torch.Tensor]] = {n: [] for n in trainable}
    for i in range(3):
        model.zero_grad()
        out = model(image[i : i + 1], clinical[i : i + 1], regimen[i : i + 1])
        loss_fn(out, label[i : i + 1], pcr[i : i + 1])[0].backward()
        for n, p in model.named_parameters():
            if n in trainable:
                reference[n].append(p.grad.detach().clone())
    params = [p for p in model.parameters() if p.requires_grad]
    private = PrivateTraining(
        model,
        torch.optim.SGD(params, lr=0.1),
        _private(DPRound(1.0, 1.0, 0.5, 1, 3), 0),
    )
    model.zero_grad()
    out = private.module(image, clinical, regimen)
    loss_fn(out, label, pcr)[0].backward()
    num = den = 0.0
    for n, p in model.named_parameters():
        if n not in trainable:
            assert getattr(p, "grad_sample", None) is None, n
            continue
        expected = torch.stack(reference[n])
        num += float((p.grad_sample - expected).pow(2).sum())
        den += float(expected.pow(2).sum())
    assert (num / den) ** 0.5 < 1e-10
    private.close()


def test_the_ledger_is_planned_and_recorded_under_an_exclusive_lock(
    tmp_path: Path,
) -> None:
    import fcntl

    run_dir = tmp_path / "site_run"
    with PrivacyLedger.locked(run_dir) as ledger:
        other = open(run_dir / "privacy" / "ledger.lock", "a")  # noqa: SIM115
        with pytest.raises(BlockingIOError):  # a second training would wait here
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        ledger.record(DPRound(1.0, 1.0, 0.1, 10, 40), round=1, accountant="rdp")
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released afterwards
    other.close()
    with PrivacyLedger.locked(run_dir) as again:  # reads what the first wrote
        assert again.history == [(1.0, 0.1, 10)]


@pytest.mark.parametrize("key", ["target_epsilon", "delta", "max_grad_norm"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_privacy_values_are_refused_naming_the_key(
    key: str, value: float, tmp_path: Path
) -> None:
    """A NaN target would disable the budget stop (NaN comparisons are false)."""
    from client.data.site_config import parse_site_yaml

    raw = {"target_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0, key: value}
    problems: list = []
    assert parse_privacy(raw, problems) is None
    assert [p.where for p in problems] == [f"privacy.{key}"]
    assert "finite" in problems[0].message
    # and through a YAML file, as `moefl check` and the site read it
    literal = {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}[str(value)]
    yaml_path = tmp_path / "site.yaml"
    body = {
        "target_epsilon": "8.0",
        "delta": "1.0e-5",
        "max_grad_norm": "1.0",
        key: literal,
    }
    yaml_path.write_text(
        "site_name: s\ndataset_dir: .\nprivacy:\n"
        + "".join(f"  {k}: {v}\n" for k, v in body.items())
    )
    config, problems = parse_site_yaml(yaml_path)
    assert config is None
    assert [p.where for p in problems if p.where.startswith("privacy")] == [
        f"privacy.{key}"
    ]


def test_optional_privacy_keys_are_typed() -> None:
    base = {"target_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}
    problems: list = []
    ok = parse_privacy(
        {
            **base,
            "secure_mode": True,
            "release_evaluation": True,
            "public_backbones": ["a" * 64],
        },
        problems,
    )
    assert ok is not None and ok.secure_mode and ok.release_evaluation
    assert ok.public_backbones == ("a" * 64,)
    for bad in (
        {"secure_mode": "yes"},
        {"public_backbones": ["not-a-digest"]},
        {"public_backbones": "a" * 64},
    ):
        problems = []
        assert parse_privacy({**base, **bad}, problems) is None
        assert problems[0].where == f"privacy.{next(iter(bad))}"


_CRASH_POINTS = ("write", "fsync-file", "replace", "fsync-folder")


@pytest.mark.parametrize("point", _CRASH_POINTS)
def test_the_ledger_survives_a_crash_at_any_point_of_its_write(
    point: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash while recording leaves the old ledger or the new one, readable;
    an entry is on the disk (file and folder flushed) once record returns."""
    import os

    run_dir = tmp_path / "site"
    ledger = PrivacyLedger.for_site(run_dir)
    ledger.record(DPRound(1.0, 1.0, 0.1, 10, 40), round=1, accountant="rdp")
    real_fsync, real_replace, real_open = os.fsync, os.replace, open
    synced: list[str] = []

    class Crash(Exception):
        pass

    def fsync(fd: int) -> None:
        kind = "folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"
        if point == f"fsync-{kind}":
            raise Crash
        synced.append(kind)
        real_fsync(fd)

    def replace(src: object, dst: object) -> None:
        if point == "replace":
            raise Crash
        real_replace(src, dst)  # type: ignore[arg-type]

    class TornFile:
        def __init__(self, f: object) -> None:
            self.f = f

        def __enter__(self) -> TornFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()  # type: ignore[attr-defined]

        def write(self, data: str) -> None:
            self.f.write(data[: len(data) // 2])  # type: ignore[attr-defined]
            raise Crash

    def opener(path: object, mode: str = "r", *a: object, **k: object) -> object:
        f = real_open(path, mode, *a, **k)  # type: ignore[call-overload]
        if point == "write" and "w" in mode and str(path).endswith(".tmp"):
            return TornFile(f)
        return f

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr("builtins.open", opener)
    with pytest.raises(Crash):
        ledger.record(DPRound(1.0, 1.0, 0.1, 10, 40), round=2, accountant="rdp")
    monkeypatch.undo()
    assert len(ledger.entries) == 1  # the object never claims an unwritten entry
    after = PrivacyLedger.for_site(run_dir)  # what a restarted site reads
    expected = 2 if point == "fsync-folder" else 1
    assert len(after.entries) == expected
    # the next round is recorded normally despite the leftover temporary file
    after.record(DPRound(1.0, 1.0, 0.1, 10, 40), round=3, accountant="rdp")
    assert len(PrivacyLedger.for_site(run_dir).entries) == expected + 1


def test_a_recorded_entry_is_flushed_with_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    kinds: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        kinds.append("folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    PrivacyLedger.for_site(tmp_path).record(
        DPRound(1.0, 1.0, 0.1, 1, 10), accountant="rdp"
    )
    assert kinds == ["file", "folder"]


def test_cached_rdp_equals_opacus_for_mixed_histories() -> None:
    history = [(2.6, 0.5, 20), (1.1, 0.05, 100), (2.6, 0.5, 20), (40.0, 1.0, 1)]
    acc = RDPAccountant()
    acc.history = list(history)
    assert epsilon_of(history, 1e-5) == pytest.approx(
        acc.get_epsilon(delta=1e-5), rel=1e-12
    )


def test_the_previous_rounds_noise_is_kept_only_while_it_is_the_smallest(
    tmp_path: Path,
) -> None:
    """Re-planning reuses the last noise when 0.1 % less would not fit: the
    result is what a fresh search over the same ledger gives."""
    ledger = PrivacyLedger.for_site(tmp_path)
    kwargs = {"n_patients": 40, "batch_size": 20, "steps": 10}
    first = _plan(ledger, rounds_left=3, **kwargs)
    assert first.dp is not None
    ledger.record(first.dp, accountant="rdp")
    second = _plan(ledger, rounds_left=2, **kwargs)
    assert second.dp is not None
    assert second.dp.noise_multiplier == first.dp.noise_multiplier
    # a fresh search (the last entry at another rate disables the reuse)
    other = PrivacyLedger(tmp_path / "other.json")
    other.entries = [dict(e) for e in ledger.entries]
    other.entries.append(
        {"noise_multiplier": 1e6, "sample_rate": 0.999, "steps": 1, "max_grad_norm": 1}
    )
    fresh = _plan(other, rounds_left=2, **kwargs)
    assert fresh.dp is not None
    assert fresh.dp.noise_multiplier == pytest.approx(
        second.dp.noise_multiplier, rel=2e-3
    )
    # a larger budget left than the last noise needs: searched, not reused
    wider = _plan(ledger, PrivacyConfig(40.0, 1e-5, 1.0), rounds_left=2, **kwargs)
    assert wider.dp is not None
    assert wider.dp.noise_multiplier < first.dp.noise_multiplier


def test_noise_generator_lives_on_the_training_device() -> None:
    g = dp_generator(7, "cpu")
    assert g.device.type == "cpu"
    a = sampling_generator(dp_generator(7)).initial_seed()
    b = sampling_generator(dp_generator(7)).initial_seed()
    assert a == b and sampling_generator(dp_generator(None)).initial_seed() != a


def test_secure_mode_reaches_the_optimizer() -> None:
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    private = PrivateTraining(
        model,
        opt,
        PrivateRound(DPRound(1.0, 1.0, 0.5, 2, 10), dp_generator(0), secure_mode=True),
    )
    assert private.optimizer.secure_mode
    private.close()
