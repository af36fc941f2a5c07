"""The advice rule that declines rather than guesses, its choice on validation,
and the rule a checkpoint carries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared_model.checkpoint import load_rule, save_checkpoint
from shared_model.clinical import REGIMENS
from shared_model.errors import ConfigError
from shared_model.policy import RecommendationRule, recommend
from shared_model.posterior import BLOCKS, Posterior, fit_pooled
from shared_model.rule_choice import candidate_rules, choose

TNT, NCRT, NCT = REGIMENS.index("TNT"), REGIMENS.index("nCRT"), REGIMENS.index("nCT")


def _posterior(seed: int = 0, n: int = 300) -> tuple[Posterior, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    a = rng.integers(0, 3, size=n)
    eta = 0.8 * z[:, 0] * (a == NCT) - 0.3 + 0.5 * (a == TNT)
    y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float)
    post, _ = fit_pooled(z, a, y, lam=1.0)
    return post, z


def test_the_switch_rule_never_switches_below_q_and_keeps_the_reference() -> None:
    post, z = _posterior()
    probs = np.full((len(z), 3), 0.3)
    for q in (0.6, 0.8, 0.95):
        rule = RecommendationRule(kind="switch", reference="TNT", q=q, posterior=post)
        rec = recommend(probs, rule, design=z)
        gain = post.gain_probability(z, TNT)
        switched = rec != TNT
        assert (gain[np.arange(len(z)), rec][switched] >= q).all()
        others = np.delete(gain, TNT, axis=1)
        assert (others[~switched] < q).all()  # every kept patient: no alt reaches q
    loose = RecommendationRule(kind="switch", reference="TNT", q=0.6, posterior=post)
    strict = RecommendationRule(kind="switch", reference="TNT", q=0.95, posterior=post)
    assert (recommend(probs, strict, design=z) != TNT).sum() <= (
        recommend(probs, loose, design=z) != TNT
    ).sum()


def test_unsupported_alternatives_are_never_advised() -> None:
    post, z = _posterior()
    probs = np.full((len(z), 3), 0.3)
    only = RecommendationRule(
        kind="switch", reference="TNT", q=0.5, allowed=("TNT",), posterior=post
    )
    assert (recommend(probs, only, design=z) == TNT).all()
    no_nct = RecommendationRule(
        kind="switch", reference="TNT", q=0.5, allowed=("nCRT", "TNT"), posterior=post
    )
    assert (recommend(probs, no_nct, design=z) != NCT).all()
    with pytest.raises(ValueError, match="reference"):
        RecommendationRule(
            kind="switch", reference="nCT", allowed=("TNT",), posterior=post
        )
    with pytest.raises(ValueError, match="posterior"):
        RecommendationRule(kind="switch")


def test_fixed_and_argmax_rules() -> None:
    probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.4, 0.59]])
    assert list(
        recommend(probs, RecommendationRule(kind="fixed", reference="nCRT"))
    ) == [
        NCRT,
        NCRT,
    ]
    assert list(recommend(probs, RecommendationRule(kind="argmax"))) == [1, 0]
    assert list(recommend(probs, RecommendationRule(kind="margin"))) == [1, 2]


def _value(dr: float, gain_low: float, switched: int = 0) -> dict:
    return {
        "dr": {"value": dr, "se": 0.01, "ci": (dr - 0.02, dr + 0.02)},
        "gain_over_first": {"value": 0.0, "se": 0.01, "ci": (gain_low, gain_low + 0.1)},
        "switched": switched,
        "n": 45,
    }


def test_the_guideline_stays_the_reference_unless_another_is_better_with_confidence() -> (
    None
):
    post, _ = _posterior()
    cands = candidate_rules(REGIMENS, "TNT", post)
    assert cands[0].kind == "fixed" and cands[0].reference == "TNT"
    # nCT for everyone looks better on average but not with confidence: kept TNT
    values = [
        _value(0.40 if c.kind == "fixed" and c.reference == "nCT" else 0.30, -0.05)
        for c in cands
    ]
    rule, table = choose(cands, values)
    assert rule.reference == "TNT" and len(table) == len(cands)
    # a switch rule with the best value wins only when its gain over the
    # guideline for everyone is confident; ties go to the more conservative
    values = [_value(0.30, -0.05) for _ in cands]
    for i, c in enumerate(cands):
        if c.kind == "switch" and c.reference == "TNT" and c.q == 0.9:
            values[i] = _value(0.33, -0.05, switched=4)
    rule, _ = choose(cands, values)
    assert rule.kind == "fixed" and rule.reference == "TNT"  # a gain inside noise
    for i, c in enumerate(cands):
        if c.kind == "switch" and c.reference == "TNT":
            values[i] = _value(0.33 if c.q == 0.9 else 0.32, 0.01, switched=4)
    rule, _ = choose(cands, values)
    assert rule.kind == "switch" and rule.q == 0.9
    tied = [_value(0.30, -0.05) for _ in cands]
    rule, _ = choose(cands, tied)
    assert rule.kind == "fixed" and rule.reference == "TNT"
    # with confidence another regimen becomes the reference
    values = [
        _value(0.45, 0.01) if c.kind == "fixed" and c.reference == "nCRT" else v
        for c, v in zip(cands, tied, strict=True)
    ]
    rule, _ = choose(cands, values)
    assert rule.reference == "nCRT" and rule.kind == "fixed"
    # a switch away from the new reference must beat that reference's value too
    for below in (True, False):
        for i, c in enumerate(cands):
            if c.kind == "switch" and c.reference == "nCRT":
                values[i] = _value(0.44 if below else 0.47, 0.01, switched=3)
        rule, _ = choose(cands, values)
        assert rule.reference == "nCRT"
        assert rule.kind == ("fixed" if below else "switch")
    fixed, _ = choose(cands, tied, fixed_q=0.95, posterior=post)
    assert fixed.kind == "switch" and fixed.q == 0.95 and fixed.reference == "TNT"


def test_the_checkpoint_carries_its_rule_and_every_scorer_reads_it(
    tmp_path: Path,
) -> None:
    """The rule saved with the model comes back whatever the defaults are now."""
    from shared_model.model import build_model
    from shared_model.model_config import ModelConfig
    from shared_model.plan import PRESET_PLANS
    from shared_model.policy import DEFAULT_MARGIN

    plan = PRESET_PLANS["tiny"]
    cfg = ModelConfig.from_plan(plan)
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "head": "linear", "expert_hidden": 0})
    model = build_model(cfg)
    p_len = model.glm_coefficients().shape[1]
    post = Posterior(np.zeros((BLOCKS, p_len)), np.eye(BLOCKS * p_len), 2.0)
    rule = RecommendationRule(kind="switch", reference="TNT", q=0.95, posterior=post)
    save_checkpoint(model, tmp_path, plan=plan, rule=rule)
    again = load_rule(tmp_path)
    assert again == rule and again is not None and again.posterior is not None
    assert np.array_equal(again.posterior.cov, post.cov)
    assert again.margin == DEFAULT_MARGIN  # not what a switch rule uses
    (tmp_path / "advice.safetensors").unlink()
    with pytest.raises(ConfigError, match="posterior"):
        load_rule(tmp_path)
    save_checkpoint(model, tmp_path / "old", plan=plan)
    assert load_rule(tmp_path / "old") is None  # an older checkpoint: no rule


def test_glm_coefficients_round_trip_through_the_model() -> None:
    from shared_model.model import build_model
    from shared_model.model_config import ModelConfig
    from shared_model.plan import PRESET_PLANS

    cfg = ModelConfig.from_plan(PRESET_PLANS["tiny"])
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "head": "linear", "expert_hidden": 0})
    model = build_model(cfg)
    beta = np.random.default_rng(0).normal(size=model.glm_coefficients().shape)
    model.set_glm_coefficients(beta)
    assert np.allclose(model.glm_coefficients(), beta, atol=1e-6)
    import torch

    feats = torch.randn(4, model.n_features)
    clinical = torch.zeros(4, 15)
    with torch.no_grad():
        z = model.head_input(feats, clinical).double().numpy()
        got = model.head(feats, clinical).double().numpy()
    x = np.concatenate([z, np.ones((4, 1))], axis=1)
    expected = x @ beta[0][:, None] + x @ beta[1:].T

    assert np.allclose(got, expected, atol=1e-4)


def test_scorers_use_the_checkpoints_rule_whatever_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changing the defaults does not change what a saved model advises; a
    what-if is explicit and recorded."""
    import shared_model.policy as policy
    from client.scoring.evaluation import scoring_rule
    from shared_model.model import build_model
    from shared_model.model_config import ModelConfig
    from shared_model.plan import PRESET_PLANS

    plan = PRESET_PLANS["tiny"]
    cfg = ModelConfig.from_plan(plan)
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "head": "linear", "expert_hidden": 0})
    model = build_model(cfg)
    p_len = model.glm_coefficients().shape[1]
    post = Posterior(np.zeros((BLOCKS, p_len)), np.eye(BLOCKS * p_len), 2.0)
    saved = RecommendationRule(kind="switch", reference="TNT", q=0.95, posterior=post)
    save_checkpoint(model, tmp_path, plan=plan, rule=saved)
    monkeypatch.setattr(policy, "DEFAULT_MARGIN", 0.3)
    monkeypatch.setattr(policy, "GUIDELINE", "nCRT")
    rule, record = scoring_rule(tmp_path)
    assert rule == saved and record["from_checkpoint"] and "what_if" not in record
    what_if, record = scoring_rule(tmp_path, what_if="argmax")
    assert what_if.kind == "argmax" and record["what_if"]["instead_of"]["q"] == 0.95
    with pytest.raises(ConfigError, match="what-if"):
        scoring_rule(tmp_path, what_if="bogus")
