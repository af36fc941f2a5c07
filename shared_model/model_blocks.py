"""The building blocks of :class:`shared_model.model.UNetMoECli`: a modality's
convolutional stem and MLP, the experts' and embeddings' MLPs, and the
de-aliasing of MONAI's DynUNet (every block reachable once, as opacus needs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet
from torch import nn

from shared_model.model_config import ModelConfig


def conv_block(
    cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int]
) -> nn.Sequential:
    k = (int(kernel[0]), int(kernel[1]), int(kernel[2]))
    s = (int(stride[0]), int(stride[1]), int(stride[2]))
    return nn.Sequential(
        nn.Conv3d(cin, cout, k, s, (k[0] // 2, k[1] // 2, k[2] // 2)),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=False),
    )


class ModalityEncoder(nn.Module):
    """One modality's own stem and MLP: ``(B, 1, D, H, W)`` -> ``(B, embed_dim)``.

    The stem's features are pooled inside the (shared) tumour probability map
    and over the whole patch; the MLP also reads the shared features.
    """

    def __init__(self, cfg: ModelConfig, shared_dim: int) -> None:
        super().__init__()
        c = cfg.stem_channels
        k, s = cfg.kernels, cfg.strides
        self.stem = nn.Sequential(
            conv_block(1, c, k[0], s[0]),
            conv_block(c, c, k[1], s[1]),
            conv_block(c, 2 * c, k[2], s[2]),
        )
        self.mlp = nn.Sequential(
            nn.Linear(4 * c + shared_dim, cfg.embed_dim),
            nn.LeakyReLU(0.01, inplace=False),
            nn.Linear(cfg.embed_dim, cfg.embed_dim),
        )

    def specific(self, x: torch.Tensor, tumour_prob: torch.Tensor) -> torch.Tensor:
        """Modality-specific features ``(B, 4 * stem_channels)``."""
        f = self.stem(x)
        p = F.adaptive_avg_pool3d(tumour_prob, f.shape[2:])
        inside = (f * p).sum(dim=(2, 3, 4)) / (p.sum(dim=(2, 3, 4)) + 1e-3)
        return torch.cat([inside, f.mean(dim=(2, 3, 4))], dim=1)

    def forward(
        self, x: torch.Tensor, tumour_prob: torch.Tensor, shared: torch.Tensor
    ) -> torch.Tensor:
        return self.mlp(torch.cat([self.specific(x, tumour_prob), shared], dim=1))


def expert_mlp(in_dim: int, hidden: int) -> nn.Sequential:
    if hidden == 0:  # a linear expert
        return nn.Sequential(nn.Linear(in_dim, 1))
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.LeakyReLU(0.01, inplace=False),
        nn.Linear(hidden, 1),
    )


def embedding_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, out_dim),
        nn.LeakyReLU(0.01, inplace=False),
        nn.Linear(out_dim, out_dim),
    )


def dealias_dynunet(net: DynUNet) -> nn.Module:
    """Make every DynUNet block reachable once; return the bottleneck module.

    ``forward`` only uses ``skip_layers``, ``output_block`` and the ``heads``
    list, so the attribute copies can go. The heads stay reachable through the
    skip layers (``super_head``).
    """
    bottleneck = net.bottleneck
    for name in (
        "input_block",
        "downsamples",
        "bottleneck",
        "upsamples",
        "deep_supervision_heads",
    ):
        net._modules.pop(name, None)
    return bottleneck
