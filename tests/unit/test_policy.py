"""Recommendations and off-policy value: rule, estimators against the truth."""

from __future__ import annotations

import numpy as np
import pytest

from shared_model.clinical import REGIMENS
from shared_model.policy import RecommendationRule, direction, recommend
from shared_model.policy_value import (
    OracleSums,
    PolicySums,
    fit_propensity,
    policy_terms,
    policy_value,
    propensities,
    site_policy_sums,
)

# REGIMENS order: nCRT, TNT, nCT; intensity nCT < nCRT < TNT


def test_least_intensive_regimen_within_the_margin() -> None:
    probs = np.array(
        [
            [0.30, 0.33, 0.10],  # TNT best, nCRT within 0.05 -> nCRT
            [0.20, 0.40, 0.38],  # TNT best, nCT within 0.05 -> nCT
            [0.20, 0.40, 0.30],  # only TNT -> TNT
            [0.50, 0.20, 0.46],  # nCRT best, nCT within -> nCT
        ]
    )
    assert recommend(probs).tolist() == [0, 2, 1, 2]
    assert recommend(probs, RecommendationRule(margin=0.0)).tolist() == [1, 1, 1, 0]
    no_nct = RecommendationRule(allowed=("nCRT", "TNT"))
    assert recommend(probs, no_nct).tolist() == [0, 1, 1, 0]
    assert direction(1, 0) == "escalate" and direction(2, 0) == "de-intensify"
    assert direction(0, 0) == "maintain" and direction(0, 2) == "escalate"
    with pytest.raises(ValueError):
        RecommendationRule(margin=1.5)


def population(n: int, seed: int, bias: float = 0.0) -> dict[str, np.ndarray]:
    """Clinical one-hot, confounded regimen choice, true potential outcomes and
    a model whose predictions are the truth plus noise (and a bias)."""
    rng = np.random.default_rng(seed)
    risk = rng.integers(0, 3, n)
    clinical = np.eye(3)[risk]
    logits = np.stack(
        [np.zeros(n), 0.9 * risk - 0.8, -1.0 - 0.9 * risk], axis=1
    )  # TNT for high risk, nCT for low risk
    e_true = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    received = np.array([rng.choice(3, p=row) for row in e_true])
    base = np.array([0.18, 0.30, 0.20])
    true_p = np.clip(base[None, :] + 0.08 * (1 - risk)[:, None] * [[1, 0.5, 2]], 0, 1)
    outcome = (rng.random(n) < true_p[np.arange(n), received]).astype(float)
    model = np.clip(true_p + rng.normal(0, 0.03, true_p.shape) + bias, 0.001, 0.999)
    return {
        "clinical": clinical,
        "received": received,
        "outcome": outcome,
        "true_p": true_p,
        "model": model,
    }


def estimate(pop: dict[str, np.ndarray], sites: int = 3) -> dict:
    total = PolicySums()
    for part in np.array_split(np.arange(len(pop["received"])), sites):
        fit, classes = fit_propensity(pop["clinical"][part], pop["received"][part])
        e = propensities(fit, classes, pop["clinical"][part])
        total = total + site_policy_sums(
            pop["model"][part], pop["received"][part], pop["outcome"][part], e
        )
    return policy_value(total)


def true_value(pop: dict[str, np.ndarray]) -> float:
    rec = recommend(pop["model"])
    return float(pop["true_p"][np.arange(len(rec)), rec].mean())


def test_ipw_and_dr_intervals_cover_the_true_value() -> None:
    covered = {"ipw": 0, "dr": 0}
    for seed in range(20):
        pop = population(900, seed)
        value = estimate(pop)
        truth = true_value(pop)
        for k in covered:
            lo, hi = value[k]["ci"]
            covered[k] += lo <= truth <= hi
    assert covered["dr"] >= 17 and covered["ipw"] >= 17, covered


def test_a_biased_model_fools_itself_but_not_the_doubly_robust_estimate() -> None:
    pop = population(3000, 7, bias=0.15)
    value = estimate(pop)
    truth = true_value(pop)
    assert value["model_estimate"]["value"] > truth + 0.12  # the circular number
    lo, hi = value["dr"]["ci"]
    assert lo <= truth <= hi
    assert value["observed"]["value"] == pytest.approx(pop["outcome"].mean())


def test_site_sums_equal_the_pooled_per_patient_terms() -> None:
    pop = population(300, 3)
    e = np.full((300, 3), 1 / 3)
    rec = recommend(pop["model"])
    terms = policy_terms(pop["model"], pop["received"], pop["outcome"], e, rec)
    sums = site_policy_sums(pop["model"], pop["received"], pop["outcome"], e)
    for k, v in terms.items():
        assert sums.sums[k] == pytest.approx(v.sum())
        assert policy_value(sums)[k]["value"] == pytest.approx(v.mean())
        se = v.std(ddof=1) / np.sqrt(len(v))
        assert policy_value(sums)[k]["se"] == pytest.approx(se, rel=1e-9)
    # textbook IPW: follow the advice, weight by 1 / propensity
    follows = pop["received"] == rec
    assert sums.sums["ipw"] == pytest.approx(3.0 * pop["outcome"][follows].sum())
    assert sum(sums.directions.values()) == 300 == sums.n


def test_positivity_is_diagnosed_and_records_round_trip() -> None:
    pop = population(200, 4)
    e = np.zeros((200, 3))
    e[:, 0] = 0.97
    e[:, 1] = 0.03  # TNT rare; nCT never given here
    pop["received"][:] = 0
    sums = site_policy_sums(pop["model"], pop["received"], pop["outcome"], e)
    value = policy_value(sums)
    assert sums.never_given == sums.recommended["nCT"] > 0
    assert sums.low_propensity == sums.recommended["TNT"]
    assert any("never gives" in w for w in value["positivity"]["warnings"])
    back = PolicySums.from_values(sums.to_values())
    assert back == sums
    broken = sums.to_values() | {"policy-dir-maintain": -5}
    with pytest.raises(ValueError):
        PolicySums.from_values(broken)


def test_combine_chooses_the_threshold_on_validation_and_applies_it_unchanged() -> None:
    from shared_model.federated_metrics import ScoreCounts
    from shared_model.site_evaluation import SiteEvaluation, combine

    def site(name: str, seed: int) -> SiteEvaluation:
        pop = population(120, seed)
        rows = np.arange(120)
        scores = pop["model"][rows, pop["received"]]
        counts = {
            r: ScoreCounts.from_scores(
                scores[pop["received"] == j].tolist(),
                pop["outcome"][pop["received"] == j].tolist(),
            )
            for j, r in enumerate(("nCRT", "TNT", "nCT"))
        }
        sums = site_policy_sums(
            pop["model"], pop["received"], pop["outcome"], np.full((120, 3), 1 / 3)
        )
        truth = OracleSums.from_probabilities(np.full((120, 3), 0.25), np.zeros(120))
        return SiteEvaluation(name, "validation", counts, 0.0, 0, sums, truth)

    val = combine([site("a", 1), site("b", 2)])
    t = val["thresholds"]["sensitivity>=0.8"]
    assert (
        val["overall"]["operating_points"]["sensitivity>=0.8"]["sensitivity"]["value"]
        >= 0.8
    )
    pro = combine([site("c", 3)], threshold_sensitivity=t)
    assert pro["thresholds"]["sensitivity>=0.8"] == t
    assert pro["threshold_chosen_on"] == "validation"
    assert val["policy_value"]["oracle"]["value"] == pytest.approx(0.25)
    assert val["policy_value"]["oracle"]["n"] == 240
    assert set(val["sites"]) == {"a", "b"} and val["n"] == 240


def test_paired_mcnemar_counts_from_the_sites() -> None:
    from shared_model.model_comparison import compare_models
    from shared_model.site_evaluation import SiteEvaluation

    y = np.array([1, 1, 0, 0, 1, 0], float)
    a_scores = np.array([0.9, 0.2, 0.1, 0.7, 0.6, 0.3])  # right: T F T F T T
    b_scores = np.array([0.9, 0.8, 0.6, 0.1, 0.2, 0.3])  # right: T T F T F T

    def ev(scores: np.ndarray) -> SiteEvaluation:
        return SiteEvaluation(
            "s",
            "validation",
            {},
            0.0,
            0,
            PolicySums(),
            local_scores=np.stack([scores, y], axis=1),
        )

    th = {"validation": {"thresholds": {"0.5": 0.5}}}
    out = compare_models([ev(a_scores)], [ev(b_scores)], th, th)
    m = out["validation"]["0.5"]
    assert (m["b"], m["c"]) == (2, 2) and m["p_value"] == pytest.approx(1.0)
    th_b = {"validation": {"thresholds": {"0.5": 0.85}}}  # B at its own threshold
    m = compare_models([ev(a_scores)], [ev(b_scores)], th, th_b)["validation"]["0.5"]
    assert (m["b"], m["c"]) == (1, 1)  # B now calls only patient 0 a responder


def test_dfs_by_advice_from_site_counts_equals_lifelines_on_pooled() -> None:
    """Kaplan-Meier per advice group and the log-rank tests, from what each
    site sends (counts through to_values/from_values), equal lifelines on the
    pooled patients' (month-binned) times."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test, multivariate_logrank_test

    from shared_model.federated_metrics import ScoreCounts
    from shared_model.site_evaluation import ADVICE_GROUPS, SiteEvaluation, combine
    from shared_model.survival import SurvivalCounts

    rng = np.random.default_rng(4)
    pooled: dict[str, list[tuple[float, int]]] = {g: [] for g in ADVICE_GROUPS}
    sites = []
    for name in ("a", "b", "c"):
        survival = {}
        groups = {}
        for g in ("escalate", "maintain", "de-intensify"):
            n = int(rng.integers(15, 40))
            t = np.ceil(rng.exponential(40 if g == "maintain" else 25, n))
            e = (rng.random(n) < 0.7).astype(int)
            groups[g] = (t, e)
        groups["followed"] = groups["maintain"]
        groups["not-followed"] = tuple(
            np.concatenate([groups["escalate"][i], groups["de-intensify"][i]])
            for i in (0, 1)
        )
        for g, (t, e) in groups.items():
            survival[g] = SurvivalCounts.from_times(t, e)
            pooled[g] += list(zip(np.minimum(t, 120), e * (t <= 120), strict=True))
        counts = {r: ScoreCounts.empty() for r in ("nCRT", "TNT", "nCT")}
        ev = SiteEvaluation(
            name, "test", counts, 0.0, 0, PolicySums(), survival=survival
        )
        sites.append(SiteEvaluation.from_values(name, "test", ev.to_values()))
    report = combine(sites, choose_threshold=False)["survival"]
    for g in ADVICE_GROUPS:
        t, e = (np.array(x) for x in zip(*pooled[g], strict=True))
        km = KaplanMeierFitter().fit(t, e)
        ours = report["kaplan_meier"][g]
        expected = km.survival_function_at_times(ours["times"]).to_numpy()
        assert np.allclose(ours["survival"], expected, atol=1e-10)
    d = {g: np.array(pooled[g]) for g in ("escalate", "maintain", "de-intensify")}
    multi = multivariate_logrank_test(
        np.concatenate([v[:, 0] for v in d.values()]),
        np.concatenate([[g] * len(v) for g, v in d.items()]),
        np.concatenate([v[:, 1] for v in d.values()]),
    )
    assert report["logrank_directions"]["p_value"] == pytest.approx(multi.p_value)
    f, nf = np.array(pooled["followed"]), np.array(pooled["not-followed"])
    two = logrank_test(f[:, 0], nf[:, 0], f[:, 1], nf[:, 1])
    assert report["logrank_followed"]["chi2"] == pytest.approx(two.test_statistic)


def test_an_expert_below_its_support_is_never_recommended() -> None:
    from server.run_folder import expert_support
    from shared_model.policy import supported_regimens

    allowed, why = supported_regimens({"nCRT": 99, "TNT": 46, "nCT": 0}, 30)
    assert allowed == ("nCRT", "TNT")
    assert "0 patients" in why["nCT"] and "min-expert-support" in why["nCT"]
    # the untrained expert says 0.9 for everyone: it is still never advised
    probs = np.array([[0.2, 0.3, 0.9], [0.1, 0.1, 0.95], [0.4, 0.2, 0.99]])
    advice = recommend(probs, RecommendationRule(allowed=allowed))
    assert 2 not in advice
    assert supported_regimens(None, 30) == (REGIMENS, {})
    # no expert with enough support: advice is withheld, the received regimen stands
    allowed, why = supported_regimens({"nCRT": 26, "TNT": 17, "nCT": 0}, 30)
    assert allowed == () and len(why) == 3
    rule = RecommendationRule(allowed=allowed)
    assert rule.withheld
    assert list(recommend(probs, rule, [1, 0, 1])) == [1, 0, 1]
    with pytest.raises(ValueError, match="withheld"):
        recommend(probs, rule)
    rounds = [
        {"stage": "segmentation", "groups": {"expert/nCT": {"n": 99, "updated": True}}},
        {"stage": "heads", "groups": {"expert/nCT": {"n": 21, "updated": True}}},
        {"stage": "heads", "groups": {"expert/TNT": {"n": 63, "updated": False}}},
        {"groups": {"expert/nCRT": {"n": 99, "updated": True}}},  # joint (old records)
    ]
    assert expert_support(rounds) == {"nCRT": 99, "TNT": 0, "nCT": 21}
