"""The privacy accountant: epsilon of a history of Gaussian mechanisms.

One module for every DP figure in the house: a site's DP-SGD ledger
(:mod:`client.privacy`), its fingerprint's release and the server's
client-level DP all measure their spend here, with an opacus accountant
("rdp" or "prv"). No Flower, no torch training: plain numbers in, epsilon out.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import numpy as np

ACCOUNTANTS = ("rdp", "prv")
"""The opacus accountants a federation may choose (run config ``dp-accountant``)."""

Mechanism = tuple[float, float, int]
"""One entry of a history: ``(noise_multiplier, sample_rate, steps)``."""


def epsilon_of(
    history: Sequence[Mechanism], delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of a Gaussian-mechanism history ``[(noise, sample_rate, steps)]``
    by an opacus accountant ("rdp" or "prv"); 0 for an empty history. Used by
    the sites' DP-SGD ledger and by client-level DP at the server.

    RDP is additive over steps, so the RDP of one step is computed once per
    (noise, rate) pair and reused (it is the slow part at large sampling
    rates); the result is what opacus's ``RDPAccountant`` gives.
    """
    if not history:
        return 0.0
    if accountant == "rdp":
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum(
            int(n) * np.asarray(_rdp_of_one_step(float(s), float(q)))
            for s, q, n in history
        )
        eps, _ = get_privacy_spent(orders=_RDP_ORDERS, rdp=rdp, delta=delta)
        return float(eps)
    from opacus.accountants.utils import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def release_noise(
    epsilon: float,
    delta: float,
    accountant: str = "rdp",
    *,
    lo: float = 0.3,
    hi: float = 1000.0,
) -> float | None:
    """The smallest noise multiplier (to 0.1 %) whose one Gaussian release of
    the whole data (sampling rate 1, one step) costs at most ``epsilon`` at
    ``delta``; None when even ``hi`` costs more."""
    with warnings.catch_warnings():  # opacus's note on its order range
        warnings.simplefilter("ignore", UserWarning)
        if epsilon_of([(hi, 1.0, 1)], delta, accountant) > epsilon:
            return None
        while hi - lo > 1e-3 * hi:
            mid = 0.5 * (lo + hi)
            if epsilon_of([(mid, 1.0, 1)], delta, accountant) <= epsilon:
                hi = mid
            else:
                lo = mid
    return hi


_RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
"""opacus's ``RDPAccountant.DEFAULT_ALPHAS``."""


@functools.lru_cache(maxsize=4096)
def _rdp_of_one_step(noise: float, sample_rate: float) -> tuple[float, ...]:
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(
        compute_rdp(
            q=sample_rate, noise_multiplier=noise, steps=1, orders=_RDP_ORDERS
        ).tolist()
    )
