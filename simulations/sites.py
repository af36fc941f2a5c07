"""Synthetic centres, their scanners, and the presets that size each cohort.

A preset fixes the patients per site and regimen of the retrospective and
prospective cohorts (the study's structure, scaled) and the size of the
held-out test cohort, plus how coarse the images are. Every value is
documented in ``simulations/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


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
PUBLIC_STREAM = 0x9B11C
"""Public presets draw their patients from ``SeedSequence([seed, PUBLIC_STREAM])``
instead of ``seed``: a separate stream, so a public cohort shares no patient
with the site cohorts of any seed."""

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
    public: bool = False  # a public pretraining cohort (see PUBLIC_STREAM)

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

# The paper's patient counts (760 retrospective, 88 nCT, 95 prospective, a test
# cohort of 1,000) on the demo's image grid: the paper-scale claims measured on
# two CPU cores.
PRESETS["paper-demo"] = replace(
    PRESETS["paper"], name="paper-demo", geometry=PRESETS["demo"].geometry
)

# Public pretraining cohorts: the retrospective sizes and image grids of demo and
# tiny, no prospective or test cohort, patients drawn from their own random
# stream (PUBLIC_STREAM), so no site of any cohort holds them.
PRESETS["public"] = replace(
    PRESETS["demo"], name="public", prospective={}, test_size=0, public=True
)
PRESETS["public-tiny"] = replace(
    PRESETS["tiny"], name="public-tiny", prospective={}, test_size=0, public=True
)
