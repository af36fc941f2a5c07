"""The network's configuration: the nnU-Net kernel and stride rule and
:class:`ModelConfig`, everything that fixes the network's shape (re-exported by
:mod:`shared_model.model`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from shared_model.errors import ConfigError
from shared_model.federation_config import FederationConfig
from shared_model.plan import Plan

FEATURES = ("tumour", "stem")
EXPERTS = ("residual", "independent")
HEADS = ("mlp", "linear")


def compute_kernels_strides(
    patch_size: Sequence[int], spacing: Sequence[float], *, max_levels: int = 6
) -> tuple[list[list[int]], list[list[int]]]:
    """The nnU-Net rule for kernels and strides of a 3-D U-Net.

    An axis is halved at a level while its current spacing is at most twice the
    finest current spacing and its feature map still has at least 8 voxels; a
    thick-slice axis gets kernel 1 (no mixing across slices) until the in-plane
    axes have caught up with its spacing.

    Returns:
        ``(kernels, strides)``, one entry per level; the first stride is 1.

    Raises:
        ConfigError: the patch is not divisible by the strides it implies.
    """
    sizes = [float(s) for s in patch_size]
    spacings = [float(s) for s in spacing]
    kernels: list[list[int]] = []
    strides: list[list[int]] = [[1, 1, 1]]
    while len(strides) < max_levels:
        finest = min(spacings)
        ratio = [s / finest for s in spacings]
        stride = [
            2 if r <= 2 and n >= 8 else 1 for r, n in zip(ratio, sizes, strict=True)
        ]
        if all(s == 1 for s in stride):
            break
        for n, s, p in zip(sizes, stride, patch_size, strict=True):
            if n % s:
                raise ConfigError(
                    f"patch size {tuple(patch_size)} is not divisible by the strides the "
                    f"nnU-Net rule gives (axis of size {p}); use multiples of 16"
                )
        kernels.append([3 if r <= 2 else 1 for r in ratio])
        sizes = [n / s for n, s in zip(sizes, stride, strict=True)]
        spacings = [sp * s for sp, s in zip(spacings, stride, strict=True)]
        strides.append(stride)
    kernels.append([3, 3, 3])
    return kernels, strides


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the network's shape.

    Attributes:
        patch_size: input patch ``(D, H, W)``.
        spacing: voxel spacing ``(D, H, W)`` in mm (drives kernels and strides).
        base_filters: filters of the first level; doubled per level.
        max_filters: cap on filters (nnU-Net: 32 and 320; the CPU default is
            8 and 256, about 1.5 M parameters at the demo patch).
        deep_supr_num: extra deep-supervision heads.
        stem_channels: channels of each modality stem (``features: stem``).
        embed_dim: size of each modality embedding (the study: 64).
        expert_hidden: hidden units of each expert MLP; 0 (default) makes each
            expert linear in the embedding, so that what differs between
            regimens is a small correction learnt from each arm's patients
            (the study: 64).
        use_clinical: False builds the image-only comparator (no clinical input).
        features: ``tumour`` (default): statistics inside the predicted tumour
            on the input grid (:mod:`shared_model.features`), ADC in its
            physical unit, plus the last decoder layer's features pooled there;
            ``stem``: the study's modality stems, pooled on their 4x coarser grid.
        experts: ``residual`` (default): a shared prognosis head plus one expert
            per regimen, ``logit_r = prognosis(z) + expert_r(z)``;
            ``independent``: the study's three separate experts.
        head: ``mlp`` (default): each modality's block goes through a two-layer
            MLP to its ``embed_dim`` embedding; ``linear`` (tumour features
            only): no embedding, ``z`` is the feature blocks and the clinical
            one-hot themselves, so with linear experts the pCR part is a
            logistic regression with regimen interactions (a few hundred
            parameters: the head DP-SGD can train at a site's size).
        feature_centre, feature_scale: per-feature standardisation of the
            tumour features before the head, ``(f - centre) / scale``; empty
            (default): none. A pretrained backbone brings them, computed on
            its public training cases (so DP-SGD's isotropic noise and per-
            patient clipping treat every feature alike).
        in_channels, out_channels: fixed by the data format (T2W, ADC; bg, tumour).
    """

    patch_size: tuple[int, int, int] = Plan.patch_size
    spacing: tuple[float, float, float] = Plan.spacing
    base_filters: int = FederationConfig.base_filters
    max_filters: int = FederationConfig.max_filters
    deep_supr_num: int = 2
    stem_channels: int = 16
    embed_dim: int = FederationConfig.embed_dim
    expert_hidden: int = 0
    use_clinical: bool = FederationConfig.use_clinical
    features: str = FederationConfig.features
    experts: str = FederationConfig.experts
    head: str = "mlp"
    feature_centre: tuple[float, ...] = ()
    feature_scale: tuple[float, ...] = ()
    in_channels: int = 2
    out_channels: int = 2
    kernels: list[list[int]] = field(init=False, compare=False, repr=False)
    strides: list[list[int]] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in (
            "base_filters",
            "max_filters",
            "stem_channels",
            "embed_dim",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"model `{name}` must be a positive integer")
        if int(self.expert_hidden) < 0:
            raise ConfigError("model `expert_hidden` must be >= 0 (0: linear experts)")
        if self.features not in FEATURES:
            raise ConfigError(
                f"model `features` is {self.features!r}; expected one of {FEATURES}"
            )
        if self.experts not in EXPERTS:
            raise ConfigError(
                f"model `experts` is {self.experts!r}; expected one of {EXPERTS}"
            )
        if self.head not in HEADS or (
            self.head == "linear" and self.features != "tumour"
        ):
            raise ConfigError(
                f"model `head` is {self.head!r}; expected one of {HEADS} (linear "
                "needs features: tumour)"
            )
        centre = tuple(float(x) for x in self.feature_centre)
        scale = tuple(float(x) for x in self.feature_scale)
        if len(centre) != len(scale) or not all(
            math.isfinite(c) and math.isfinite(v) and v > 0
            for c, v in zip(centre, scale, strict=False)
        ):
            raise ConfigError(
                "model `feature_centre` and `feature_scale` must be finite, of one "
                "length, with every scale > 0"
            )
        object.__setattr__(self, "feature_centre", centre)
        object.__setattr__(self, "feature_scale", scale)
        if self.in_channels != 2 or self.out_channels != 2:
            raise ConfigError(
                "the model reads 2 channels (T2W, ADC) and predicts 2 classes"
            )
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        kernels, strides = compute_kernels_strides(self.patch_size, self.spacing)
        if len(strides) < 3:
            raise ConfigError(f"patch {self.patch_size} is too small for a U-Net")
        if not 0 <= self.deep_supr_num < len(strides) - 1:
            raise ConfigError(
                f"model `deep_supr_num` must be in 0..{len(strides) - 2} for this patch"
            )
        object.__setattr__(self, "kernels", kernels)
        object.__setattr__(self, "strides", strides)

    @property
    def filters(self) -> list[int]:
        return [
            min(self.base_filters * 2**i, self.max_filters)
            for i in range(len(self.strides))
        ]

    @classmethod
    def from_plan(cls, plan: Plan, **overrides: Any) -> ModelConfig:
        return cls(patch_size=plan.patch_size, spacing=plan.spacing, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("kernels")
        d.pop("strides")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__ if f not in ("kernels", "strides")}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown model config keys {sorted(unknown)}")
        # A config written before `features` and `experts` existed describes
        # the study's model: stems on the coarse grid, independent experts.
        return cls(**{"features": "stem", "experts": "independent", **data})


def model_config_for(fed: FederationConfig, plan: Plan) -> ModelConfig:
    """The network a run config asks for: widths, features and experts (the
    ``independent`` experts come with the study's sizes: 64-D embeddings and
    64 hidden units)."""
    study = (
        {"embed_dim": 64, "expert_hidden": 64}
        if fed.experts == "independent"
        else {"embed_dim": fed.embed_dim}
    )
    return ModelConfig.from_plan(
        plan,
        head=fed.head_type,
        base_filters=fed.base_filters,
        max_filters=fed.max_filters,
        features=fed.features,
        experts=fed.experts,
        use_clinical=fed.use_clinical,
        **study,
    )
