"""The linear pCR head as a Bayesian logistic regression: a federated Newton fit
and its Laplace posterior (no Flower here).

The linear head (``head: linear``, linear residual experts) gives each patient
``logit_r = x . B_0 + x . B_r`` under regimen ``r``, with ``x = [z, 1]`` (``z``:
the standardised tumour features and the clinical one-hot, the experts' input)
and ``B`` the ``(4, P)`` rows prognosis, nCRT, TNT, nCT. Under the received
regimen it is an ordinary logistic regression on an expanded design (``x`` in
block 0 and in block ``1 + r``), so:

* each site sends the gradient and Hessian of its patients' negative
  log-likelihood at the current coefficients (:func:`glm_sums`); their sums
  are the pooled ones, and a Newton step on them
  (:func:`newton_step`) with a Gaussian prior is the pooled fit's step: after a
  few rounds the federation holds the pooled maximum a posteriori fit, the
  same to rounding as fitting all patients in one place (a test checks 1e-6);
* the Laplace approximation at that fit, ``N(B, (H + Lambda)^-1)``, is the
  posterior over the head (:class:`Posterior`), from which each patient's
  probability that one regimen gives a higher pCR than another follows in
  closed form (:meth:`Posterior.gain_probability`): the logit difference is
  linear in ``B``, so it is Gaussian, and ``P(p_alt > p_ref) = Phi(mu / sd)``.

The prior (:func:`prior_precision`): precision ``lam`` on every weight, a
weak one on the experts' intercepts (each regimen's baseline is learnt
freely), and the prognosis intercept pinned at 0 (it and the experts'
intercepts are otherwise one direction the data cannot tell apart). ``lam``
is chosen on the federated validation split (its log-loss), never on a test
cohort.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import norm

from shared_model.clinical import REGIMENS

BLOCKS = len(REGIMENS) + 1
"""Rows of ``B``: the prognosis head, then one expert per regimen."""

PIN = 1e6
"""Prior precision that holds the prognosis intercept at 0."""

INTERCEPT_PRECISION = 1e-2
"""Prior precision on each expert's intercept (a regimen's baseline)."""


def with_intercept(z: np.ndarray) -> np.ndarray:
    """``x = [z, 1]``, ``(n, P)``."""
    z = np.asarray(z, np.float64)
    return np.concatenate([z, np.ones((len(z), 1))], axis=1)


@dataclass(frozen=True)
class GlmSums:
    """A site's sums at one set of coefficients: patients, log-likelihood, the
    gradient ``(4P,)`` and Hessian ``(4P, 4P)`` of the negative log-likelihood."""

    n: int
    loglik: float
    grad: np.ndarray
    hess: np.ndarray

    def __add__(self, other: GlmSums) -> GlmSums:
        return GlmSums(
            self.n + other.n,
            self.loglik + other.loglik,
            self.grad + other.grad,
            self.hess + other.hess,
        )

    @classmethod
    def zero(cls, size: int) -> GlmSums:
        return cls(0, 0.0, np.zeros(size), np.zeros((size, size)))


def linear_predictor(
    x: np.ndarray, regimen: np.ndarray, beta: np.ndarray
) -> np.ndarray:
    """``logit`` under each patient's regimen, ``(n,)``; ``beta`` is ``(4, P)``."""
    b = np.asarray(beta, np.float64)
    return x @ b[0] + np.einsum("ij,ij->i", x, b[1 + np.asarray(regimen, int)])


def glm_sums(
    z: np.ndarray, regimen: np.ndarray, outcome: np.ndarray, beta: np.ndarray
) -> GlmSums:
    """Negative log-likelihood gradient and Hessian at ``beta`` ``(4, P)`` over
    the patients with a known outcome (``outcome`` NaN: skipped)."""
    y = np.asarray(outcome, np.float64)
    known = ~np.isnan(y)
    x = with_intercept(np.asarray(z)[known])
    a = np.asarray(regimen, int)[known]
    y = y[known]
    p_len = x.shape[1]
    size = BLOCKS * p_len
    if not len(y):
        return GlmSums.zero(size)
    eta = linear_predictor(x, a, beta)
    prob = 1.0 / (1.0 + np.exp(-eta))
    loglik = float(np.sum(y * eta - np.logaddexp(0.0, eta)))
    resid, weight = prob - y, prob * (1.0 - prob)
    grad = np.zeros((BLOCKS, p_len))
    hess = np.zeros((BLOCKS, p_len, BLOCKS, p_len))
    grad[0] = x.T @ resid
    hess[0, :, 0, :] = (x * weight[:, None]).T @ x
    for r in range(len(REGIMENS)):
        rows = a == r
        if not rows.any():
            continue
        xr = x[rows]
        block = (xr * weight[rows, None]).T @ xr
        grad[1 + r] = xr.T @ resid[rows]
        hess[1 + r, :, 1 + r, :] = block
        hess[0, :, 1 + r, :] = block
        hess[1 + r, :, 0, :] = block
    return GlmSums(int(len(y)), loglik, grad.ravel(), hess.reshape(size, size))


def prior_precision(p_len: int, lam: float) -> np.ndarray:
    """The prior's diagonal precision ``(4P,)`` (see the module docstring)."""
    out = np.full((BLOCKS, p_len), float(lam))
    out[:, -1] = INTERCEPT_PRECISION
    out[0, -1] = PIN
    return out.ravel()


def newton_step(beta: np.ndarray, sums: GlmSums, precision: np.ndarray) -> np.ndarray:
    """One Newton step of the posterior mode: ``beta - (H + Lambda)^-1 (g +
    Lambda beta)`` on the pooled sums; ``beta`` is ``(4, P)``."""
    b = np.asarray(beta, np.float64).ravel()
    hess = sums.hess + np.diag(precision)
    step = np.linalg.solve(hess, sums.grad + precision * b)
    return (b - step).reshape(np.shape(beta))


def within_prior_ball(beta: np.ndarray, precision: np.ndarray, n: int) -> np.ndarray:
    """``beta`` drawn back radially (in the prior's metric) into the ball
    ``beta' Lambda beta <= 2 n log 2``. Every posterior mode of ``n`` patients
    lies in it, whatever their data: the mode's log posterior is at least the
    zero vector's, ``-n log 2``, and its log-likelihood at most 0. So the
    projection never moves an honest fit's mode, and bounds what any reply
    can do to the coefficients."""
    b = np.asarray(beta, np.float64)
    q = float(b.ravel() @ (precision * b.ravel()))
    limit = 2.0 * max(n, 1) * math.log(2.0)
    return b if q <= limit else b * math.sqrt(limit / q)


def log_posterior(beta: np.ndarray, sums: GlmSums, precision: np.ndarray) -> float:
    """The (unnormalised) log posterior at ``beta`` from its sums there."""
    b = np.asarray(beta, np.float64).ravel()
    return sums.loglik - 0.5 * float(b @ (precision * b))


@dataclass(frozen=True)
class Posterior:
    """The Laplace posterior over the linear head: ``mean`` ``(4, P)``,
    ``cov`` ``(4P, 4P)``, and the prior's ``lam`` it was fitted with."""

    mean: np.ndarray
    cov: np.ndarray
    lam: float

    @classmethod
    def at_mode(
        cls, beta: np.ndarray, sums: GlmSums, precision: np.ndarray, lam: float
    ) -> Posterior:
        """The Laplace approximation at the mode ``beta`` (its sums there)."""
        cov = np.linalg.inv(sums.hess + np.diag(precision))
        return cls(np.asarray(beta, np.float64), 0.5 * (cov + cov.T), float(lam))

    def recalibrated(self, slope: float, shift: float) -> Posterior:
        """The posterior of ``shift + slope * logit``: the linear head rescaled
        (every coefficient times ``slope``, ``shift`` added to each expert's
        intercept) and the covariance with it. The probability that one
        regimen beats another is unchanged (the logit differences only scale)."""
        return Posterior(
            recalibrate(self.mean, slope, shift), self.cov * slope**2, self.lam
        )

    def logit_difference(
        self, z: np.ndarray, alt: int, ref: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of ``logit_alt - logit_ref`` per patient."""
        x = with_intercept(z)
        p_len = x.shape[1]
        mean = x @ (self.mean[1 + alt] - self.mean[1 + ref])
        blocks = self.cov.reshape(BLOCKS, p_len, BLOCKS, p_len)
        a, r = 1 + alt, 1 + ref
        cov = blocks[a, :, a, :] + blocks[r, :, r, :] - blocks[a, :, r, :]
        cov = cov - blocks[r, :, a, :]
        var = np.einsum("ij,jk,ik->i", x, cov, x)
        return mean, np.sqrt(np.maximum(var, 0.0))

    def gain_probability(self, z: np.ndarray, reference: int) -> np.ndarray:
        """``(n, 3)``: the posterior probability that each regimen gives a
        higher pCR than ``reference`` (0.5 in the reference's column)."""
        n = len(np.asarray(z))
        out = np.full((n, len(REGIMENS)), 0.5)
        for alt in range(len(REGIMENS)):
            if alt == reference:
                continue
            mean, sd = self.logit_difference(z, alt, reference)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[:, alt] = np.where(
                    sd > 0, norm.cdf(mean / np.where(sd > 0, sd, 1.0)), mean > 0
                )
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "posterior.mean": self.mean.astype(np.float64),
            "posterior.cov": self.cov.astype(np.float64),
            "posterior.lam": np.array([self.lam]),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> Posterior:
        mean = np.asarray(arrays["posterior.mean"], np.float64)
        cov = np.asarray(arrays["posterior.cov"], np.float64)
        size = mean.size
        if mean.ndim != 2 or mean.shape[0] != BLOCKS or cov.shape != (size, size):
            raise ValueError("the posterior's mean and covariance do not match")
        if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
            raise ValueError("the posterior holds non-finite values")
        return cls(mean, cov, float(np.asarray(arrays["posterior.lam"]).ravel()[0]))


def recalibrate(beta: np.ndarray, slope: float, shift: float) -> np.ndarray:
    """``B`` whose logits are ``shift + slope * logit`` of ``beta``'s."""
    out = np.asarray(beta, np.float64) * slope
    out[1:, -1] += shift
    return out


def recalibration_step(
    beta: np.ndarray, theta: np.ndarray, grad: np.ndarray, hess: np.ndarray
) -> np.ndarray:
    """One Newton step of the recalibration ``theta = (slope, shift)`` from the
    validation gradient and Hessian in coefficient space at
    ``recalibrate(beta, *theta)`` (chain rule through ``B(theta)``)."""
    b = np.asarray(beta, np.float64)
    e = np.zeros_like(b)
    e[1:, -1] = 1.0
    jac = np.stack([b.ravel(), e.ravel()], axis=1)  # (S, 2)
    g, h = jac.T @ grad, jac.T @ hess @ jac
    step = np.linalg.solve(h + 1e-9 * np.eye(2), g)
    new = np.asarray(theta, np.float64) - step
    return np.array([float(np.clip(new[0], 0.05, 5.0)), float(np.clip(new[1], -5, 5))])


def fit_pooled(
    z: np.ndarray,
    regimen: np.ndarray,
    outcome: np.ndarray,
    lam: float,
    *,
    max_iter: int = 25,
    tol: float = 1e-8,
) -> tuple[Posterior, int]:
    """The posterior fitted on patients in one place (the reference the
    federated fit must equal, and what a single site does alone); returns it
    and the Newton iterations taken."""
    p_len = np.asarray(z).shape[1] + 1
    precision = prior_precision(p_len, lam)
    beta = np.zeros((BLOCKS, p_len))
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        new = newton_step(beta, glm_sums(z, regimen, outcome, beta), precision)
        done = float(np.max(np.abs(new - beta))) < tol
        beta = new
        if done:
            break
    sums = glm_sums(z, regimen, outcome, beta)
    return Posterior.at_mode(beta, sums, precision, lam), iterations


def verify_sums(sums: GlmSums, size: int, max_n: int) -> str | None:
    """Why a site's sums cannot be used (None: they can): shapes, finite
    values, a symmetric positive semi-definite Hessian, a log-likelihood at
    most 0, and no more patients than ``max_n``."""
    if np.shape(sums.grad) != (size,) or np.shape(sums.hess) != (size, size):
        return f"gradient or Hessian of the wrong shape (expected {size})"
    if not (np.isfinite(sums.grad).all() and np.isfinite(sums.hess).all()):
        return "gradient or Hessian holds NaN or infinite values"
    if not math.isfinite(sums.loglik) or sums.loglik > 1e-9:
        return f"log-likelihood {sums.loglik} is not a finite number <= 0"
    if not 0 <= sums.n <= max_n:
        return f"{sums.n} patients, more than the {max_n} it declared"
    scale = max(1.0, float(np.abs(sums.hess).max()))
    if float(np.abs(sums.hess - sums.hess.T).max()) > 1e-8 * scale:
        return "the Hessian is not symmetric"
    if float(np.linalg.eigvalsh(sums.hess).min()) < -1e-8 * scale:
        return "the Hessian is not positive semi-definite"
    return None
