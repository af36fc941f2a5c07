"""Response model v2 of the synthetic world: pCR under every regimen and
disease-free survival, from the clinical risk and three hidden latents.

Logit scale, per regimen ``r``::

    logit p_r = a + theta_r + c_r * (R - mean R) + B * b - V * v + g_r * h

* ``a``: one common intercept, calibrated per world so that the mean true pCR
  probability of the retrospective patients under the regimen each received
  equals the study's overall rate (no per-arm intercepts);
* ``theta_r``: the regimen's effect against nCRT at average clinical risk,
  fixed from the trials (TNT: marginal odds ratio about 2.3 at average risk,
  RAPIDO / PRODIGE-23; nCT: close to nCRT in low-risk disease, PROSPECT);
* ``R``: the clinical risk score; ``c_r``: how much risk hurts under ``r``
  (TNT least, nCT most);
* ``b``: tumour biology, N(0, 1), prognostic, visible in the viable tumour
  (lower ADC, more homogeneous texture); ``v``: size, N(0, 1), prognostic,
  visible as volume;
* ``h``: hypoxia, N(0, 1), the **predictive** biomarker, visible as a necrotic
  core of volume fraction :func:`core_fraction` (high T2W, high ADC). Hypoxia
  blunts radiation (``g_r < 0`` for nCRT and TNT) and not chemotherapy alone
  (``g_nCT > 0``), so reading the core changes which regimen is best.

Every constant is documented in ``simulations/README.md``; keep the two in step.
"""

from __future__ import annotations

import numpy as np

from shared_model.clinical import REGIMENS

WORLD_VERSION = 2
"""Bumped whenever the same preset and seed would draw a different world."""

# --- response model v2 (documented in simulations/README.md) -----------------
RISK_WEIGHTS: dict[str, float] = {
    "cT=T2": -0.8,
    "cT=T4": 0.9,
    "cN=N1": 0.3,
    "cN=N2": 0.6,
    "EMVI=1": 0.5,
    "CRM=1": 0.4,
    "LLN=1": 0.3,
    "location=low": 0.2,
}
REGIMEN_EFFECT: dict[str, float] = {"nCRT": 0.0, "TNT": 1.4, "nCT": -0.89}
RISK_SLOPE: dict[str, float] = {"nCRT": -1.3, "TNT": -0.3, "nCT": -2.1}
HYPOXIA_EFFECT: dict[str, float] = {"nCRT": -1.5, "TNT": -1.2, "nCT": 1.2}
BIOLOGY_WEIGHT = 1.3
SIZE_WEIGHT = 0.55
TARGET_PCR: dict[str, float] = {"nCRT": 0.19, "TNT": 0.30, "nCT": 0.20}

# Disease-free survival: Weibull times; 3-year DFS at average risk.
DFS_3Y: dict[int, float] = {1: 0.875, 0: 0.70}  # after pCR / without
DFS_SHAPE = 0.9
DFS_RISK_HR: dict[int, float] = {1: 0.2, 0: 0.35}  # log hazard ratio per risk unit
FOLLOW_UP_MONTHS: dict[str, tuple[float, float]] = {
    "retrospective": (12.0, 72.0),
    "prospective": (6.0, 36.0),
    "test": (12.0, 72.0),
}

# Necrotic core (the image readout of hypoxia): volume fraction of the tumour.
CORE_MAX_FRACTION = 0.5
CORE_SLOPE = 1.5
CORE_OFFSET = -1.0


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))


def clinical_risk(clinical: dict[str, str]) -> float:
    """Uncentred clinical risk score: sum of :data:`RISK_WEIGHTS` that apply."""
    return float(
        sum(
            w
            for k, w in RISK_WEIGHTS.items()
            if clinical[k.split("=")[0]] == k.split("=")[1]
        )
    )


def core_fraction(hypoxia: float) -> float:
    """Volume fraction of the necrotic core for a hypoxia latent (0 to 0.5)."""
    return float(CORE_MAX_FRACTION * sigmoid(CORE_SLOPE * hypoxia + CORE_OFFSET))


def linear_predictor(
    risk: np.ndarray, prognosis: np.ndarray, hypoxia: np.ndarray, risk_centre: float
) -> np.ndarray:
    """Logit without the common intercept, shape ``(N, 3)`` in REGIMENS order.

    ``prognosis`` is ``B * b - V * v`` per patient (the same for every regimen).
    """
    theta = np.array([REGIMEN_EFFECT[r] for r in REGIMENS])
    slope = np.array([RISK_SLOPE[r] for r in REGIMENS])
    gamma = np.array([HYPOXIA_EFFECT[r] for r in REGIMENS])
    d = np.asarray(risk, float)[:, None] - risk_centre
    return (
        theta[None, :]
        + slope[None, :] * d
        + np.asarray(prognosis, float)[:, None]
        + gamma[None, :] * np.asarray(hypoxia, float)[:, None]
    )


def calibrate_intercept(lin: np.ndarray, received: np.ndarray) -> float:
    """The common intercept ``a`` whose mean true pCR probability under the
    received regimens equals the study's overall rate (TARGET_PCR weighted by
    the receivers' counts). Monotone in ``a``: bisection."""
    counts = np.bincount(received, minlength=len(REGIMENS))
    target = sum(TARGET_PCR[r] * counts[j] for j, r in enumerate(REGIMENS))
    target /= max(len(received), 1)
    chosen = lin[np.arange(len(received)), received]
    lo, hi = -12.0, 12.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if float(sigmoid(mid + chosen).mean()) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# Gauss-Hermite nodes for expectations over the hidden N(0, 1) latents.
_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(24)
_GH_W = _GH_W / _GH_W.sum()


def expected_probabilities(
    intercept: float,
    risk: np.ndarray,
    risk_centre: float,
    *,
    hypoxia: np.ndarray | None = None,
) -> np.ndarray:
    """E[p_r | clinical risk] (and hypoxia, when given), shape ``(N, 3)``.

    Integrates the hidden latents (``b``, ``v``, and ``h`` unless given) out by
    Gauss-Hermite quadrature: the Bayes-optimal prediction of a model that
    sees only the clinical table (or the table plus a perfect biomarker read).
    """
    n = len(risk)
    s = float(np.hypot(BIOLOGY_WEIGHT, SIZE_WEIGHT))  # sd of the prognostic term
    prog = s * _GH_X  # (Q,)
    if hypoxia is None:
        h = np.broadcast_to(_GH_X, (n, len(_GH_X)))  # (N, Q_h)
        w_h = _GH_W
    else:
        h = np.asarray(hypoxia, float)[:, None]
        w_h = np.ones(1)
    out = np.zeros((n, len(REGIMENS)))
    for i_h in range(h.shape[1]):
        for i_p, w_p in enumerate(_GH_W):
            lin = linear_predictor(risk, np.full(n, prog[i_p]), h[:, i_h], risk_centre)
            out += w_h[i_h] * w_p * sigmoid(intercept + lin)
    return out


def _weibull_scale(dfs_3y: float) -> float:
    return 36.0 / (-np.log(dfs_3y)) ** (1.0 / DFS_SHAPE)


def dfs_times(outcomes: np.ndarray, risk_d: float, uniform: float) -> np.ndarray:
    """DFS time (months) under each regimen from its pCR outcome.

    Weibull with shape DFS_SHAPE, scale set by the 3-year DFS after pCR or
    without (DFS_3Y) and a proportional-hazards risk effect; one uniform for
    every regimen (common random numbers), so a regimen changes the time only
    through the response it brings.
    """
    out = np.zeros(len(outcomes))
    for j, y in enumerate(outcomes):
        hr = np.exp(DFS_RISK_HR[int(y)] * risk_d)
        scale = _weibull_scale(DFS_3Y[int(y)])
        out[j] = scale * (-np.log(uniform) / hr) ** (1.0 / DFS_SHAPE)
    return out
