"""Synthetic multi-centre cohort: sites, presets and the patients drawn.

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

# Image readouts of the latents.
ADC_MEAN = 1.0  # tumour ADC, 10^-3 mm^2/s, for b = 0
ADC_PER_BIOLOGY = -0.085  # responsive tumours are more cellular: lower ADC
ADC_NOISE = 0.035
HET_MEAN = 0.14  # relative texture amplitude inside the tumour
HET_PER_BIOLOGY = -0.035  # responsive tumours are more homogeneous
HET_NOISE = 0.015
LOG_VOLUME_ML = {"T2": np.log(4.0), "T3": np.log(12.0), "T4": np.log(26.0)}
LOG_VOLUME_PER_SIZE = 0.35


@dataclass(frozen=True)
class Scanner:
    """One centre's MRI protocol, at the ``paper`` preset's resolution.

    Attributes:
        field_t: field strength in tesla (documentation only).
        t2_inplane_mm: T2W in-plane voxel size.
        t2_slice_mm: T2W slice thickness (= spacing, no gap).
        n_slices: number of T2W slices.
        fov_mm: in-plane field of view.
        adc_inplane_mm: DWI/ADC in-plane voxel size (coarser than T2W).
        adc_slice_mm: DWI/ADC slice thickness.
        t2_gain: T2W intensity scale (arbitrary scanner units).
        noise: T2W noise, relative to the gain (Rician).
        bias: amplitude of the smooth multiplicative bias field.
        adc_noise: ADC noise, in 10^-3 mm^2/s.
        adc_unit: "1e-3" (float32) or "1e-6" (int16) as the site exports it.
        oblique_deg: tilt of the axial-oblique stack about the left-right axis.
        axcodes: voxel axis directions as stored (e.g. "LPS", "RAS").
    """

    field_t: float
    t2_inplane_mm: float
    t2_slice_mm: float
    n_slices: int
    fov_mm: float
    adc_inplane_mm: float
    adc_slice_mm: float
    t2_gain: float
    noise: float
    bias: float
    adc_noise: float
    adc_unit: str
    oblique_deg: float
    axcodes: str


@dataclass(frozen=True)
class SiteSpec:
    """A synthetic centre: identity, scanner, case mix and regimen policy.

    Attributes:
        name: site name used everywhere (YAML, metrics, run records).
        code: short case-id prefix.
        dataset_id: nnU-Net dataset number of the retrospective dataset
            (prospective = +100, test = +200).
        dataset_name: CamelCase nnU-Net dataset name.
        scanner: the centre's MRI protocol.
        tnt_risk_preference: how strongly high risk pushes the centre to TNT.
        nct_risk_preference: how strongly low risk pushes the centre to nCT.
        stage_shift: shift of the centre's case mix toward higher stage.
    """

    name: str
    code: str
    dataset_id: int
    dataset_name: str
    scanner: Scanner
    tnt_risk_preference: float
    nct_risk_preference: float
    stage_shift: float = 0.0

    def dataset_folder(self, cohort: str) -> str:
        offset = {"retrospective": 0, "prospective": 100, "test": 200}[cohort]
        number = self.dataset_id + offset
        return f"Dataset{number:03d}_{self.dataset_name}"


SITES: dict[str, SiteSpec] = {
    s.name: s
    for s in (
        SiteSpec(
            name="west_china",
            code="WCH",
            dataset_id=101,
            dataset_name="WestChina",
            scanner=Scanner(
                3.0,
                0.55,
                3.0,
                26,
                140.0,
                1.6,
                4.0,
                900.0,
                0.03,
                0.15,
                0.05,
                "1e-3",
                12.0,
                "LPS",
            ),
            tnt_risk_preference=0.55,
            nct_risk_preference=0.9,
        ),
        SiteSpec(
            name="sysucc",
            code="SYC",
            dataset_id=102,
            dataset_name="SYSUCC",
            scanner=Scanner(
                3.0,
                0.625,
                3.0,
                24,
                150.0,
                1.8,
                5.0,
                1500.0,
                0.04,
                0.2,
                0.06,
                "1e-6",
                15.0,
                "LAS",
            ),
            tnt_risk_preference=0.75,
            nct_risk_preference=0.0,
            stage_shift=0.15,
        ),
        SiteSpec(
            name="sah_sysu",
            code="SAH",
            dataset_id=103,
            dataset_name="SAHSYSU",
            scanner=Scanner(
                1.5,
                0.75,
                3.0,
                22,
                160.0,
                2.0,
                5.0,
                600.0,
                0.06,
                0.25,
                0.08,
                "1e-3",
                8.0,
                "LPS",
            ),
            tnt_risk_preference=0.3,
            nct_risk_preference=0.0,
            stage_shift=-0.1,
        ),
        SiteSpec(
            name="yunnan",
            code="YNC",
            dataset_id=104,
            dataset_name="Yunnan",
            scanner=Scanner(
                3.0,
                0.6,
                3.0,
                30,
                130.0,
                1.5,
                4.0,
                2500.0,
                0.035,
                0.3,
                0.05,
                "1e-3",
                18.0,
                "RAS",
            ),
            tnt_risk_preference=0.4,
            nct_risk_preference=0.0,
            stage_shift=0.1,
        ),
    )
}
RETROSPECTIVE_SITES = ("west_china", "sysucc", "sah_sysu")
PROSPECTIVE_SITES = ("west_china", "sysucc", "yunnan")
NCT_SITE = "west_china"


@dataclass(frozen=True)
class Geometry:
    """How a preset scales each scanner's protocol (voxels, not anatomy).

    ``inplane_factor`` multiplies the in-plane voxel size (coarser voxels keep
    CPU runs small); ``fov_factor`` shrinks the field of view around the
    tumour; ``slice_factor`` scales the number of slices.
    """

    inplane_factor: float
    fov_factor: float
    slice_factor: float


@dataclass(frozen=True)
class Preset:
    """Cohort sizes per site and regimen, and the image geometry scale."""

    name: str
    retrospective: dict[str, dict[str, int]]
    prospective: dict[str, dict[str, int]]
    geometry: Geometry
    min_cases: int = 10
    test_size: int = 1000

    def n_retrospective(self) -> int:
        return sum(sum(v.values()) for v in self.retrospective.values())

    def n_prospective(self) -> int:
        return sum(sum(v.values()) for v in self.prospective.values())

    def counts(
        self, cohort: str, test_size: int | None = None
    ) -> dict[str, dict[str, int]]:
        """Patients per site and regimen of one cohort."""
        if cohort == "retrospective":
            return self.retrospective
        if cohort == "prospective":
            return self.prospective
        return held_out_counts(test_size if test_size is not None else self.test_size)


_PAPER_RETRO = {
    "west_china": {"nCRT": 170, "TNT": 92, "nCT": 88},
    "sysucc": {"nCRT": 134, "TNT": 96},
    "sah_sysu": {"nCRT": 110, "TNT": 70},
}
_PAPER_PROSP = {
    "west_china": {"nCRT": 18, "TNT": 14, "nCT": 8},
    "sysucc": {"nCRT": 16, "TNT": 14},
    "yunnan": {"nCRT": 13, "TNT": 12},
}


# The held-out test cohort: every centre, the new one included, each with the
# regimen mix of its own study cohort (the paper preset's proportions).
TEST_SITE_SHARE: dict[str, float] = {
    "west_china": 0.3,
    "sysucc": 0.25,
    "sah_sysu": 0.2,
    "yunnan": 0.25,
}
COHORTS = ("retrospective", "prospective", "test")


def _largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    raw = {k: total * w / sum(weights.values()) for k, w in weights.items()}
    out = {k: int(np.floor(v)) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: out[k] - raw[k])[: total - sum(out.values())]:
        out[k] += 1
    return out


def held_out_counts(n: int) -> dict[str, dict[str, int]]:
    """Test-cohort patients per site and regimen for ``n`` patients in all."""
    if n < 0:
        raise ValueError("the test cohort size must be >= 0")
    out: dict[str, dict[str, int]] = {}
    for site, k in _largest_remainder(n, TEST_SITE_SHARE).items():
        mix = _PAPER_RETRO.get(site) or _PAPER_PROSP[site]
        counts = _largest_remainder(k, {r: float(v) for r, v in mix.items()})
        out[site] = {r: v for r, v in counts.items() if v > 0}
    return out


def _scaled(counts: dict[str, dict[str, int]], f: float) -> dict[str, dict[str, int]]:
    return {
        s: {r: max(2, round(n * f)) for r, n in v.items()} for s, v in counts.items()
    }


PRESETS: dict[str, Preset] = {
    "paper": Preset("paper", _PAPER_RETRO, _PAPER_PROSP, Geometry(1.0, 0.85, 1.0)),
    "demo": Preset(
        "demo",
        _scaled(_PAPER_RETRO, 0.3),
        _scaled(_PAPER_PROSP, 0.3),
        Geometry(2.6, 0.75, 0.7),
        test_size=400,
    ),
    "tiny": Preset(
        "tiny",
        {
            "west_china": {"nCRT": 5, "TNT": 4, "nCT": 4},
            "sysucc": {"nCRT": 6, "TNT": 4},
            "sah_sysu": {"nCRT": 6, "TNT": 4},
        },
        {
            "west_china": {"nCRT": 2, "TNT": 2, "nCT": 2},
            "sysucc": {"nCRT": 2, "TNT": 2},
            "yunnan": {"nCRT": 2, "TNT": 2},
        },
        Geometry(4.0, 0.6, 0.45),
        min_cases=4,
        test_size=30,
    ),
}


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
