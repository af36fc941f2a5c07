"""Generated images: geometry, grids, orientation, and the response signal they carry."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from simulations.cohort import build_cohort
from simulations.phantom import generate_case, scanner_grids
from simulations.sites import PRESETS, SITES
from simulations.synth import synthesize


def _case_files(site_dir: Path) -> list[tuple[Path, Path, Path]]:
    out = []
    for t2 in sorted((site_dir / "imagesTr").glob("*_0000.nii.gz")):
        case = t2.name[: -len("_0000.nii.gz")]
        out.append(
            (
                t2,
                site_dir / "imagesTr" / f"{case}_0001.nii.gz",
                site_dir / "labelsTr" / f"{case}.nii.gz",
            )
        )
    return out


def test_channels_and_label_share_one_grid(tiny_cohort: Path) -> None:
    for site_dir in sorted((tiny_cohort / "sites").iterdir()):
        for t2, adc, label in _case_files(site_dir):
            imgs = [nib.load(str(p)) for p in (t2, adc, label)]
            assert all(i.shape == imgs[0].shape for i in imgs)
            assert all(np.allclose(i.affine, imgs[0].affine) for i in imgs)
            assert imgs[0].get_data_dtype() == np.int16
            mask = np.asarray(imgs[2].dataobj)
            assert set(np.unique(mask)) == {0, 1}


def test_spacing_is_anisotropic_and_matches_the_scanner(tiny_cohort: Path) -> None:
    summary = json.loads((tiny_cohort / "cohort.json").read_text())
    for site in summary["sites"].values():
        geo = site["geometry"]
        folder = (
            tiny_cohort
            / ("" if site["cohort"] == "retrospective" else site["cohort"])
            / "sites"
            / site["dataset"]
        )
        t2 = nib.load(str(next((folder / "imagesTr").glob("*_0000.nii.gz"))))
        zooms = t2.header.get_zooms()
        assert np.allclose(zooms, geo["t2w_spacing_mm"], atol=1e-3)
        assert zooms[2] > 1.0 and zooms[0] == zooms[1]
        assert list(t2.shape) == geo["t2w_shape"]
        # ADC acquired on a coarser grid than T2W, then stored on the T2W grid
        assert geo["adc_acquired_spacing_mm"][2] > zooms[2]


def test_affine_orientation_follows_each_scanner(tiny_cohort: Path) -> None:
    for site_name in ("west_china", "sysucc", "sah_sysu"):
        spec = SITES[site_name]
        folder = tiny_cohort / "sites" / spec.dataset_folder("retrospective")
        img = nib.load(str(next((folder / "imagesTr").glob("*_0000.nii.gz"))))
        assert "".join(nib.aff2axcodes(img.affine)) == spec.scanner.axcodes
        direction = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
        tilt = np.degrees(np.arccos(abs(direction[2, 2])))
        assert tilt == pytest.approx(spec.scanner.oblique_deg, abs=0.01)
        assert img.header["sform_code"] == 1 and img.header["qform_code"] == 1


def test_adc_units_differ_by_site_as_declared(tiny_cohort: Path) -> None:
    for site_name, expect_int in (("west_china", False), ("sysucc", True)):
        spec = SITES[site_name]
        assert (spec.scanner.adc_unit == "1e-6") == expect_int
        folder = tiny_cohort / "sites" / spec.dataset_folder("retrospective")
        adc = nib.load(str(next((folder / "imagesTr").glob("*_0001.nii.gz"))))
        values = np.asarray(adc.dataobj, dtype=float)
        p99 = np.percentile(values[values > 0], 99)
        assert (p99 > 500) == expect_int  # 10^-6 units: ~3000; 10^-3: ~3


def test_images_carry_response_signal_beyond_the_table() -> None:
    """Tumour ADC and texture measured in the images track the hidden biology."""
    retro = build_cohort(PRESETS["tiny"], 1).retrospective
    adc_measured, het_measured, biology, vol_measured, size = [], [], [], [], []
    for p in retro[:16]:
        case = generate_case(p, SITES["west_china"].scanner, PRESETS["demo"].geometry)
        adc = case.adc.astype(float) * (1e-3 if case.adc.dtype == np.int16 else 1.0)
        mask = case.label > 0
        viable = mask & (adc < 1.5)  # the necrotic core's ADC is about 1.9
        adc_measured.append(np.median(adc[viable]))
        t2 = case.t2.astype(float)[mask]
        het_measured.append(t2.std() / t2.mean())
        vol_measured.append(np.log(case.tumour_volume_ml))
        biology.append(p.biology)
        size.append(p.log_volume_ml)
    assert np.corrcoef(adc_measured, biology)[0, 1] < -0.5
    assert np.corrcoef(het_measured, biology)[0, 1] < -0.2
    assert np.corrcoef(vol_measured, size)[0, 1] > 0.6


def test_necrotic_core_shows_the_hypoxia_latent() -> None:
    """The core's volume fraction follows the hypoxia latent, and the core is
    bright in T2W and high in ADC, so the predictive biomarker can be read."""
    world = build_cohort(PRESETS["tiny"], 3)
    measured, hypoxia, adc_p90 = [], [], []
    for p in (world.retrospective + world.test)[:16]:
        case = generate_case(p, SITES["west_china"].scanner, PRESETS["demo"].geometry)
        mask = case.label > 0
        measured.append(case.core_volume_ml / case.tumour_volume_ml)
        hypoxia.append(p.hypoxia)
        adc_p90.append(np.percentile(case.adc[mask], 90))
        assert abs(measured[-1] - p.core_fraction) < 0.08
    assert np.corrcoef(measured, hypoxia)[0, 1] > 0.8
    assert np.corrcoef(adc_p90, hypoxia)[0, 1] > 0.6


def test_tumour_sits_inside_the_field_of_view() -> None:
    retro = build_cohort(PRESETS["tiny"], 0).retrospective
    for p in retro[:6]:
        case = generate_case(p, SITES["sysucc"].scanner, PRESETS["tiny"].geometry)
        assert case.label.sum() > 20
        t2, _ = scanner_grids(
            SITES["sysucc"].scanner, PRESETS["tiny"].geometry, np.zeros(3)
        )
        assert case.t2.shape == t2.shape


def test_images_are_deterministic_for_a_seed_and_worker_count(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    synthesize(a, preset="tiny", seed=5, workers=1)
    synthesize(b, preset="tiny", seed=5, workers=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.nii.gz"))
    for rel in files[::7]:
        x, y = nib.load(str(a / rel)), nib.load(str(b / rel))
        assert np.array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj))
        assert np.array_equal(x.affine, y.affine)
    with (a / "oracle" / "latents.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert (b / "oracle" / "latents.csv").read_text() == (
        a / "oracle" / "latents.csv"
    ).read_text()
    assert all(r["mask_volume_ml"] for r in rows)
