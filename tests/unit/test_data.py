"""Loading: the persistent stratified split and the MONAI sample pipeline."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from client.data.dataset import SiteDataset, build_site_datasets
from client.data.site_config import load_site_config
from client.data.site_data import CaseFiles, list_cases
from client.data.split import compute_split, load_or_make_split
from shared_model.clinical import ClinicalRecord
from shared_model.errors import DataError
from shared_model.plan import PRESET_PLANS, Plan

PLAN = PRESET_PLANS["tiny"]


def _fake_cases(n: int, seed: int) -> list[CaseFiles]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        rec = ClinicalRecord(
            f"C{i:03d}",
            {},
            str(rng.choice(["nCRT", "TNT", "nCT"])),
            int(rng.random() < 0.25),
        )
        out.append(CaseFiles(rec.case_id, Path("t2"), Path("adc"), None, rec))
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 300), st.integers(0, 10_000), st.sampled_from([0.1, 0.2, 0.3]))
def test_split_is_a_stratified_partition(n: int, seed: int, frac: float) -> None:
    cases = _fake_cases(n, seed)
    split = compute_split(cases, val_fraction=frac, seed=seed)
    ids = [c.case_id for c in cases]
    assert sorted(split.train + split.val) == sorted(ids)
    assert not set(split.train) & set(split.val)
    assert abs(len(split.val) - n * frac) <= 1
    strata = Counter((c.clinical.regimen, c.clinical.pcr) for c in cases)
    val = set(split.val)
    for key, size in strata.items():
        n_val = sum(
            1
            for c in cases
            if (c.clinical.regimen, c.clinical.pcr) == key and c.case_id in val
        )
        assert abs(n_val - size * frac) <= 1 + 1e-9
    assert compute_split(cases, val_fraction=frac, seed=seed) == split


def test_split_is_written_reused_and_guarded(tiny_copy: Path) -> None:
    cfg = load_site_config(tiny_copy / "site_configs" / "west_china.yaml")
    cases = list_cases(cfg.dataset_dir, require_outcome=True)
    split = load_or_make_split(cfg, cases)
    saved = json.loads((cfg.run_dir / "split.json").read_text())
    assert saved["n_val"] == len(split.val) == 3 and saved["n_train"] == 10
    assert load_or_make_split(cfg, cases) == split
    with pytest.raises(DataError, match="cases changed"):
        load_or_make_split(cfg, cases[:-1])
    assert not cfg.run_dir.is_relative_to(cfg.dataset_dir)


@pytest.mark.parametrize("site", ["west_china", "sysucc"])
def test_samples_have_the_documented_shapes_and_ranges(
    tiny_copy: Path, site: str
) -> None:
    cfg = load_site_config(tiny_copy / "site_configs" / f"{site}.yaml")
    train, val, split = build_site_datasets(cfg, PLAN, seed=0)
    assert len(train) == len(split.train) and len(val) == len(split.val)
    for ds in (train, val):
        s = ds[0]
        assert (
            s["image"].shape == (2, *PLAN.patch_size)
            and s["image"].dtype == torch.float32
        )
        assert (
            s["label"].shape == (1, *PLAN.patch_size)
            and s["label"].dtype == torch.float32
        )
        assert set(torch.unique(s["label"]).tolist()) <= {0.0, 1.0}
        assert s["clinical"].shape == (15,) and s["clinical"].sum() == 6
        assert s["regimen"].dtype == torch.int64 and 0 <= int(s["regimen"]) < 3
        assert float(s["pcr"]) in (0.0, 1.0)
        adc = s["image"][1]
        # ADC in 10^-3 mm^2/s whatever the site stores (sysucc stores 10^-6 as int16)
        assert float(adc.min()) >= 0.0 and float(adc.max()) <= PLAN.adc_clip[1]
        assert float(adc.max()) > 1.0
    # validation crops are centred on the tumour
    assert float(val[0]["label"].sum()) > 0


def test_training_crops_are_seeded(tiny_copy: Path) -> None:
    cfg = load_site_config(tiny_copy / "site_configs" / "sah_sysu.yaml")
    a, _, _ = build_site_datasets(cfg, PLAN, seed=3)
    b, _, _ = build_site_datasets(cfg, PLAN, seed=3)
    assert torch.equal(a[1]["image"], b[1]["image"])


def test_orientation_is_normalised_across_scanners(tiny_copy: Path) -> None:
    """LPS and LAS-stored sites give the same anatomy orientation after loading:
    the bladder (anterior, bright ADC) lies on the high-H side of the tumour."""
    for site in ("west_china", "sysucc"):
        cfg = load_site_config(tiny_copy / "site_configs" / f"{site}.yaml")
        cases = list_cases(cfg.dataset_dir, require_outcome=True)
        ds = SiteDataset(
            cases[:2],
            Plan(patch_size=(8, 32, 32), spacing=(3.0, 2.5, 2.5)),
            adc_scale=cfg.adc_scale,
            train=False,
        )
        sample = ds[0]
        adc, label = sample["image"][1].numpy(), sample["label"][0].numpy()
        h = np.arange(adc.shape[1])[None, :, None]
        fluid = adc > 2.2
        assert fluid.sum() > 10
        assert (h * fluid).sum() / fluid.sum() > (h * label).sum() / label.sum() + 5


def test_unreadable_case_names_the_case(tiny_copy: Path) -> None:
    cfg = load_site_config(tiny_copy / "site_configs" / "west_china.yaml")
    cases = list_cases(cfg.dataset_dir, require_outcome=True)
    cases[0].t2.write_bytes(b"garbage")
    ds = SiteDataset(cases[:1], PLAN, adc_scale=1.0, train=False)
    with pytest.raises(DataError, match=cases[0].case_id):
        ds[0]
