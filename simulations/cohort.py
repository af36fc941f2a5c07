"""Synthetic multi-centre cohort: the patients drawn at the centres of
:mod:`simulations.sites`.

This module draws the patients (clinical stage, hidden tumour latents, the
regimen each centre chose) and applies the response model of
:mod:`simulations.response` (pCR and disease-free survival under every
regimen); :mod:`simulations.phantom` turns a patient into MRI volumes. Every
parameter is documented in ``simulations/README.md``; keep the two in step.

Regimen choice is confounded by clinical risk (never by the images): each
centre's policy favours TNT for high risk and nCT (one centre only) for low
risk, with Gumbel noise that keeps every regimen possible (positivity).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shared_model.clinical import CLINICAL_FEATURES, REGIMENS
from simulations.response import (
    BIOLOGY_WEIGHT,
    FOLLOW_UP_MONTHS,
    SIZE_WEIGHT,
    calibrate_intercept,
    clinical_risk,
    core_fraction,
    dfs_times,
    linear_predictor,
    sigmoid,
)
from simulations.sites import SITES, Preset, SiteSpec

# Image readouts of the latents.
ADC_MEAN = 1.0  # tumour ADC, 10^-3 mm^2/s, for b = 0
ADC_PER_BIOLOGY = -0.085  # responsive tumours are more cellular: lower ADC
ADC_NOISE = 0.035
HET_MEAN = 0.14  # relative texture amplitude inside the tumour
HET_PER_BIOLOGY = -0.035  # responsive tumours are more homogeneous
HET_NOISE = 0.015
LOG_VOLUME_ML = {"T2": np.log(4.0), "T3": np.log(12.0), "T4": np.log(26.0)}
LOG_VOLUME_PER_SIZE = 0.35


@dataclass
class Patient:
    """One synthetic patient: table row, hidden latents and potential outcomes."""

    case_id: str
    site: str
    cohort: str
    clinical: dict[str, str]
    regimen: str
    biology: float
    size: float
    hypoxia: float
    risk: float
    adc_mean: float
    heterogeneity: float
    log_volume_ml: float
    uniforms: np.ndarray  # (3,) common random numbers for the outcome draws
    dfs_uniform: float  # common random number for the DFS time (every regimen)
    follow_up_months: float  # administrative censoring
    image_seed: int
    prob: np.ndarray = field(default_factory=lambda: np.zeros(3))
    outcomes: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=int))
    dfs_months: np.ndarray = field(default_factory=lambda: np.zeros(3))
    dfs_event: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=int))

    @property
    def pcr(self) -> int:
        return int(self.outcomes[REGIMENS.index(self.regimen)])

    @property
    def core_fraction(self) -> float:
        return core_fraction(self.hypoxia)

    def observed_dfs(self) -> tuple[float, int]:
        """(months, event) under the received regimen."""
        j = REGIMENS.index(self.regimen)
        return float(self.dfs_months[j]), int(self.dfs_event[j])


def _bern(rng: np.random.Generator, p: float) -> str:
    return "1" if rng.random() < p else "0"


def draw_clinical(rng: np.random.Generator, stage_shift: float) -> dict[str, str]:
    """Draw one LARC patient's clinical variables (mix in DESIGN.md's ranges)."""
    p_t = np.array([0.12 - 0.05 * stage_shift, 0.70, 0.18 + 0.05 * stage_shift])
    c_t = str(rng.choice(CLINICAL_FEATURES["cT"], p=p_t / p_t.sum()))
    t4 = c_t == "T4"
    t2 = c_t == "T2"
    p_n = np.array([0.30 + 0.25 * t2 - 0.1 * t4, 0.42, 0.28 - 0.15 * t2 + 0.12 * t4])
    c_n = str(rng.choice(CLINICAL_FEATURES["cN"], p=p_n / p_n.sum()))
    location = str(rng.choice(CLINICAL_FEATURES["location"], p=[0.4, 0.4, 0.2]))
    emvi = _bern(rng, 0.22 + 0.3 * t4 + 0.12 * (c_n == "N2") - 0.15 * t2)
    crm = "1" if t4 else _bern(rng, 0.2 + 0.12 * (location == "low") - 0.15 * t2)
    lln = _bern(rng, 0.09 + 0.12 * (c_n == "N2"))
    return {
        "cT": c_t,
        "cN": c_n,
        "EMVI": emvi,
        "CRM": crm,
        "LLN": lln,
        "location": location,
    }


def assign_regimens(
    risks: np.ndarray, counts: dict[str, int], site: SiteSpec, rng: np.random.Generator
) -> list[str]:
    """Assign regimens with exact counts under a risk-confounded centre policy.

    nCT goes first to the patients with the highest ``-risk * pref + Gumbel``
    score, then TNT to the highest ``risk * pref + Gumbel`` among the rest; the
    remainder gets nCRT. The Gumbel noise keeps the choice random at fixed risk
    (positivity), the preferences make it confounded.
    """
    n = len(risks)
    z = (risks - risks.mean()) / (risks.std() + 1e-9)
    out = np.array(["nCRT"] * n, dtype=object)
    free = np.ones(n, dtype=bool)
    for regimen, sign, pref in (
        ("nCT", -1.0, site.nct_risk_preference),
        ("TNT", 1.0, site.tnt_risk_preference),
    ):
        k = counts.get(regimen, 0)
        if k == 0:
            continue
        score = sign * pref * z + rng.gumbel(size=n)
        score[~free] = -np.inf
        chosen = np.argsort(-score, kind="stable")[:k]
        out[chosen] = regimen
        free[chosen] = False
    return [str(r) for r in out]


def draw_patients(
    preset: Preset,
    cohort: str,
    rng: np.random.Generator,
    *,
    test_size: int | None = None,
) -> list[Patient]:
    """Draw the patients of one cohort (retrospective, prospective or test)."""
    counts = preset.counts(cohort, test_size)
    tag = {"retrospective": "R", "prospective": "P", "test": "T"}[cohort]
    lo, hi = FOLLOW_UP_MONTHS[cohort]
    patients: list[Patient] = []
    for site_name, per_regimen in counts.items():
        site = SITES[site_name]
        n = sum(per_regimen.values())
        clinical = [draw_clinical(rng, site.stage_shift) for _ in range(n)]
        risks = np.array([clinical_risk(c) for c in clinical])
        regimens = assign_regimens(risks, per_regimen, site, rng)
        for i in range(n):
            biology = float(rng.normal())
            size = float(rng.normal())
            hypoxia = float(rng.normal())
            c_t = clinical[i]["cT"]
            patients.append(
                Patient(
                    case_id=f"{site.code}_{tag}{i + 1:04d}",
                    site=site_name,
                    cohort=cohort,
                    clinical=clinical[i],
                    regimen=regimens[i],
                    biology=biology,
                    size=size,
                    hypoxia=hypoxia,
                    risk=float(risks[i]),
                    adc_mean=float(
                        np.clip(
                            ADC_MEAN
                            + ADC_PER_BIOLOGY * biology
                            + rng.normal(0, ADC_NOISE),
                            0.6,
                            1.4,
                        )
                    ),
                    heterogeneity=float(
                        np.clip(
                            HET_MEAN
                            + HET_PER_BIOLOGY * biology
                            + rng.normal(0, HET_NOISE),
                            0.03,
                            0.35,
                        )
                    ),
                    log_volume_ml=float(
                        LOG_VOLUME_ML[c_t] + LOG_VOLUME_PER_SIZE * size
                    ),
                    uniforms=rng.random(3),
                    dfs_uniform=float(rng.uniform(1e-12, 1.0)),
                    follow_up_months=float(rng.uniform(lo, hi)),
                    image_seed=int(rng.integers(2**31 - 1)),
                )
            )
    return patients


def latent_arrays(
    patients: list[Patient],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clinical risk, prognostic term ``B * b - V * v``, hypoxia) per patient."""
    risk = np.array([p.risk for p in patients])
    prognosis = np.array(
        [BIOLOGY_WEIGHT * p.biology - SIZE_WEIGHT * p.size for p in patients]
    )
    hypoxia = np.array([p.hypoxia for p in patients])
    return risk, prognosis, hypoxia


def apply_outcomes(
    patients: list[Patient], intercept: float, risk_centre: float
) -> None:
    """Fill each patient's true probabilities, drawn outcomes and DFS in place."""
    if not patients:
        return
    risk, prognosis, hypoxia = latent_arrays(patients)
    prob = sigmoid(intercept + linear_predictor(risk, prognosis, hypoxia, risk_centre))
    for i, p in enumerate(patients):
        p.prob = prob[i]
        p.outcomes = (p.uniforms < prob[i]).astype(int)
        times = dfs_times(p.outcomes, p.risk - risk_centre, p.dfs_uniform)
        p.dfs_event = (times <= p.follow_up_months).astype(int)
        p.dfs_months = np.round(np.minimum(times, p.follow_up_months), 1)


@dataclass(frozen=True)
class World:
    """A drawn synthetic world: the three cohorts and the response model's
    per-world constants (the calibrated intercept and the risk centre)."""

    retrospective: list[Patient]
    prospective: list[Patient]
    test: list[Patient]
    intercept: float
    risk_centre: float

    def cohorts(self) -> dict[str, list[Patient]]:
        return {
            "retrospective": self.retrospective,
            "prospective": self.prospective,
            "test": self.test,
        }


def build_cohort(preset: Preset, seed: int, *, test_size: int | None = None) -> World:
    """Draw the three cohorts and their outcomes.

    The common intercept is calibrated on the retrospective cohort and reused
    for the prospective and test cohorts (same biology, their own realised
    rates). The test cohort is drawn last, so its size does not change the
    other two.
    """
    rng = np.random.default_rng(seed)
    retro = draw_patients(preset, "retrospective", rng)
    prosp = draw_patients(preset, "prospective", rng)
    test = draw_patients(preset, "test", rng, test_size=test_size)
    risk_centre = float(np.mean([p.risk for p in retro]))
    risk, prognosis, hypoxia = latent_arrays(retro)
    lin = linear_predictor(risk, prognosis, hypoxia, risk_centre)
    received = np.array([REGIMENS.index(p.regimen) for p in retro])
    intercept = calibrate_intercept(lin, received)
    for group in (retro, prosp, test):
        apply_outcomes(group, intercept, risk_centre)
    return World(retro, prosp, test, intercept, risk_centre)
