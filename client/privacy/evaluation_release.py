"""A DP site's validation counts through the Gaussian mechanism
(``privacy.release_evaluation: dp``).

Each evaluation round is one release of the site's validation split at the
YAML's ``privacy.evaluation_epsilon`` (a noise multiplier found by bisection
for one Gaussian release at the site's delta), charged to the site's ledger
before anything leaves (:meth:`SitePrivacy.charge_release`): a release past the
budget is refused with ConfigError. What is released, and its sensitivity to
one patient, is :mod:`shared_model.noised_counts`'s.
"""

from __future__ import annotations

import secrets

import numpy as np

from client.privacy.site_privacy import SitePrivacy, noise_for
from shared_model.errors import ConfigError
from shared_model.messages import PrivacyAccount
from shared_model.noised_counts import RELEASE_SENSITIVITY
from shared_model.site_evaluation import SiteEvaluation


def evaluation_noise(epsilon: float, delta: float, accountant: str = "rdp") -> float:
    """The noise multiplier of one release at ``epsilon`` (``privacy.evaluation_epsilon``)."""
    return noise_for(epsilon, delta, accountant, "privacy.evaluation_epsilon")


def released_evaluation(
    evaluation: SiteEvaluation,
    privacy: SitePrivacy,
    *,
    n_cases: int,
    seed: list[int] | None = None,
) -> tuple[SiteEvaluation, PrivacyAccount]:
    """The noised evaluation a DP site sends, charged to its ledger first.

    Args:
        evaluation: the exact counts and sums of the validation split.
        privacy: the site's privacy; its YAML sets ``release_evaluation: dp``.
        n_cases: the validation patients (recorded in the ledger).
        seed: seeds the noise (simulation's ``dp-reproducible`` only); None
            draws it from the operating system.

    Returns:
        The released evaluation and the site's accounting after it.

    Raises:
        ConfigError: the release would take the spend past the site's target
            epsilon (nothing is sent then), or its epsilon is too small.
    """
    budget = privacy.budget
    if budget.release_evaluation != "dp" or budget.evaluation_epsilon is None:
        raise ConfigError(
            f"{privacy.site_name}: `privacy.release_evaluation` is not dp"
        )
    z = evaluation_noise(budget.evaluation_epsilon, budget.delta, privacy.accountant)
    account = privacy.charge_release(z, RELEASE_SENSITIVITY, n_cases, "evaluation")
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    noised = evaluation.noised(z * RELEASE_SENSITIVITY, budget.evaluation_epsilon, rng)
    return noised, account
