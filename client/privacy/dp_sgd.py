"""opacus around a training loop: the DP-SGD of both of a site's DP loops.

Joint rounds (:func:`client.training.engine.train_local`) and head rounds
(:func:`client.training.heads.train_heads_private`) take one
:class:`PrivateRound` (the round's settings, the noise's randomness and the
site's ``privacy.secure_mode``) and wrap their model and optimiser with
:meth:`PrivateRound.wrap`; neither builds opacus's objects itself, so no
setting can reach one loop and miss the other. A site gets its
:class:`PrivateRound` from :meth:`client.privacy.site_privacy.SitePrivacy.private_round`.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from client.privacy.rounds import DPRound

# opacus's hooks fire on module outputs; the image needs no gradient. Harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def dp_generator(
    seed: int | None, device: torch.device | str = "cpu"
) -> torch.Generator:
    """Randomness for DP noise (and, derived from it, Poisson sampling).

    ``None`` (a real site): seeded from the operating system's entropy, so no
    one who knows the run's seed can predict (and subtract) the noise or know
    which patients were sampled. An integer: reproducible, for simulation only.
    The generator lives on ``device``, the device the model trains on: opacus
    draws the noise there with it.
    """
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(secrets.randbits(63) if seed is None else seed)
    return g


def sampling_generator(noise: torch.Generator) -> torch.Generator:
    """A CPU generator for Poisson sampling, seeded by a draw from the noise
    generator (as secret, or as reproducible, as the noise itself)."""
    seed = int(
        torch.randint(0, 2**62, (1,), generator=noise, device=noise.device).item()
    )
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class PrivateRound:
    """Everything a DP loop needs from the site's privacy, in one value.

    Attributes:
        dp: the round's DP-SGD settings (planned against the budget).
        generator: randomness of the noise, on the training device
            (:func:`dp_generator`); the Poisson sampling derives from it.
        secure_mode: opacus's noise that resists floating-point attacks (site
            YAML ``privacy.secure_mode``, for deployment).
    """

    dp: DPRound
    generator: torch.Generator
    secure_mode: bool

    def wrap(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> PrivateTraining:
        """opacus around ``model`` and ``optimizer`` for this round."""
        return PrivateTraining(model, optimizer, self)


class PrivateTraining:
    """opacus around a model and optimiser for one round of DP-SGD.

    Per-sample gradients in functorch mode (the model is free of aliased
    modules and in-place activations; tests check both), clipping and noise by
    :class:`opacus.optimizers.DPOptimizer` over the *trainable* parameters
    only (frozen experts get neither gradient nor noise), Poisson batches from
    :class:`opacus.utils.uniform_sampler.UniformWithReplacementSampler`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        private: PrivateRound,
    ) -> None:
        dp = private.dp
        self.dp = dp
        self.generator = private.generator
        self.sampling = sampling_generator(private.generator)
        self.module = GradSampleModule(
            model, batch_first=True, loss_reduction="mean", force_functorch=True
        )
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=dp.expected_batch_size,  # type: ignore[arg-type]
            loss_reduction="mean",
            generator=private.generator,
            secure_mode=private.secure_mode,
        )

    def batch_sampler(self, n_samples: int) -> UniformWithReplacementSampler:
        if n_samples != self.dp.n_patients:
            raise ValueError(
                f"dataset has {n_samples} patients, the DP plan {self.dp.n_patients}"
            )
        return UniformWithReplacementSampler(
            num_samples=n_samples,
            sample_rate=self.dp.sample_rate,
            generator=self.sampling,
            steps=self.dp.steps,
        )

    def add_data_free_loss(
        self, loss: Callable[[], torch.Tensor], params: list[torch.nn.Parameter]
    ) -> None:
        """Add the gradient of a loss that depends on no patient (FedProx's
        proximal term) after clipping and noise, at every step."""

        def add_gradient(opt: Any) -> None:
            with torch.enable_grad():
                grads = torch.autograd.grad(loss(), params)
            for p, g in zip(params, grads, strict=True):
                p.grad = g if p.grad is None else p.grad + g

        self.optimizer.attach_step_hook(add_gradient)

    def empty_step(self) -> None:
        """A step on an empty Poisson batch: noise only (the model cannot run on
        zero samples; InstanceNorm fails), still counted by the accountant."""
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype, device=p.device)
        self.optimizer.step()

    def close(self) -> None:
        """Remove opacus's hooks; the model is a plain module again."""
        self.module._close()
