"""UNet-MoE-Cli: shapes, gating, parameter groups, modality independence, opacus."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from shared_model.clinical import REGIMENS
from shared_model.errors import ConfigError
from shared_model.loss import LossConfig, MoELoss
from shared_model.model import build_model
from shared_model.model_config import ModelConfig, compute_kernels_strides
from shared_model.parameter_groups import parameter_groups, stage_parameter_groups

SMALL = ModelConfig(
    patch_size=(8, 32, 32),
    spacing=(3.0, 2.5, 2.5),
    base_filters=4,
    max_filters=32,
    stem_channels=4,
    embed_dim=8,
    expert_hidden=8,
)


STUDY = ModelConfig(**{**SMALL.to_dict(), "features": "stem", "experts": "independent"})


def _batch(
    b: int = 4, cfg: ModelConfig = SMALL, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 2, *cfg.patch_size, generator=g)
    label = torch.zeros(b, 1, *cfg.patch_size)
    label[:, :, 2:6, 10:20, 10:20] = 1.0
    clinical = torch.zeros(b, 15)
    clinical[:, [1, 3, 6, 8, 10, 13]] = 1.0
    regimen = torch.arange(b) % 3
    pcr = (torch.arange(b) % 2).float()
    return image, label, clinical, regimen, pcr


def test_kernels_and_strides_follow_the_nnunet_rule() -> None:
    # thick slices: no mixing or halving across slices until in-plane catches up
    kernels, strides = compute_kernels_strides((24, 160, 160), (3.0, 0.7, 0.7))
    assert strides == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert kernels[:3] == [[1, 3, 3], [1, 3, 3], [3, 3, 3]]
    assert len(kernels) == len(strides)
    kernels, strides = compute_kernels_strides((16, 64, 64), (3.0, 1.5, 1.5))
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]
    assert all(k == [3, 3, 3] for k in kernels)
    with pytest.raises(ConfigError, match="not divisible"):
        compute_kernels_strides((16, 60, 60), (3.0, 1.5, 1.5))


def test_output_shapes_and_dense_gating() -> None:
    model = build_model(SMALL)
    image, _, clinical, regimen, _ = _batch()
    out = model(image, clinical, regimen)
    assert out.seg_logits.shape == (4, 1 + SMALL.deep_supr_num, 2, *SMALL.patch_size)
    assert out.pcr_logits.shape == (4, 3) and out.gated_logit.shape == (4,)
    assert torch.equal(out.gated_logit, out.pcr_logits[torch.arange(4), regimen])
    model.eval()
    out = model(image, clinical, regimen)
    assert out.seg_logits.shape == (4, 2, *SMALL.patch_size)
    # counterfactual-ready: changing the received regimen changes only the gate
    flipped = model(image, clinical, (regimen + 1) % 3)
    assert torch.allclose(flipped.pcr_logits, out.pcr_logits)
    assert torch.equal(
        flipped.gated_logit, out.pcr_logits[torch.arange(4), (regimen + 1) % 3]
    )


def test_residual_experts_share_a_prognosis_head() -> None:
    model = build_model(SMALL).eval()
    image, _, clinical, regimen, _ = _batch()
    with torch.no_grad():
        features = model.tumour_features(image)
        before = model.head(features, clinical)
        for p in model.prognosis.parameters():
            p.add_(0.1)
        after = model.head(features, clinical)
    # the prognosis head moves every regimen's logit by the same amount
    shift = after - before
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-6)
    assert shift.abs().max() > 1e-3
    assert not hasattr(build_model(STUDY), "prognosis")
    with pytest.raises(ConfigError, match="experts"):
        ModelConfig(**{**SMALL.to_dict(), "experts": "shared"})


def test_head_on_features_equals_the_full_forward() -> None:
    model = build_model(SMALL).eval()
    image, _, clinical, regimen, _ = _batch()
    with torch.no_grad():
        out = model(image, clinical, regimen)
        features = model.tumour_features(image)
        assert features.shape == (4, model.n_features)
        assert torch.allclose(model.head(features, clinical), out.pcr_logits)


def test_stage_groups_split_backbone_and_heads() -> None:
    model = build_model(SMALL)
    seg = stage_parameter_groups(model, "segmentation")
    heads = stage_parameter_groups(model, "heads")
    joint = stage_parameter_groups(model, "joint")
    assert joint == parameter_groups(model)
    assert seg["shared"] and all(n.startswith("backbone.") for n in seg["shared"])
    assert all(seg[f"expert/{r}"] == [] for r in REGIMENS)
    assert not any(n.startswith("backbone.") for g in heads.values() for n in g)
    assert "prognosis.0.weight" in heads["shared"]
    every = sorted(n for g in (seg, heads) for names in g.values() for n in names)
    assert every == sorted(n for n, _ in model.named_parameters())


def test_parameter_groups_partition_the_model() -> None:
    model = build_model(SMALL)
    groups = parameter_groups(model)
    assert set(groups) == {"shared", "expert/nCRT", "expert/TNT", "expert/nCT"}
    names = [n for names in groups.values() for n in names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))
    for r in REGIMENS:
        assert groups[f"expert/{r}"] and all(
            n.startswith(f"experts.{r}.") for n in groups[f"expert/{r}"]
        )
    assert not any(n.startswith("experts.") for n in groups["shared"])


def test_image_only_variant_ignores_clinical() -> None:
    cfg = ModelConfig(**{**SMALL.to_dict(), "use_clinical": False})
    model = build_model(cfg).eval()
    image, _, clinical, regimen, _ = _batch()
    a = model(image, clinical, regimen).pcr_logits
    b = model(image, torch.zeros_like(clinical), regimen).pcr_logits
    assert torch.equal(a, b)
    full = build_model(SMALL).eval()
    c = full(image, clinical, regimen).pcr_logits
    d = full(image, torch.zeros_like(clinical), regimen).pcr_logits
    assert not torch.allclose(c, d)


@pytest.mark.parametrize(("perturbed", "kept"), [(1, "t2"), (0, "adc")])
def test_modality_specific_features_depend_only_on_their_channel(
    perturbed: int, kept: str
) -> None:
    model = build_model(STUDY).eval()
    image, _, _, _, _ = _batch()
    with torch.no_grad():
        seg, bottleneck = model.segment(image)
        prob, _ = model.shared_features(seg, bottleneck)
        other = image.clone()
        other[:, perturbed] += torch.randn_like(other[:, perturbed])
        enc = {"t2": (model.encode_t2, 0), "adc": (model.encode_adc, 1)}
        for name, (encoder, ch) in enc.items():
            before = encoder.specific(image[:, ch : ch + 1], prob)
            after = encoder.specific(other[:, ch : ch + 1], prob)
            if name == kept:
                assert torch.equal(before, after)
            else:
                assert not torch.allclose(before, after)


@pytest.mark.parametrize("cfg", [SMALL, STUDY], ids=["tumour", "study"])
def test_every_parameter_gets_a_gradient_each_step(cfg: ModelConfig) -> None:
    model = build_model(cfg)
    image, label, clinical, regimen, pcr = _batch()
    regimen = torch.tensor([0, 0, 1, 1])  # nCT absent from the batch
    loss, _ = MoELoss()(model(image, clinical, regimen), label, pcr)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    # the absent regimen's expert gets a zero (not a missing) gradient
    assert all(
        float(p.grad.abs().sum()) == 0 for p in model.experts["nCT"].parameters()
    )


def test_loss_ignores_unknown_outcomes_and_weights_positives() -> None:
    model = build_model(SMALL)
    image, label, clinical, regimen, pcr = _batch()
    out = model(image, clinical, regimen)
    _, parts = MoELoss()(out, label, pcr)
    nan_pcr = pcr.clone()
    nan_pcr[0] = float("nan")
    _, parts_nan = MoELoss()(out, label, nan_pcr)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        out.gated_logit, pcr, reduction="none"
    ).detach()
    assert parts["pcr"] == pytest.approx(float(bce.mean()), rel=1e-5)
    assert parts_nan["pcr"] == pytest.approx(float(bce[1:].sum() / 4), rel=1e-5)
    _, weighted = MoELoss(LossConfig(pos_weight=3.0))(out, label, pcr)
    w = torch.where(pcr > 0, 3.0, 1.0)
    assert weighted["pcr"] == pytest.approx(float((w * bce).mean()), rel=1e-5)


# --- opacus ------------------------------------------------------------------------


def test_opacus_validator_is_clean_and_no_module_is_hooked_twice() -> None:
    model = build_model(SMALL).train()
    assert ModuleValidator.validate(model, strict=False) == []
    gsm = GradSampleModule(
        model, batch_first=True, loss_reduction="mean", force_functorch=True
    )
    modules = list(gsm.iterate_submodules(gsm._module))
    assert len(modules) > 20
    assert len(modules) == len({id(m) for m in modules})
    assert not any(
        isinstance(m, torch.nn.LeakyReLU) and m.inplace for m in model.modules()
    )


@pytest.mark.parametrize("cfg", [SMALL, STUDY], ids=["tumour", "study"])
def test_opacus_per_sample_gradients_equal_a_batch_of_one_loop(
    cfg: ModelConfig,
) -> None:
    """Whole model, float64, functorch mode: per-sample gradients match B=1
    passes for every parameter (backbone, embeddings, prognosis, experts)."""
    torch.manual_seed(0)
    model = build_model(cfg).double().train()
    image, label, clinical, regimen, pcr = (
        t.double() if t.is_floating_point() else t for t in _batch(b=3)
    )
    loss_fn = MoELoss()
    reference = {n: [] for n, _ in model.named_parameters()}
    for i in range(3):
        model.zero_grad()
        out = model(image[i : i + 1], clinical[i : i + 1], regimen[i : i + 1])
        loss_fn(out, label[i : i + 1], pcr[i : i + 1])[0].backward()
        for n, p in model.named_parameters():
            reference[n].append(p.grad.detach().clone())
    gsm = GradSampleModule(
        model, batch_first=True, loss_reduction="mean", force_functorch=True
    )
    gsm.zero_grad()
    loss_fn(gsm(image, clinical, regimen), label, pcr)[0].backward()
    num, den = 0.0, 0.0
    for n, p in gsm._module.named_parameters():
        expected = torch.stack(reference[n])
        assert p.grad_sample is not None, n
        assert p.grad_sample.shape == expected.shape, n
        num += float((p.grad_sample - expected).pow(2).sum())
        den += float(expected.pow(2).sum())
    assert (num / den) ** 0.5 < 1e-10
    gsm._close()


def test_public_api_and_no_flower_in_the_core() -> None:
    import subprocess
    import sys

    code = (
        "import sys, shared_model\n"
        "from shared_model import ModelConfig, build_model, parameter_groups\n"
        "assert not any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_config_from_before_the_tumour_features_is_the_study_model() -> None:
    old = {k: v for k, v in STUDY.to_dict().items() if k not in ("features", "experts")}
    cfg = ModelConfig.from_dict(old)
    assert cfg.features == "stem" and cfg.experts == "independent"
    assert ModelConfig.from_dict(SMALL.to_dict()) == SMALL
