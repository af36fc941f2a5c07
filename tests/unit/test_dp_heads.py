"""DP on the heads over a frozen backbone: per-sample gradients, what trains,
the backbone artifact, the feasibility preflight."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule

from client.privacy.dp_sgd import PrivateRound, dp_generator
from client.privacy.rounds import DPRound
from client.training.feature_cache import FeatureSet
from client.training.heads import GatedHead, HeadConfig, train_heads_private
from shared_model.backbone import (
    apply_backbone,
    backbone_digest,
    load_backbone,
    save_backbone,
)
from shared_model.errors import ConfigError, DataError
from shared_model.loss import gated_bce
from shared_model.model import build_model
from shared_model.model_config import ModelConfig
from shared_model.parameter_groups import is_head_parameter
from shared_model.plan import PRESET_PLANS

PLAN = PRESET_PLANS["tiny"]


def _model(**overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig.from_plan(
        PLAN, **{"base_filters": 4, "max_filters": 16, **overrides}
    )
    return build_model(cfg)


def _features(model: torch.nn.Module, n: int, seed: int = 0) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    clinical = torch.zeros(n, 15)
    clinical[torch.arange(n), torch.randint(0, 15, (n,), generator=g)] = 1.0
    return FeatureSet(
        [f"C{i}" for i in range(n)],
        torch.randn(n, model.n_features, generator=g),
        clinical,
        torch.randint(0, 3, (n,), generator=g),
        (torch.rand(n, generator=g) > 0.5).float(),
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"experts": "independent", "embed_dim": 8, "expert_hidden": 8},
        {"head": "linear"},
    ],
    ids=["residual", "independent", "linear"],
)
def test_head_per_sample_gradients_equal_a_batch_of_one_loop(overrides: dict) -> None:
    model = _model(**overrides).double()
    data = _features(model, 5)
    feats, clin = data.features.double(), data.clinical.double()
    head = GatedHead(model)
    names = {id(p): n for n, p in model.named_parameters()}
    ref: dict[str, list[torch.Tensor]] = {names[id(p)]: [] for p in head.parameters()}
    for i in range(5):
        head.zero_grad()
        loss = gated_bce(
            head(feats[i : i + 1], clin[i : i + 1], data.regimen[i : i + 1]),
            data.pcr[i : i + 1].double(),
        )
        loss.backward()
        for p in head.parameters():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            ref[names[id(p)]].append(grad.clone())
    gsm = GradSampleModule(head, loss_reduction="mean", force_functorch=True)
    gsm.zero_grad()
    gated_bce(gsm(feats, clin, data.regimen), data.pcr.double()).backward()
    for p in head.parameters():
        per_sample = p.grad_sample
        expected = torch.stack(ref[names[id(p)]])
        assert torch.allclose(per_sample, expected, atol=1e-10), names[id(p)]
    gsm._close()
    # the backbone is not part of what opacus sees
    assert all(is_head_parameter(names[id(p)]) for p in head.parameters())


def test_dp_head_training_leaves_the_backbone_untouched() -> None:
    model = _model(embed_dim=4)
    data = _features(model, 40)
    before = copy.deepcopy(model.state_dict())
    dp = DPRound(1.0, 1.0, 0.5, 12, 40)
    res = train_heads_private(
        model, data, HeadConfig(lr=0.01), PrivateRound(dp, dp_generator(3), False)
    )
    assert res.steps == 12 and math.isfinite(res.loss)
    after = model.state_dict()
    backbone = [k for k in before if not is_head_parameter(k)]
    heads = [k for k in before if is_head_parameter(k)]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)
    assert all(not torch.equal(before[k], after[k]) for k in heads if "weight" in k)
    assert all(
        p.grad is None for n, p in model.named_parameters() if not is_head_parameter(n)
    )
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_dp_head_training_is_reproducible_only_when_seeded() -> None:
    runs = []
    for seed in (5, 5, None):
        model = _model(embed_dim=4)
        train_heads_private(
            model,
            _features(model, 30),
            HeadConfig(lr=0.01),
            PrivateRound(DPRound(2.0, 1.0, 0.5, 5, 30), dp_generator(seed), False),
        )
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_frozen_experts_get_no_update_under_dp() -> None:
    model = _model(embed_dim=4)
    trainable = {
        n for n, _ in model.named_parameters() if not n.startswith("experts.nCT")
    }
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_heads_private(
        model,
        _features(model, 30),
        HeadConfig(lr=0.01),
        PrivateRound(DPRound(1.0, 1.0, 0.5, 5, 30), dp_generator(0), False),
        trainable=trainable,
    )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "experts.nCT" in k)


def test_backbone_artifact_round_trip_tamper_and_misfit(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "backbone.safetensors"
    centre = [0.5] * model.n_features
    scale = [2.0] * model.n_features
    digest = save_backbone(
        model,
        path,
        plan=PLAN,
        trained_on={"source": "test"},
        feature_stats=(centre, scale),
    )
    b = load_backbone(path)
    assert b.feature_centre == tuple(centre) and b.feature_scale == tuple(scale)
    assert b.sha256 == digest == backbone_digest(model.state_dict())
    numpy_state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert backbone_digest(numpy_state) == digest
    assert b.trained_on == {"source": "test"} and b.plan.to_dict() == PLAN.to_dict()
    fresh = _model()
    torch.manual_seed(1)
    other = build_model(fresh.config)
    apply_backbone(other, b)
    assert backbone_digest(other.state_dict()) == digest
    # a backbone for other widths does not fit
    with pytest.raises(ConfigError, match="does not fit"):
        apply_backbone(_model(base_filters=8, max_filters=32), b)
    # one changed byte: refused, the file named
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x55
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="backbone.safetensors"):
        load_backbone(path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="not a readable"):
        load_backbone(path)


def test_feasibility_reports_noise_and_warns_when_training_cannot_learn(
    tmp_path: Path,
) -> None:
    from client.checks.dp_feasibility import dp_feasibility
    from client.data.privacy_config import PrivacyConfig
    from client.data.site_config import SiteConfig
    from shared_model.federation_config import FederationConfig

    config = SiteConfig(
        path=tmp_path / "s.yaml",
        site_name="s",
        role="train",
        dataset_dir=tmp_path,
        adc_unit="1e-3",
        run_dir=tmp_path / "run",
        min_cases=1,
        device="cpu",
        num_workers=0,
        val_fraction=0.2,
        split_seed=0,
        privacy=PrivacyConfig(8.0, 1e-5, 1.0),
    )
    heads = FederationConfig(
        backbone="b.safetensors",
        head_rounds=4,
        embed_dim=4,
        head_fit="rounds",
        head_type="mlp",
    )
    f = dp_feasibility(config, 60, heads)
    assert f.mode == "heads" and f.noise_multiplier is not None
    assert f.steps_per_round == 20 and f.sample_rate == 0.5
    expected = f.noise_multiplier * math.sqrt(f.trained_parameters) / 30
    assert f.noise_to_signal_step == pytest.approx(expected)
    assert f.noise_to_signal_run == pytest.approx(expected / math.sqrt(80))
    assert not f.cannot_learn
    joint = dp_feasibility(config, 60, FederationConfig(training="joint"))
    assert joint.mode == "joint" and joint.cannot_learn
    refused = dp_feasibility(config, 60, FederationConfig())
    assert refused.mode == "refused" and "backbone" in refused.reason
    # the Newton fit's exact sums are outside any budget: refused, naming it
    newton = dp_feasibility(config, 60, FederationConfig(backbone="b.safetensors"))
    assert newton.mode == "refused" and "head-fit = rounds" in newton.reason


def test_the_linear_head_is_a_logistic_regression_with_regimen_interactions() -> None:
    model = _model(head="linear")
    names = [n for n, _ in model.named_parameters() if is_head_parameter(n)]
    assert all(n.startswith(("prognosis.", "experts.")) for n in names)
    width = model.n_features + 15
    assert sum(p.numel() for n, p in model.named_parameters() if n in names) == 4 * (
        width + 1
    )
    data = _features(model, 6)
    z = torch.cat(
        [
            data.features[
                :, [*range(15, 22), *range(15), *range(22, model.n_features)]
            ],
            data.clinical,
        ],
        1,
    )
    with torch.no_grad():
        expected = torch.cat(
            [
                z @ model.experts[r][0].weight.T + model.experts[r][0].bias
                for r in ("nCRT", "TNT", "nCT")
            ],
            dim=1,
        ) + (z @ model.prognosis[0].weight.T + model.prognosis[0].bias)
        assert torch.allclose(
            model.head(data.features, data.clinical), expected, atol=1e-5
        )


def test_public_feature_statistics_standardise_the_head_input() -> None:
    plain = _model(head="linear")
    n = plain.n_features
    centre, scale = [float(i) for i in range(n)], [float(i + 1) for i in range(n)]
    cfg = ModelConfig.from_dict(
        {**plain.config.to_dict(), "feature_centre": centre, "feature_scale": scale}
    )
    standardised = build_model(cfg)
    standardised.load_state_dict(plain.state_dict())  # the statistics are not weights
    data = _features(plain, 4)
    x = data.features * torch.tensor(scale) + torch.tensor(centre)
    with torch.no_grad():
        assert torch.allclose(
            standardised.head(x, data.clinical),
            plain.head(data.features, data.clinical),
            atol=1e-5,
        )
    with pytest.raises(ConfigError, match="feature_centre"):
        ModelConfig.from_dict(
            {**plain.config.to_dict(), "feature_centre": [0.0], "feature_scale": [0.0]}
        )
