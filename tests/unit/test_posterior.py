"""The linear head's Bayesian logistic regression: sums, Newton, Laplace."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from shared_model.posterior import (
    BLOCKS,
    GlmSums,
    Posterior,
    fit_pooled,
    glm_sums,
    linear_predictor,
    newton_step,
    prior_precision,
    verify_sums,
    with_intercept,
)


def _world(n: int, d: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d))
    regimen = rng.integers(0, 3, size=n)
    beta = rng.normal(scale=0.6, size=(BLOCKS, d + 1))
    beta[0, -1] = 0.0
    eta = linear_predictor(with_intercept(z), regimen, beta)
    y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float)
    return z, regimen, y, beta


def test_gradient_and_hessian_match_finite_differences() -> None:
    z, a, y, _ = _world(60, 3, 0)
    beta = np.random.default_rng(1).normal(scale=0.3, size=(BLOCKS, 4))
    s = glm_sums(z, a, y, beta)
    eps = 1e-6
    flat = beta.ravel()
    for k in (0, 5, 9, 14):
        up, down = flat.copy(), flat.copy()
        up[k] += eps
        down[k] -= eps
        lu = glm_sums(z, a, y, up.reshape(beta.shape)).loglik
        ld = glm_sums(z, a, y, down.reshape(beta.shape)).loglik
        assert -(lu - ld) / (2 * eps) == pytest.approx(s.grad[k], abs=1e-5)
        gu = glm_sums(z, a, y, up.reshape(beta.shape)).grad
        gd = glm_sums(z, a, y, down.reshape(beta.shape)).grad
        assert np.allclose((gu - gd) / (2 * eps), s.hess[:, k], atol=1e-5)


def test_unknown_outcomes_are_skipped() -> None:
    z, a, y, beta = _world(40, 2, 2)
    y2 = y.copy()
    y2[:10] = np.nan
    assert glm_sums(z, a, y2, beta).n == 30
    ref = glm_sums(z[10:], a[10:], y[10:], beta)
    assert np.allclose(glm_sums(z, a, y2, beta).grad, ref.grad)


def test_the_federated_fit_equals_the_pooled_fit() -> None:
    """Sites' sums add up to the pooled ones, so Newton on them is the pooled
    fit: the same to 1e-6."""
    z, a, y, _ = _world(300, 4, 3)
    pooled, _ = fit_pooled(z, a, y, lam=1.0, tol=1e-12)
    sites = np.array_split(np.arange(300), [90, 210])
    precision = prior_precision(5, 1.0)
    beta = np.zeros((BLOCKS, 5))
    for _ in range(30):
        total = GlmSums.zero(BLOCKS * 5)
        for idx in sites:
            total = total + glm_sums(z[idx], a[idx], y[idx], beta)
        beta = newton_step(beta, total, precision)
    total = sum(
        (glm_sums(z[i], a[i], y[i], beta) for i in sites), GlmSums.zero(BLOCKS * 5)
    )
    federated = Posterior.at_mode(beta, total, precision, 1.0)
    assert np.max(np.abs(federated.mean - pooled.mean)) < 1e-6
    assert np.max(np.abs(federated.cov - pooled.cov)) < 1e-6


def test_the_laplace_intervals_cover_the_true_coefficients() -> None:
    """Data drawn from a known model with a weak prior: each regimen's
    coefficients (prognosis + expert) fall in their 90 % Laplace interval at
    about the nominal rate."""
    hits, total = 0, 0
    for seed in range(60):
        z, a, y, beta = _world(600, 2, 100 + seed)
        post, _ = fit_pooled(z, a, y, lam=1e-3)
        p_len = 3
        cov = post.cov.reshape(BLOCKS, p_len, BLOCKS, p_len)
        for r in range(3):
            true = beta[0] + beta[1 + r]
            mean = post.mean[0] + post.mean[1 + r]
            var = np.diag(
                cov[0, :, 0, :] + cov[1 + r, :, 1 + r, :] + 2 * cov[0, :, 1 + r, :]
            )
            hits += int(np.sum(np.abs(mean - true) <= 1.645 * np.sqrt(var)))
            total += p_len
    assert 0.85 <= hits / total <= 0.95


def test_gain_probability_is_the_gaussian_tail_of_the_logit_difference() -> None:
    z, a, y, _ = _world(200, 3, 4)
    post, _ = fit_pooled(z, a, y, lam=1.0)
    draws = np.random.default_rng(0).multivariate_normal(
        post.mean.ravel(), post.cov, size=20000
    )
    x = with_intercept(z[:5])
    p = post.gain_probability(z[:5], reference=2)
    assert np.allclose(p[:, 2], 0.5)
    for alt in (0, 1):
        b = draws.reshape(-1, BLOCKS, 4)
        diff = x @ (b[:, 1 + alt] - b[:, 3]).T
        assert np.allclose((diff > 0).mean(axis=1), p[:, alt], atol=0.02)
    mean, sd = post.logit_difference(z[:5], 0, 2)
    assert np.allclose(p[:, 0], norm.cdf(mean / sd))


def test_posterior_arrays_round_trip_and_refuse_nonsense() -> None:
    z, a, y, _ = _world(100, 2, 5)
    post, _ = fit_pooled(z, a, y, lam=3.0)
    again = Posterior.from_arrays(post.to_arrays())
    assert np.array_equal(again.mean, post.mean) and again.lam == 3.0
    bad = {**post.to_arrays(), "posterior.cov": np.full_like(post.cov, np.nan)}
    with pytest.raises(ValueError, match="non-finite"):
        Posterior.from_arrays(bad)


def test_hostile_sums_are_named() -> None:
    z, a, y, beta = _world(50, 2, 6)
    good = glm_sums(z, a, y, beta)
    size = good.grad.size
    assert verify_sums(good, size, 50) is None
    assert "declared" in verify_sums(good, size, 10)
    nan = GlmSums(good.n, good.loglik, good.grad * np.nan, good.hess)
    assert "NaN" in verify_sums(nan, size, 50)
    neg = GlmSums(good.n, good.loglik, good.grad, -good.hess)
    assert "positive semi-definite" in verify_sums(neg, size, 50)
    lop = GlmSums(good.n, good.loglik, good.grad, good.hess + np.triu(good.hess, 1))
    assert "symmetric" in verify_sums(lop, size, 50)
    assert "log-likelihood" in verify_sums(
        GlmSums(1, 3.0, good.grad, good.hess), size, 9
    )
    assert "shape" in verify_sums(GlmSums(1, -1.0, good.grad[:3], good.hess), size, 9)


def test_recalibration_brings_an_over_confident_head_to_a_held_out_slope_near_1() -> (
    None
):
    """A head fitted with almost no prior on few patients is over-confident
    (held-out calibration slope well below 1); Platt recalibration on a
    validation set, folded into the coefficients, brings it to 0.8-1.2."""
    from sklearn.linear_model import LogisticRegression

    from shared_model.posterior import recalibrate, recalibration_step

    def slope(beta: np.ndarray, z: np.ndarray, a: np.ndarray, y: np.ndarray) -> float:
        eta = linear_predictor(with_intercept(z), a, beta)
        return float(
            LogisticRegression(C=1e12, max_iter=5000).fit(eta[:, None], y).coef_[0, 0]
        )

    z, a, y, _ = _world(3000, 10, 20)
    train, val, test = slice(0, 150), slice(150, 1150), slice(1150, 3000)
    post, _ = fit_pooled(z[train], a[train], y[train], lam=1e-3)
    before = slope(post.mean, z[test], a[test], y[test])
    theta = np.array([1.0, 0.0])
    for _ in range(20):
        s = glm_sums(z[val], a[val], y[val], recalibrate(post.mean, *theta))
        theta = recalibration_step(post.mean, theta, s.grad, s.hess)
    after = slope(post.recalibrated(*theta).mean, z[test], a[test], y[test])
    assert before < 0.7 and 0.8 <= after <= 1.2
    # P(gain) does not change with recalibration
    g1 = post.gain_probability(z[:20], 1)
    g2 = post.recalibrated(*theta).gain_probability(z[:20], 1)
    assert np.allclose(g1, g2)


def test_every_mode_lies_in_the_prior_ball_and_the_ball_holds_what_leaves_it() -> None:
    from shared_model.posterior import within_prior_ball

    rng = np.random.default_rng(5)
    for lam in (0.3, 3.0):
        # separable data: the likelihood alone would send the mode to infinity
        z = rng.normal(size=(40, 3))
        y = (z[:, 0] > 0).astype(float)
        regimen = rng.integers(0, 3, 40)
        post, _ = fit_pooled(z, regimen, y, lam)
        precision = prior_precision(4, lam)
        np.testing.assert_array_equal(
            within_prior_ball(post.mean, precision, 40), post.mean
        )
        far = post.mean * 1e6
        back = within_prior_ball(far, precision, 40)
        q = float(back.ravel() @ (precision * back.ravel()))
        assert q == pytest.approx(2 * 40 * np.log(2))
        np.testing.assert_allclose(
            back / np.linalg.norm(back), far / np.linalg.norm(far)
        )
