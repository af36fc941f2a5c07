"""Tumour features: full-resolution pooling, physical ADC, the site's cache."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from shared_model.features import ADC_NAMES, T2_NAMES, feature_names, tumour_features

SPACING = (3.0, 1.5, 1.5)
SHAPE = (8, 32, 32)
BOX = (slice(2, 6), slice(8, 24), slice(8, 24))  # the predicted tumour


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 2, *SHAPE, generator=g, dtype=torch.float64)
    image[:, 1] = 1.0 + 0.3 * image[:, 1].abs()  # ADC in 10^-3 mm^2/s
    prob = torch.full((1, 1, *SHAPE), 0.1, dtype=torch.float64)
    prob[(0, 0, *BOX)] = 0.9
    return image, prob


def _features(image: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    return tumour_features(image, prob, spacing=SPACING)


@pytest.mark.parametrize("channel", [0, 1])
def test_one_voxel_inside_the_tumour_changes_the_features_outside_does_not(
    channel: int,
) -> None:
    image, prob = _inputs()
    base = _features(image, prob)
    inside = image.clone()
    inside[0, channel, 3, 15, 15] += 0.5  # one voxel on the input grid
    assert not torch.allclose(_features(inside, prob), base)
    outside = image.clone()
    outside[0, channel, 0, 1, 1] += 0.5  # far from the tumour
    assert torch.equal(_features(outside, prob), base)


def test_adc_statistics_keep_their_physical_unit() -> None:
    image, prob = _inputs()
    image[(0, 1, *BOX)] = 1.7
    f = dict(zip(feature_names(0), _features(image, prob)[0].tolist(), strict=True))
    # features are (value - 1.2) / 0.5: decoding gives the ADC back in 10^-3 mm^2/s
    for name in ("adc_mean", "adc_p10", "adc_p50", "adc_p90", "adc_core_mean"):
        assert f[name] * 0.5 + 1.2 == pytest.approx(1.7)
    assert f["adc_sd"] == pytest.approx(0.0, abs=1e-9)
    assert f["adc_bin3"] == pytest.approx(2.0)  # every voxel in [1.5, 2.0)
    # a different absolute level is a different feature (no per-patch z-scoring)
    image[(0, 1, *BOX)] = 2.2
    g = dict(zip(feature_names(0), _features(image, prob)[0].tolist(), strict=True))
    assert g["adc_mean"] * 0.5 + 1.2 == pytest.approx(2.2)


def test_core_is_the_eroded_tumour_and_a_missed_tumour_stays_finite() -> None:
    image, prob = _inputs()
    image[(0, 1, *BOX)] = 1.0
    image[0, 1, 2:6, 8:24, 8:10] = 2.5  # a bright rim, two voxels (3 mm) wide
    f = dict(zip(feature_names(0), _features(image, prob)[0].tolist(), strict=True))
    assert f["adc_core_mean"] * 0.5 + 1.2 == pytest.approx(1.0)
    assert f["adc_mean"] * 0.5 + 1.2 > 1.1
    empty = torch.full_like(prob, 0.05)
    empty[0, 0, 4, 16, 16] = 0.2
    assert torch.isfinite(_features(image, empty)).all()


def test_feature_blocks_and_decoder_pooling() -> None:
    image, prob = _inputs()
    decoder = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    decoder[(0, slice(None), *BOX)] = 2.0
    f = tumour_features(image, prob, spacing=SPACING, decoder=decoder)
    assert f.shape == (1, len(feature_names(3)))
    assert torch.allclose(f[0, -3:], torch.full((3,), 2.0, dtype=torch.float64))
    assert len(ADC_NAMES) + len(T2_NAMES) + 3 + 3 == f.shape[1]


# --- the site's feature cache ---------------------------------------------------


@pytest.fixture()
def site(tiny_copy: Path):  # type: ignore[no-untyped-def]
    from client.data.dataset import build_site_datasets
    from client.data.site_config import load_site_config
    from client.training.feature_cache import eval_view
    from shared_model.plan import PRESET_PLANS

    config = load_site_config(tiny_copy / "site_configs" / "west_china.yaml")
    plan = PRESET_PLANS["tiny"]
    train, _, _ = build_site_datasets(config, plan)
    view = eval_view(train, plan, config.adc_scale)
    view.cases = view.cases[:3]
    return config, plan, view


def _model(plan):  # type: ignore[no-untyped-def]
    from shared_model.model import build_model
    from shared_model.model_config import ModelConfig

    torch.manual_seed(0)
    return build_model(
        ModelConfig.from_plan(plan, base_filters=4, max_filters=16, embed_dim=8)
    )


def test_cache_is_reused_and_invalidated_by_backbone_plan_and_data(
    site, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    from client.training.feature_cache import eval_view, load_or_build
    from shared_model.plan import Plan

    config, plan, view = site
    folder = config.run_dir / "feature_cache"
    model = _model(plan)
    cpu = torch.device("cpu")
    first, cached = load_or_build(folder, "train", model, plan, view, device=cpu)
    assert not cached and len(first) == 3
    again, cached = load_or_build(folder, "train", model, plan, view, device=cpu)
    assert cached and torch.equal(again.features, first.features)
    assert again.case_ids == first.case_ids
    # the heads changing does not touch the cache; the backbone does
    with torch.no_grad():
        model.experts["TNT"][0].weight.add_(1.0)
    assert load_or_build(folder, "train", model, plan, view, device=cpu)[1]
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    changed, cached = load_or_build(folder, "train", model, plan, view, device=cpu)
    assert not cached and not torch.equal(changed.features, first.features)
    assert len(list(folder.glob("train-*.safetensors"))) == 1  # the stale one went
    # another plan, or a case's file rewritten, is another key
    other = Plan(patch_size=plan.patch_size, spacing=(3.0, 3.0, 3.0))
    other_view = eval_view(view, other, config.adc_scale)
    other_view.cases = view.cases
    assert not load_or_build(folder, "p", model, other, other_view, device=cpu)[1]
    assert load_or_build(folder, "p", model, other, other_view, device=cpu)[1]
    label = view.cases[0].label
    label.write_bytes(label.read_bytes())  # same content, new modification time
    import os

    os.utime(label, ns=(0, 10**18))
    assert not load_or_build(folder, "p", model, other, other_view, device=cpu)[1]


@pytest.mark.parametrize("damage", ["truncate", "nan", "wrong-key"])
def test_a_corrupt_cache_is_rebuilt_never_used(
    site, damage: str, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    from client.training.feature_cache import load_or_build

    config, plan, view = site
    folder = config.run_dir / "feature_cache"
    model = _model(plan)
    cpu = torch.device("cpu")
    good, _ = load_or_build(folder, "train", model, plan, view, device=cpu)
    (path,) = folder.glob("train-*.safetensors")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata())
        tensors = load_file(str(path))
        if damage == "nan":
            tensors["features"][0, 0] = float("nan")
        else:
            meta["key"] = "0" * 64
        save_file(tensors, str(path), metadata=meta)
    with caplog.at_level(logging.WARNING):
        again, cached = load_or_build(folder, "train", model, plan, view, device=cpu)
    assert not cached
    assert "unusable" in caplog.text and "rebuilding" in caplog.text
    assert torch.equal(again.features, good.features)
