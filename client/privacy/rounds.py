"""Sample-level differential privacy at a site: DP-SGD and a persistent budget.

A site whose YAML has a ``privacy`` section trains every round with DP-SGD
(opacus, functorch per-sample gradients, one crop per patient, Poisson
sampling of patients, per-patient clipping at ``max_grad_norm``, Gaussian
noise). What it has spent is kept in a ledger on the site's own disk
(``<run_dir>/privacy/ledger.json``), one entry per round it trained, written
*before* training starts, so a crash or a resumed federation can only
over-count, never under-count. The server never holds it.

Before each round the site plans the round against its budget:

* federation key ``dp-noise-multiplier`` > 0: that noise; the site declines
  when one more round would take it past ``target_epsilon``;
* ``dp-noise-multiplier`` = 0 (default): the smallest noise with which the
  rounds still planned (this one to ``num-server-rounds``) fit in what is
  left of the budget; the site declines when even the largest noise
  (:data:`MAX_NOISE`) would not fit.

Epsilon is always computed by an opacus accountant (RDP by default) over the
whole ledger, so the figure a site reports is its total spend on this data,
across rounds, resumes and runs that used the same ``run_dir``.
"""

from __future__ import annotations

import json
import secrets
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from client.data.privacy_config import PrivacyConfig
from shared_model.accounting import epsilon_of
from shared_model.checkpoint import write_atomic
from shared_model.errors import ConfigError, DataError
from shared_model.messages import PrivacyAccount

ACCOUNTANTS = ("rdp", "prv")
MAX_NOISE = 10.0
"""Largest noise multiplier a site derives for itself. Beyond it a round is
mostly noise (at 4 patients per step, noise of 2.5 clip norms per coordinate
on the mean gradient), so the site declines instead of sending it."""

HEAD_MAX_NOISE = 50.0
"""Largest noise multiplier for DP head rounds: their Poisson batches hold a
large share of the site (half by default), so the noise on the mean gradient
is this over the expected batch, per coordinate."""

LEDGER_VERSION = 1

# opacus's hooks fire on module outputs; the image needs no gradient. Harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass(frozen=True)
class DPRound:
    """The DP-SGD settings of one local round at one site."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    n_patients: int

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.n_patients


@dataclass(frozen=True)
class RoundPlan:
    """What the budget allows this round: ``dp`` to train, or a refusal."""

    dp: DPRound | None
    epsilon_spent: float  # before this round
    epsilon_after: float  # after this round (== spent when declined)
    declined: str = ""


def sample_rate_for(batch_size: int, n_patients: int) -> float:
    """Poisson sampling rate: each patient joins a step with this probability."""
    return min(1.0, batch_size / n_patients)


def check_delta(privacy: PrivacyConfig, n_patients: int, where: str) -> None:
    """A delta of 1/N or more permits releasing a whole patient; refuse it."""
    if privacy.delta >= 1.0 / n_patients:
        raise ConfigError(
            f"{where}: privacy.delta = {privacy.delta:g} is not below 1/N = "
            f"1/{n_patients} (N = training patients at this site); set "
            f"privacy.delta well below {1.0 / n_patients:.2g} (1e-5 is usual)"
        )


class PrivacyLedger:
    """The site's record of every DP round it ran (JSON, on the site's disk)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: list[dict[str, Any]] = []
        if self.path.is_file():
            self.entries = self._read()

    @classmethod
    def for_site(cls, run_dir: Path) -> PrivacyLedger:
        return cls(Path(run_dir) / "privacy" / "ledger.json")

    @classmethod
    @contextmanager
    def locked(cls, run_dir: Path) -> Iterator[PrivacyLedger]:
        """The site's ledger, read and held under an exclusive file lock.

        Plan and record a round inside it: two trainings at one site (two
        federations on the same ``run_dir``) then cannot both plan against
        the same spend and under-count it.
        """
        try:
            import fcntl
        except ImportError as e:  # not a POSIX system
            raise ConfigError(
                "DP training needs file locking for the privacy ledger (fcntl), "
                "which this operating system lacks; run the site on Linux or macOS"
            ) from e
        path = Path(run_dir) / "privacy" / "ledger.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield cls(path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> list[dict[str, Any]]:
        hint = (
            "restore it from a backup; deleting it would forget the privacy "
            "budget already spent on this site's patients"
        )
        try:
            raw = json.loads(self.path.read_text())
            entries = raw["entries"]
            for e in entries:
                if not (
                    float(e["noise_multiplier"]) > 0
                    and 0 < float(e["sample_rate"]) <= 1
                    and int(e["steps"]) >= 0
                ):
                    raise ValueError(f"bad entry {e}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"{self.path}: the privacy ledger is unreadable ({err}); {hint}"
            ) from err
        return list(entries)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [
            (float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
            for e in self.entries
        ]

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        return epsilon_of(self.history, delta, accountant)

    def record(self, dp: DPRound, **info: Any) -> None:
        """Append one round and make it durable before anything uses it.

        The new ledger is written to a temporary file, flushed to the disk,
        renamed over the old one and the folder is flushed too: a crash or a
        power cut at any point leaves either the old ledger or the new one,
        never a torn or empty file and never a lost entry once this returns.
        """
        entries = [*self.entries, {**asdict(dp), "time": time.time(), **info}]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"version": LEDGER_VERSION, "entries": entries}, indent=1)
        write_atomic(self.path, data.encode())
        self.entries = entries


def plan_round(
    privacy: PrivacyConfig,
    ledger: PrivacyLedger,
    *,
    n_patients: int,
    batch_size: int,
    steps: int,
    rounds_left: int,
    noise_multiplier: float = 0.0,
    accountant: str = "rdp",
    max_noise: float = MAX_NOISE,
    sample_rate: float | None = None,
) -> RoundPlan:
    """Plan one round's DP-SGD against the site's remaining budget.

    Args:
        privacy: the site's budget (target epsilon, delta, clip norm).
        ledger: what the site has spent so far.
        n_patients: training patients (the privacy unit).
        batch_size: expected patients per step.
        steps: local steps this round.
        rounds_left: rounds still planned, this one included (auto noise).
        noise_multiplier: fixed noise, or 0 to derive it from the budget.
        accountant: opacus accountant, "rdp" or "prv".
        sample_rate: Poisson rate, overriding ``batch_size / n_patients``.
        max_noise: the largest noise multiplier the site derives for itself
            (:data:`MAX_NOISE` for image training; head rounds, whose Poisson
            batches hold a large share of the site, allow more).
    """
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"run config `dp-accountant` must be one of {ACCOUNTANTS}")
    q = (
        sample_rate
        if sample_rate is not None
        else sample_rate_for(batch_size, n_patients)
    )
    history = ledger.history
    target, delta = privacy.target_epsilon, privacy.delta
    spent = epsilon_of(history, delta, accountant)

    def eps_with(sigma: float, n_steps: int) -> float:
        return epsilon_of([*history, (sigma, q, n_steps)], delta, accountant)

    def round_at(sigma: float) -> DPRound:
        return DPRound(sigma, privacy.max_grad_norm, q, steps, n_patients)

    if noise_multiplier > 0:
        after = eps_with(noise_multiplier, steps)
        if after > target:
            return RoundPlan(
                None,
                spent,
                spent,
                f"privacy budget: epsilon {spent:.3f} of {target:g} spent (delta "
                f"{delta:g}); a round of {steps} steps at noise {noise_multiplier:g} "
                f"would reach {after:.3f}",
            )
        return RoundPlan(round_at(noise_multiplier), spent, after)

    planned = steps * max(rounds_left, 1)
    if eps_with(max_noise, planned) > target:
        return RoundPlan(
            None,
            spent,
            spent,
            f"privacy budget: epsilon {spent:.3f} of {target:g} spent (delta "
            f"{delta:g}); the {max(rounds_left, 1)} planned round(s) do not fit even "
            f"at noise {max_noise:g}",
        )
    lo, hi = 0.0, max_noise  # eps(hi) <= target always holds
    if history and history[-1][1] == q:
        # The previous round's noise is usually still the smallest that fits:
        # keep it when 0.1 % less would not fit (the search's tolerance).
        last = history[-1][0]
        if last <= max_noise and eps_with(last, planned) <= target:
            if eps_with(last * (1 - 1e-3), planned) > target:
                return RoundPlan(round_at(last), spent, eps_with(last, steps))
            hi = last
    while hi - lo > 1e-3 * hi:
        mid = 0.5 * (lo + hi)
        if mid > 0 and eps_with(mid, planned) <= target:
            hi = mid
        else:
            lo = mid
    return RoundPlan(round_at(hi), spent, eps_with(hi, steps))


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


class PrivateTraining:
    """opacus around a model and optimiser for one round of DP-SGD.

    Per-sample gradients in functorch mode (the model is free of aliased
    modules and in-place activations; tests check both), clipping and noise by
    :class:`opacus.optimizers.DPOptimizer` over the *trainable* parameters
    only (frozen experts get neither gradient nor noise), Poisson batches from
    :class:`opacus.utils.uniform_sampler.UniformWithReplacementSampler`.
    ``generator`` draws the noise on the model's device; ``secure_mode`` is
    opacus's noise that resists floating-point attacks (site YAML
    ``privacy.secure_mode``, for deployment).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        dp: DPRound,
        *,
        generator: torch.Generator,
        secure_mode: bool = False,
    ) -> None:
        self.dp = dp
        self.generator = generator
        self.sampling = sampling_generator(generator)
        self.module = GradSampleModule(
            model, batch_first=True, loss_reduction="mean", force_functorch=True
        )
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=dp.expected_batch_size,  # type: ignore[arg-type]
            loss_reduction="mean",
            generator=generator,
            secure_mode=secure_mode,
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

    def empty_step(self) -> None:
        """A step on an empty Poisson batch: noise only (the model cannot run on
        zero samples; InstanceNorm fails), still counted by the accountant."""
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype, device=p.device)
        self.optimizer.step()

    def close(self) -> None:
        """Remove opacus's hooks; the model is a plain module again."""
        self.module._close()


def describe(plan: RoundPlan, privacy: PrivacyConfig) -> PrivacyAccount:
    """The DP accounting of a round for the reply (epsilon is cumulative, after
    the round)."""
    dp = plan.dp
    return PrivacyAccount(
        epsilon=plan.epsilon_after,
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        epsilon_before=plan.epsilon_spent,
        max_grad_norm=privacy.max_grad_norm,
        noise_multiplier=None if dp is None else dp.noise_multiplier,
        sample_rate=None if dp is None else dp.sample_rate,
        steps=None if dp is None else dp.steps,
    )
