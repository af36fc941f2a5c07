"""UNet-MoE-Cli: an nnU-Net-style segmenter with regimen-specific pCR experts.

Architecture (tensor shapes in ``(B, C, D, H, W)``):

1. **Backbone**: MONAI ``DynUNet`` with the nnU-Net kernel/stride rule for the
   plan's patch and spacing, InstanceNorm (affine), LeakyReLU, deep
   supervision. It segments the tumour (2 classes) from T2W + ADC.
2. **Tumour features** (``features: tumour``, default): statistics inside the
   predicted tumour and its core on the input grid, ADC in its physical unit,
   plus the last decoder layer's features pooled over the tumour
   (:mod:`shared_model.features`); the ADC block and the T2W block, each with
   the shape block, go through their own MLP to an embedding. ``features:
   stem`` is the study's design: each modality's own convolutional stem,
   pooled inside the (detached) tumour probability and over the patch on a 4x
   coarser grid, with the bottleneck average and log volume as shared inputs.
3. **Experts**: the clinical one-hot (15) joins both embeddings (``z``). With
   ``experts: residual`` (default) a prognosis head shared by all regimens
   plus one expert per regimen gives ``logit_r = prognosis(z) + expert_r(z)``;
   ``independent`` is the study's three separate experts. Every expert runs on
   every sample ("dense" gating) and the received regimen's logit is selected
   with a one-hot mask, so every forward is counterfactual-ready and opacus
   sees every expert in every step.

The pCR part of the default model depends on the image only through the
feature vector (:meth:`UNetMoECli.tumour_features`), so staged training can
compute it once per patient with a frozen backbone and train :meth:`head`.

Privacy-compatible by construction: no BatchNorm, no in-place activation or
add, and every module reachable once (``DynUNet`` registers its blocks twice,
as attributes and inside ``skip_layers``;
:func:`shared_model.model_blocks.dealias_dynunet` removes the attribute
copies, since a module hooked twice gets per-sample gradients twice too large
under opacus).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet
from torch import nn

from shared_model.clinical import CLINICAL_DIM, REGIMENS
from shared_model.errors import ConfigError
from shared_model.features import feature_sizes, tumour_features
from shared_model.model_blocks import (
    ModalityEncoder,
    dealias_dynunet,
    embedding_mlp,
    expert_mlp,
)
from shared_model.model_config import (
    ModelConfig,
)

ACT = ("leakyrelu", {"inplace": False, "negative_slope": 0.01})
NORM = ("instance", {"affine": True})


class ModelOutput(NamedTuple):
    """Output of :class:`UNetMoECli`.

    Attributes:
        seg_logits: train mode ``(B, 1 + deep_supr_num, 2, D, H, W)`` (all
            deep-supervision heads, main head first); eval mode ``(B, 2, D, H, W)``.
        pcr_logits: ``(B, 3)``, every expert's pCR logit (nCRT, TNT, nCT).
        gated_logit: ``(B,)``, the received regimen's expert.
        head_input: ``(B, E)``, what the experts read (``z``; tumour features
            only): with the linear head, the standardised feature blocks and
            the clinical one-hot, the design of its logistic regression.
    """

    seg_logits: torch.Tensor
    pcr_logits: torch.Tensor
    gated_logit: torch.Tensor
    head_input: torch.Tensor | None = None


class UNetMoECli(nn.Module):
    """The UNet-MoE-Cli network. Call as ``model(image, clinical, regimen)``.

    Args of forward:
        image: ``(B, 2, D, H, W)`` float, T2W then ADC.
        clinical: ``(B, 15)`` one-hot (ignored when ``use_clinical`` is False).
        regimen: ``(B,)`` int64 index into ``REGIMENS``.

    With ``features: tumour`` the pCR part is a function of a per-patient
    feature vector (:meth:`tumour_features`) and the clinical one-hot only
    (:meth:`head`), so it can be trained on features computed once with a
    frozen backbone (staged training).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = DynUNet(
            spatial_dims=3,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            kernel_size=cfg.kernels,
            strides=cfg.strides,
            upsample_kernel_size=cfg.strides[1:],
            filters=cfg.filters,
            norm_name=NORM,
            act_name=ACT,
            deep_supervision=cfg.deep_supr_num > 0,
            deep_supr_num=max(cfg.deep_supr_num, 1),
            res_block=False,
        )
        bottleneck = dealias_dynunet(self.backbone)
        self._features: dict[str, torch.Tensor] = {}
        bottleneck.register_forward_hook(self._keep_bottleneck)
        self.backbone.output_block.register_forward_hook(self._keep_decoder)
        self.encode_t2: nn.Module
        self.encode_adc: nn.Module
        embedded = 2 * cfg.embed_dim
        if cfg.features == "tumour":
            n_adc, n_t2, n_shape = feature_sizes(cfg.filters[0])
            self._split = (n_adc, n_t2, n_shape)
            if cfg.head == "linear":  # z: the feature blocks themselves
                self.encode_t2 = nn.Identity()
                self.encode_adc = nn.Identity()
                embedded = n_t2 + n_adc + n_shape
            else:
                self.encode_t2 = embedding_mlp(n_t2 + n_shape, cfg.embed_dim)
                self.encode_adc = embedding_mlp(n_adc + n_shape, cfg.embed_dim)
        else:
            shared_dim = cfg.filters[-1] + 1
            self.encode_t2 = ModalityEncoder(cfg, shared_dim)
            self.encode_adc = ModalityEncoder(cfg, shared_dim)
        expert_in = embedded + (CLINICAL_DIM if cfg.use_clinical else 0)
        if cfg.experts == "residual":
            self.prognosis = expert_mlp(expert_in, cfg.expert_hidden)
        self.experts = nn.ModuleDict(
            {r: expert_mlp(expert_in, cfg.expert_hidden) for r in REGIMENS}
        )
        self._voxel_ml = math.prod(cfg.spacing) / 1000.0
        self._feature_centre: torch.Tensor
        self._feature_scale: torch.Tensor
        self.register_buffer(
            "_feature_centre", torch.tensor(cfg.feature_centre), persistent=False
        )
        self.register_buffer(
            "_feature_scale", torch.tensor(cfg.feature_scale), persistent=False
        )
        if cfg.feature_centre and (
            cfg.features != "tumour" or len(cfg.feature_centre) != self.n_features
        ):
            raise ConfigError(
                f"model `feature_centre` has {len(cfg.feature_centre)} values; the "
                f"tumour features have {self.n_features if cfg.features == 'tumour' else 0}"
            )

    @property
    def n_features(self) -> int:
        """Width of :meth:`tumour_features`' output (``features: tumour``)."""
        return sum(self._split)

    def _keep_bottleneck(
        self, _module: nn.Module, _inp: Any, out: torch.Tensor
    ) -> None:
        self._features["bottleneck"] = out

    def _keep_decoder(self, _module: nn.Module, inp: Any, _out: torch.Tensor) -> None:
        self._features["decoder"] = inp[0]

    def segment(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone pass: ``(seg_logits, bottleneck_features)``.

        ``seg_logits`` is ``(B, heads, 2, D, H, W)`` in train mode and
        ``(B, 2, D, H, W)`` in eval mode.
        """
        seg = self.backbone(image)
        if self.training and seg.ndim == 5:
            seg = seg.unsqueeze(1)  # no deep supervision: one head
        bottleneck = self._features.pop("bottleneck")
        return seg, bottleneck

    def shared_features(
        self, seg: torch.Tensor, bottleneck: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tumour probability map and the shared vector (bottleneck GAP, log volume)."""
        prob = self.tumour_probability(seg)
        log_volume = torch.log1p(prob.sum(dim=(2, 3, 4)) * self._voxel_ml)
        shared = torch.cat([bottleneck.mean(dim=(2, 3, 4)), log_volume], dim=1)
        return prob, shared

    @staticmethod
    def tumour_probability(seg: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` tumour probability of the main head, detached
        (the pCR loss does not pull the segmentation)."""
        main = seg[:, 0] if seg.ndim == 6 else seg
        return torch.softmax(main.float(), dim=1)[:, 1:2].detach()

    def tumour_features(
        self, image: torch.Tensor, seg: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-patient features ``(B, n_features)`` inside the predicted tumour
        on the input grid (runs the backbone when ``seg`` is not given)."""
        if seg is None:
            seg, _ = self.segment(image)
        return tumour_features(
            image,
            self.tumour_probability(seg),
            spacing=self.config.spacing,
            decoder=self._features.pop("decoder"),
        )

    def head(self, features: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        """pCR logits ``(B, 3)`` from tumour features and the clinical one-hot."""
        return self.experts_of(self.head_input(features, clinical))

    def head_input(
        self, features: torch.Tensor, clinical: torch.Tensor
    ) -> torch.Tensor:
        """``z`` ``(B, E)``, what the experts read: the modality embeddings
        (``mlp``) or the standardised feature blocks themselves (``linear``),
        then the clinical one-hot."""
        n_adc, n_t2, _ = self._split
        if self.config.feature_centre:
            features = (features - self._feature_centre) / self._feature_scale
        adc, t2, shape = (
            features[:, :n_adc],
            features[:, n_adc : n_adc + n_t2],
            features[:, n_adc + n_t2 :],
        )
        if self.config.head == "linear":
            parts = [t2, adc, shape]
        else:
            parts = [
                self.encode_t2(torch.cat([t2, shape], dim=1)),
                self.encode_adc(torch.cat([adc, shape], dim=1)),
            ]
        return self._with_clinical(parts, clinical)

    def _with_clinical(
        self, parts: list[torch.Tensor], clinical: torch.Tensor
    ) -> torch.Tensor:
        if self.config.use_clinical:
            parts = [*parts, clinical]
        return torch.cat(parts, dim=1)

    def experts_of(self, z: torch.Tensor) -> torch.Tensor:
        """pCR logits ``(B, 3)`` from the experts' input ``z``."""
        logits = torch.cat([self.experts[r](z) for r in REGIMENS], dim=1)
        if self.config.experts == "residual":
            logits = logits + self.prognosis(z)
        return logits

    @property
    def is_glm(self) -> bool:
        """Whether the pCR part is a logistic regression in ``head_input``:
        the linear head with linear residual experts
        (:mod:`shared_model.posterior` fits it and its posterior)."""
        return (
            self.config.features == "tumour"
            and self.config.head == "linear"
            and self.config.experts == "residual"
            and self.config.expert_hidden == 0
        )

    def glm_coefficients(self) -> np.ndarray:
        """The linear head as ``B`` ``(4, P)``: rows prognosis, then the
        experts in REGIMENS order; each row the weights, then the intercept."""
        if not self.is_glm:
            raise ConfigError("only the linear residual head is a logistic regression")
        rows = self._glm_layers()
        return np.stack(
            [
                np.concatenate(
                    [
                        layer.weight.detach().cpu().double().numpy().ravel(),
                        layer.bias.detach().cpu().double().numpy(),
                    ]
                )
                for layer in rows
            ]
        )

    def _glm_layers(self) -> list[nn.Linear]:
        """The linear head's layers: prognosis, then each regimen's expert."""
        heads = [self.prognosis, *(self.experts[r] for r in REGIMENS)]
        layers = [h[0] for h in heads if isinstance(h, nn.Sequential)]
        if len(layers) != len(heads) or not all(
            isinstance(x, nn.Linear) for x in layers
        ):
            raise ConfigError("only the linear residual head is a logistic regression")
        return layers  # type: ignore[return-value]

    def set_glm_coefficients(self, beta: np.ndarray) -> None:
        """Set the linear head from ``B`` ``(4, P)`` (see :meth:`glm_coefficients`)."""
        rows = self._glm_layers()
        b = np.asarray(beta, np.float64)
        if b.shape != (len(rows), rows[0].weight.shape[1] + 1):
            raise ConfigError(f"head coefficients of shape {b.shape} do not fit")
        with torch.no_grad():
            for layer, row in zip(rows, b, strict=True):
                layer.weight.copy_(
                    torch.as_tensor(row[:-1][None], dtype=layer.weight.dtype)
                )
                layer.bias.copy_(torch.as_tensor(row[-1:], dtype=layer.bias.dtype))

    @staticmethod
    def gate(pcr_logits: torch.Tensor, regimen: torch.Tensor) -> torch.Tensor:
        """The received regimen's logit ``(B,)`` (hard gating)."""
        one_hot = F.one_hot(regimen, num_classes=len(REGIMENS)).to(pcr_logits.dtype)
        return (one_hot * pcr_logits).sum(dim=1)

    def forward(
        self, image: torch.Tensor, clinical: torch.Tensor, regimen: torch.Tensor
    ) -> ModelOutput:
        seg, bottleneck = self.segment(image)
        if self.config.features == "tumour":
            z = self.head_input(self.tumour_features(image, seg), clinical)
            pcr_logits = self.experts_of(z)
            return ModelOutput(seg, pcr_logits, self.gate(pcr_logits, regimen), z)
        prob, shared = self.shared_features(seg, bottleneck)
        self._features.pop("decoder", None)
        parts = [
            self.encode_t2(image[:, 0:1], prob, shared),
            self.encode_adc(image[:, 1:2], prob, shared),
        ]
        pcr_logits = self.experts_of(self._with_clinical(parts, clinical))
        return ModelOutput(seg, pcr_logits, self.gate(pcr_logits, regimen))


def build_model(cfg: ModelConfig) -> UNetMoECli:
    """Build UNet-MoE-Cli for a model config (see :class:`ModelConfig`)."""
    return UNetMoECli(cfg)
