"""Planning a site's DP round against its budget.

A site whose YAML has a ``privacy`` section trains every round with DP-SGD
(opacus, :mod:`client.privacy.dp_sgd`). Before each round it works out the
round's shape (:class:`RoundShape`: patients, Poisson sampling rate, steps,
rounds still planned; the one place the sampling rate is computed) and plans
it against what its ledger (:mod:`client.privacy.ledger`) has spent:

* federation key ``dp-noise-multiplier`` > 0: that noise; the site declines
  when one more round would take it past ``target_epsilon``;
* ``dp-noise-multiplier`` = 0 (default): the smallest noise with which the
  rounds still planned (this one to the last) fit in what is left of the
  budget; the site declines when even the largest noise (:data:`MAX_NOISE`,
  :data:`HEAD_MAX_NOISE` for head rounds) would not fit.

Epsilon is always computed by an opacus accountant (RDP by default,
:func:`shared_model.accounting.epsilon_of`) over the whole ledger, so the
figure a site reports is its total spend on this data, across rounds, resumes
and runs that used the same ``run_dir``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from client.data.privacy_config import PrivacyConfig
from shared_model.accounting import ACCOUNTANTS, Mechanism, epsilon_of
from shared_model.errors import ConfigError
from shared_model.federation_config import FederationConfig
from shared_model.messages import PrivacyAccount

MAX_NOISE = 10.0
"""Largest noise multiplier a site derives for itself. Beyond it a round is
mostly noise (at 4 patients per step, noise of 2.5 clip norms per coordinate
on the mean gradient), so the site declines instead of sending it."""

HEAD_MAX_NOISE = 50.0
"""Largest noise multiplier for DP head rounds: their Poisson batches hold a
large share of the site (half by default), so the noise on the mean gradient
is this over the expected batch, per coordinate."""


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


@dataclass(frozen=True)
class RoundShape:
    """A DP round before the budget is asked: what it would train on and how.

    Attributes:
        n_patients: training patients (the privacy unit).
        sample_rate: Poisson rate, each patient's chance to join a step.
        steps: local steps this round.
        rounds_left: rounds still planned, this one included (derived noise).
        noise_multiplier: fixed noise, or 0 to derive it from the budget.
        max_noise: the largest noise multiplier the site derives for itself.
        stage: the federation's stage ("joint", "heads"; written in the ledger).
    """

    n_patients: int
    sample_rate: float
    steps: int
    rounds_left: int
    noise_multiplier: float = 0.0
    max_noise: float = MAX_NOISE
    stage: str = "joint"

    @classmethod
    def of(
        cls, fed: FederationConfig, n_patients: int, server_round: int
    ) -> RoundShape:
        """Round ``server_round`` of federation ``fed`` at a site with
        ``n_patients`` training patients: a head round (staged training) on
        Poisson batches of ``dp-head-sample-rate``, else a round of the whole
        network at ``batch-size`` patients per step. The one place a site's
        sampling rate, steps and rounds left are worked out."""
        n = max(n_patients, 1)
        rounds_left = fed.total_rounds - server_round + 1
        stage = fed.stage_of(server_round)
        if stage == "heads":
            return cls(
                n,
                fed.dp_head_sample_rate,
                fed.dp_head_steps,
                rounds_left,
                fed.dp_noise_multiplier,
                HEAD_MAX_NOISE,
                "heads",
            )
        return cls(
            n,
            sample_rate_for(fed.batch_size, n),
            fed.local_steps_for(n_patients),
            rounds_left,
            fed.dp_noise_multiplier,
            stage=stage,
        )


def check_delta(privacy: PrivacyConfig, n_patients: int, where: str) -> None:
    """A delta of 1/N or more permits releasing a whole patient; refuse it."""
    if privacy.delta >= 1.0 / n_patients:
        raise ConfigError(
            f"{where}: privacy.delta = {privacy.delta:g} is not below 1/N = "
            f"1/{n_patients} (N = training patients at this site); set "
            f"privacy.delta well below {1.0 / n_patients:.2g} (1e-5 is usual)"
        )


def plan_round(
    privacy: PrivacyConfig,
    history: Sequence[Mechanism],
    shape: RoundShape,
    accountant: str = "rdp",
) -> RoundPlan:
    """Plan one round's DP-SGD against the site's remaining budget.

    Args:
        privacy: the site's budget (target epsilon, delta, clip norm).
        history: what the site has spent so far (its ledger's history).
        shape: the round (patients, rate, steps, rounds left, noise).
        accountant: opacus accountant, "rdp" or "prv".
    """
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"run config `dp-accountant` must be one of {ACCOUNTANTS}")
    q, steps, sigma = shape.sample_rate, shape.steps, shape.noise_multiplier
    target, delta = privacy.target_epsilon, privacy.delta
    spent = epsilon_of(history, delta, accountant)

    def eps_with(noise: float, n_steps: int) -> float:
        return epsilon_of([*history, (noise, q, n_steps)], delta, accountant)

    def round_at(noise: float, after: float | None = None) -> RoundPlan:
        dp = DPRound(noise, privacy.max_grad_norm, q, steps, shape.n_patients)
        return RoundPlan(dp, spent, eps_with(noise, steps) if after is None else after)

    def declined(why: str) -> RoundPlan:
        budget = f"epsilon {spent:.3f} of {target:g} spent (delta {delta:g})"
        return RoundPlan(None, spent, spent, f"privacy budget: {budget}; {why}")

    if sigma > 0:
        after = eps_with(sigma, steps)
        if after > target:
            return declined(
                f"a round of {steps} steps at noise {sigma:g} would reach {after:.3f}"
            )
        return round_at(sigma, after)
    rounds = max(shape.rounds_left, 1)
    noise = _smallest_noise(
        lambda s: eps_with(s, steps * rounds) <= target,
        shape.max_noise,
        last=history[-1][0] if history and history[-1][1] == q else None,
    )
    if noise is None:
        return declined(
            f"the {rounds} planned round(s) do not fit even at noise "
            f"{shape.max_noise:g}"
        )
    return round_at(noise)


def _smallest_noise(
    fits: Callable[[float], bool], max_noise: float, last: float | None
) -> float | None:
    """The smallest noise (to 0.1 %) that ``fits``, or None when even
    ``max_noise`` does not. ``last``: the previous round's noise at the same
    rate, usually still the smallest that fits: kept when 0.1 % less would not
    fit (the search's tolerance)."""
    if not fits(max_noise):
        return None
    lo, hi = 0.0, max_noise  # fits(hi) always holds
    if last is not None and last <= max_noise and fits(last):
        if not fits(last * (1 - 1e-3)):
            return last
        hi = last
    while hi - lo > 1e-3 * hi:
        mid = 0.5 * (lo + hi)
        if mid > 0 and fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


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
