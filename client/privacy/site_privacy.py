"""The one owner of a site's differential privacy.

:class:`SitePrivacy` is what the rest of the site asks about privacy: the
spend so far, a DP round planned against the budget and recorded in the ledger
before it trains (:meth:`SitePrivacy.open_round`), the same plan without
recording it (:meth:`SitePrivacy.preview`, for ``moefl check``), a one-off
Gaussian release charged to the ledger (:meth:`SitePrivacy.charge_release`,
the dataset fingerprint), and the opacus settings both DP loops train with
(:meth:`SitePrivacy.private_round`, carrying ``privacy.secure_mode``).

It measures every spend with one accountant (the federation's
``dp-accountant``, :func:`shared_model.accounting.epsilon_of`) and writes that
accountant's name in each ledger entry.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import torch

from client.data.privacy_config import PrivacyConfig
from client.data.site_config import SiteConfig
from client.privacy.dp_sgd import PrivateRound, dp_generator
from client.privacy.ledger import PrivacyLedger
from client.privacy.rounds import DPRound, RoundPlan, RoundShape, describe, plan_round
from shared_model.accounting import ACCOUNTANTS, epsilon_of, release_noise
from shared_model.errors import ConfigError
from shared_model.federation_config import FederationConfig
from shared_model.messages import PrivacyAccount

log = logging.getLogger(__name__)


class SitePrivacy:
    """A site's budget (its YAML's ``privacy`` section), its ledger under
    ``run_dir`` and the accountant that measures what it spends."""

    def __init__(
        self,
        privacy: PrivacyConfig,
        run_dir: Path,
        accountant: str = "rdp",
        *,
        site_name: str = "site",
    ) -> None:
        if accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"run config `dp-accountant` must be one of {ACCOUNTANTS}"
            )
        self.budget = privacy
        self.run_dir = Path(run_dir)
        self.accountant = accountant
        self.site_name = site_name

    @classmethod
    def of(cls, config: SiteConfig, accountant: str = "rdp") -> SitePrivacy | None:
        """The privacy of the site ``config`` describes; None without a
        ``privacy`` section (the site trains without DP)."""
        if config.privacy is None:
            return None
        return cls(
            config.privacy, config.run_dir, accountant, site_name=config.site_name
        )

    def ledger(self) -> PrivacyLedger:
        """The site's ledger as it is on the disk now (read, not locked)."""
        return PrivacyLedger.for_site(self.run_dir)

    def spent(self) -> float:
        """Epsilon spent so far on this site's data."""
        return self.ledger().epsilon(self.budget.delta, self.accountant)

    def preview(self, shape: RoundShape) -> RoundPlan:
        """The plan of a round like ``shape`` against the spend so far, not
        recorded (nothing is spent)."""
        return plan_round(self.budget, self.ledger().history, shape, self.accountant)

    def open_round(
        self, shape: RoundShape, *, server_round: int, run: str
    ) -> RoundPlan:
        """Plan round ``server_round`` of the federation whose run folder is
        ``run`` against the budget and, when it trains, record it in the
        ledger before any training: a crash can only over-count. Planned and
        recorded under the ledger's lock."""
        with PrivacyLedger.locked(self.run_dir) as ledger:
            plan = plan_round(self.budget, ledger.history, shape, self.accountant)
            if plan.dp is not None:
                ledger.record(
                    plan.dp,
                    accountant=self.accountant,
                    stage=shape.stage,
                    round=server_round,
                    run=run,
                    epsilon_after=plan.epsilon_after,
                )
        if plan.dp is None:
            log.warning(
                "site %s declines round %d: %s",
                self.site_name,
                server_round,
                plan.declined,
            )
        return plan

    def charge_release(
        self, noise: float, sensitivity: float, n_cases: int, kind: str
    ) -> PrivacyAccount:
        """Charge one Gaussian release of the whole data (sampling rate 1, one
        step) at ``noise`` to the ledger, before it leaves; ConfigError when it
        would take the spend past the target."""
        target, delta = self.budget.target_epsilon, self.budget.delta
        with PrivacyLedger.locked(self.run_dir) as ledger:
            spent = ledger.epsilon(delta, self.accountant)
            after = epsilon_of(
                [*ledger.history, (noise, 1.0, 1)], delta, self.accountant
            )
            if after > target:
                raise ConfigError(
                    f"{self.site_name}: the {kind}'s release would take the privacy "
                    f"budget from epsilon {spent:.3f} to {after:.3f}, past {target:g}"
                )
            release = DPRound(noise, sensitivity, 1.0, 1, n_cases)
            ledger.record(release, accountant=self.accountant, kind=kind)
        return PrivacyAccount(
            epsilon=after, target_epsilon=target, delta=delta, noise_multiplier=noise
        )

    def private_round(
        self, dp: DPRound, *, device: torch.device | str, seed: int | None = None
    ) -> PrivateRound:
        """The opacus settings of a planned round for either DP loop: its noise
        drawn on ``device`` (secret; ``seed`` only in simulation) and the
        site's ``privacy.secure_mode``."""
        return PrivateRound(
            dp, dp_generator(seed, device), secure_mode=self.budget.secure_mode
        )

    def describe(self, plan: RoundPlan) -> PrivacyAccount:
        """The round's accounting for the reply (epsilon cumulative, after it)."""
        return describe(plan, self.budget)


def release_seed(fed: FederationConfig, site: str, *more: int) -> list[int] | None:
    """The seed of a site's noise for a release (``more``: the round, a kind):
    from the run's seed and the site's name under ``dp-reproducible``
    (simulation only), else None (the operating system's entropy)."""
    if not fed.dp_reproducible:
        return None
    return [fed.seed, zlib.crc32(site.encode()), *more]


def noise_for(epsilon: float, delta: float, accountant: str, key: str) -> float:
    """The smallest noise multiplier whose one Gaussian release costs at most
    ``epsilon`` at ``delta``; ConfigError naming the YAML ``key`` when none does."""
    noise = release_noise(epsilon, delta, accountant)
    if noise is None:
        raise ConfigError(f"{key} {epsilon:g} is too small")
    return noise
