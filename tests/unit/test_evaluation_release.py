"""A DP site's evaluation release (``privacy.release_evaluation: dp``): its
YAML, its charge to the ledger, its sensitivity to one patient, and the AUC the
coordinator reads from noised counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from client.data.privacy_config import PrivacyConfig, parse_privacy
from client.privacy.evaluation_release import released_evaluation
from client.privacy.site_privacy import SitePrivacy
from shared_model.clinical import REGIMENS
from shared_model.errors import ConfigError
from shared_model.federated_metrics import (
    ScoreCounts,
    auc_from_histograms,
    auc_interval,
)
from shared_model.noised_counts import (
    DICE_WEIGHT,
    NOISE_STD,
    RELEASE_SENSITIVITY,
    RELEASED_BINS,
    widened_auc,
)
from shared_model.policy_value import PolicySums
from shared_model.rule_choice import CandidateSums
from shared_model.site_evaluation import SiteEvaluation, combine

BASE = {"target_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}


def _site(
    rng: np.random.Generator, n: int, name: str = "a", shift: float = 1.0
) -> tuple[SiteEvaluation, dict[str, np.ndarray]]:
    """A site's exact evaluation of ``n`` random patients, and the patients."""
    y = (rng.random(n) < 0.35).astype(float)
    score = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + shift * y - 0.8)))
    regimen = rng.integers(0, len(REGIMENS), n)
    dice = rng.random(n)
    patients = {"y": y, "score": score, "regimen": regimen, "dice": dice}
    return _evaluation(patients, name), patients


def _evaluation(p: dict[str, np.ndarray], name: str = "a") -> SiteEvaluation:
    counts = {
        r: ScoreCounts.from_scores(
            p["score"][p["regimen"] == j], p["y"][p["regimen"] == j]
        )
        for j, r in enumerate(REGIMENS)
    }
    cands = [CandidateSums(n=len(p["y"]), dr=1.0, dr2=2.0)]
    return SiteEvaluation(
        name, "validation", counts, float(p["dice"].sum()), len(p["dice"]),
        PolicySums(), candidates=cands,
    )  # fmt: skip


def _released_vector(ev: SiteEvaluation) -> np.ndarray:
    """What a DP release sends, before its noise (a negligible std)."""
    values = ev.noised(1e-300, 1.0, np.random.default_rng(0)).to_values()
    hist = [np.asarray(values[f"{r}-{k}"]) for r in REGIMENS for k in ("pos", "neg")]
    dice = DICE_WEIGHT * np.array([values["dice-sum"], values["dice-n"]])
    return np.concatenate([*hist, dice])


def test_yaml_release_evaluation_choices() -> None:
    def parsed(**extra: object) -> tuple[PrivacyConfig | None, list]:
        problems: list = []
        return parse_privacy({**BASE, **extra}, problems), problems

    assert parsed()[0].release_evaluation == "withhold"  # type: ignore[union-attr]
    assert parsed(release_evaluation=False)[0].release_evaluation == "withhold"  # type: ignore[union-attr]
    assert parsed(release_evaluation=True)[0].release_evaluation == "exact"  # type: ignore[union-attr]
    ok, _ = parsed(release_evaluation="dp", evaluation_epsilon=1.0)
    assert ok is not None and ok.release_evaluation == "dp"
    assert ok.evaluation_epsilon == 1.0
    for bad, key in (
        ({"release_evaluation": "yes"}, "release_evaluation"),
        ({"release_evaluation": 1}, "release_evaluation"),
        ({"release_evaluation": "dp"}, "evaluation_epsilon"),
        ({"release_evaluation": True, "evaluation_epsilon": 1.0}, "evaluation_epsilon"),
        ({"release_evaluation": "dp", "evaluation_epsilon": 0.0}, "evaluation_epsilon"),
        ({"release_evaluation": "dp", "evaluation_epsilon": "1"}, "evaluation_epsilon"),
    ):
        config, problems = parsed(**bad)
        assert config is None
        assert [p.where for p in problems] == [f"privacy.{key}"], bad


def _dp_privacy(tmp_path: Path, target: float = 8.0) -> SitePrivacy:
    budget = PrivacyConfig(
        target, 1e-5, 1.0, release_evaluation="dp", evaluation_epsilon=1.0
    )
    return SitePrivacy(budget, tmp_path, site_name="a")


def test_the_charge_is_in_the_ledger_before_the_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ev, _ = _site(np.random.default_rng(1), 60)
    privacy = _dp_privacy(tmp_path)
    seen: list[int] = []
    noised = SiteEvaluation.noised

    def spy(self: SiteEvaluation, *args: object) -> SiteEvaluation:
        seen.append(len(privacy.ledger().history))
        return noised(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(SiteEvaluation, "noised", spy)
    out, account = released_evaluation(ev, privacy, n_cases=60, seed=[0])
    assert seen == [1]  # charged before the noised values were made
    ((noise, rate, steps),) = privacy.ledger().history
    assert (rate, steps) == (1.0, 1)
    assert 0.9 < account.epsilon <= 1.0  # one release at evaluation_epsilon
    assert out.noise_std == pytest.approx(noise * RELEASE_SENSITIVITY)
    values = out.to_values()
    assert values[NOISE_STD] == out.noise_std and values["dp-epsilon"] == 1.0
    assert not any(k.startswith(("policy", "cand", "dfs", "loss")) for k in values)


def test_a_release_past_the_budget_is_refused(tmp_path: Path) -> None:
    ev, _ = _site(np.random.default_rng(2), 40)
    privacy = _dp_privacy(tmp_path, target=1.2)  # two releases compose to ~1.4
    released_evaluation(ev, privacy, n_cases=40, seed=[0])
    with pytest.raises(ConfigError, match="evaluation's release"):
        released_evaluation(ev, privacy, n_cases=40, seed=[1])
    assert len(privacy.ledger().history) == 1  # the refused one is not charged


def test_one_patient_moves_the_release_by_at_most_its_sensitivity() -> None:
    rng = np.random.default_rng(3)
    _, p = _site(rng, 80)
    full = _released_vector(_evaluation(p))
    moved = []
    for i in rng.choice(80, 40, replace=False):
        keep = np.arange(80) != i
        less = _released_vector(_evaluation({k: v[keep] for k, v in p.items()}))
        moved.append(np.linalg.norm(full - less))
    assert max(moved) <= RELEASE_SENSITIVITY + 1e-9
    assert min(moved) >= 1.0  # each patient's histogram count alone moves it by 1
    p["dice"][:] = 1.0  # a perfect Dice reaches the bound
    full = _released_vector(_evaluation(p))
    less = _released_vector(_evaluation({k: v[1:] for k, v in p.items()}))
    assert np.linalg.norm(full - less) == pytest.approx(RELEASE_SENSITIVITY)


def test_released_auc_is_unbiased_and_its_interval_covers() -> None:
    rng = np.random.default_rng(4)
    sites = [_site(rng, 700, name)[0] for name in "abc"]
    pooled = sum((c for s in sites for c in s.counts.values()), ScoreCounts.empty())
    exact = auc_from_histograms(pooled.pos, pooled.neg)
    assert exact is not None
    std = 5.0  # about epsilon 1 at delta 1e-5
    # the noise is unbiased about the noise-free coarse AUC; the coarse bins (ties within
    # one count one half) cost a little of the exact AUC
    coarse = [s.noised(1e-300, 1.0, rng) for s in sites]
    pooled = sum((c for s in coarse for c in s.counts.values()), ScoreCounts.empty())
    coarse_auc = auc_from_histograms(pooled.pos, pooled.neg)
    assert coarse_auc is not None and abs(coarse_auc - exact) < 0.03
    z = float(norm.ppf(0.975))
    aucs, covered, covered_noise = [], 0, 0
    for k in range(200):
        noised = [
            s.noised(std, 1.0, np.random.default_rng(k * 7 + j))
            for j, s in enumerate(sites)
        ]
        released = sum(
            (c for s in noised for c in s.counts.values()), ScoreCounts.empty()
        )
        w = widened_auc(released, 3 * len(sites) * std**2, draws=60, seed=k)
        assert w is not None and w["se_noise"] > 0
        aucs.append(w["auc"])
        covered += w["ci"][0] <= exact <= w["ci"][1]
        covered_noise += abs(w["auc"] - coarse_auc) <= z * w["se_noise"]
    assert abs(np.mean(aucs) - coarse_auc) < 0.01
    assert 0.88 <= covered_noise / 200 <= 1.0
    assert covered / 200 >= 0.9  # 0.92 here: the coarse bins lean a little low


def test_exact_replies_unchanged_and_strict() -> None:
    rng = np.random.default_rng(5)
    sites = [_site(rng, 50, name)[0] for name in "ab"]
    values = sites[0].to_values()
    back = SiteEvaluation.from_values("a", "validation", values)
    assert back.to_values() == values and back.noise_std == 0.0
    out = combine(sites)
    pooled = sum((c for s in sites for c in s.counts.values()), ScoreCounts.empty())
    assert out["overall"]["auc"] == auc_interval(pooled)
    assert "dp_release" not in out and out["candidates"] is not None
    for bad in ({"nCRT-pos": [0.5] * len(values["nCRT-pos"])}, {NOISE_STD: 1.0}):
        with pytest.raises((ValueError, TypeError, KeyError)):
            SiteEvaluation.from_values("a", "validation", {**values, **bad})


def test_noised_replies_are_read_and_reported() -> None:
    rng = np.random.default_rng(6)
    exact, _ = _site(rng, 300, "exact")
    dp, _ = _site(rng, 300, "dp")
    sent = dp.noised(5.0, 1.0, np.random.default_rng(0)).to_values()
    assert min(min(sent[f"{r}-pos"]) for r in REGIMENS) < 0  # noise, not clamped
    back = SiteEvaluation.from_values("dp", "validation", sent)
    assert back.to_values() == sent
    stray = list(sent["nCRT-pos"])
    stray[int(RELEASED_BINS[0]) + 1] = 1.0
    with pytest.raises(ValueError, match="not a DP release"):
        SiteEvaluation.from_values("dp", "validation", {**sent, "nCRT-pos": stray})
    out = combine([exact, back])
    assert out["dp_release"]["sites"] == {"dp": {"epsilon": 1.0, "noise_std": 5.0}}
    overall = out["overall"]["auc"]
    assert overall["se"] > overall["se_delong"] > 0
    assert set(out["auc_by_regimen"]) == set(REGIMENS)
    assert all(out["regimens"][r]["auc"]["se_noise"] > 0 for r in REGIMENS)
    assert out["candidates"] == combine([exact])["candidates"]  # exact sites alone
    assert out["sites"]["dp"]["auc"]["se_noise"] > 0
    alone = combine([exact])["sites"]["exact"]  # its own numbers are unchanged
    for key in ("auc", "brier", "calibration", "dice", "n"):
        assert out["sites"]["exact"][key] == alone[key]
    assert 0.0 <= out["dice"] <= 1.0
