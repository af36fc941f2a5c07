"""Will DP training learn at this site? The feasibility part of ``moefl check``.

For a site with a ``privacy`` section, its training patient count, what its
ledger has already spent and the federation's planned rounds (run config),
this works out the noise multiplier the site would use and the expected
noise-to-signal ratio of what it trains privately:

* per step: the Gaussian noise on the mean clipped gradient has norm about
  ``sigma * C * sqrt(d) / B`` (``d`` trained parameters, expected batch ``B``)
  against a signal of at most ``C``;
* over the run: the noise of all ``T`` steps adds up as ``sqrt(T)``, the
  signal as ``T``, so the ratio is the per-step one over ``sqrt(T)``. Above
  :data:`CANNOT_LEARN` training did not learn in our measurements.

It also says plainly what the site releases that is not covered by DP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from client.data.site_config import SiteConfig
from client.privacy.rounds import RoundShape
from client.privacy.site_privacy import SitePrivacy
from shared_model.errors import ConfigError
from shared_model.federation_config import FederationConfig
from shared_model.model import build_model
from shared_model.model_config import model_config_for
from shared_model.parameter_groups import is_head_parameter
from shared_model.plan import Plan

CANNOT_LEARN = 0.3
"""Whole-run noise-to-signal above which the site warns that training cannot
learn. Measured on the demo cohort at epsilon 8: the linear head (196
parameters, ratio about 0.2) learnt (validation AUC 0.72 against 0.78 without
DP); the MLP head (3,904 parameters, about 0.7) and the whole network (over 100)
did not (0.53 and 0.44)."""


@dataclass(frozen=True)
class Feasibility:
    """The DP training a site would do in a federation, and how noisy it is."""

    mode: str  # "heads" | "joint" | "refused"
    n_patients: int
    trained_parameters: int
    sample_rate: float
    steps_per_round: int
    rounds: int
    noise_multiplier: float | None  # None: the budget does not allow the rounds
    epsilon_spent: float
    noise_to_signal_step: float | None
    noise_to_signal_run: float | None
    reason: str = ""

    @property
    def cannot_learn(self) -> bool:
        return self.noise_to_signal_run is not None and (
            self.noise_to_signal_run > CANNOT_LEARN
        )

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["cannot_learn"] = self.cannot_learn
        return out


def _trained_parameters(fed: FederationConfig, heads: bool) -> int:
    model = build_model(model_config_for(fed, Plan()))
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if not heads or is_head_parameter(name)
    )


def dp_feasibility(
    config: SiteConfig, n_patients: int, fed: FederationConfig
) -> Feasibility:
    """The DP plan of ``config``'s site for federation ``fed`` (see the module)."""
    privacy = config.privacy
    if privacy is None:
        raise ConfigError(f"{config.path}: the site has no `privacy` section")
    if fed.training == "staged" and not fed.backbone:
        return Feasibility(
            "refused", n_patients, 0, 0.0, 0, 0, None, 0.0, None, None,
            "a staged federation without a pretrained public backbone (run config "
            "`backbone`): the site refuses it",
        )  # fmt: skip
    if fed.fits_posterior:
        return Feasibility(
            "refused", n_patients, 0, 0.0, 0, 0, None, 0.0, None, None,
            "the heads' Newton fit (run config `head-fit = newton`) asks for exact "
            "gradient and Hessian sums, which no DP budget covers: the site refuses "
            "it; its federation runs head-fit = rounds (DP-SGD head rounds) and "
            "advice-rule = margin (no posterior)",
        )  # fmt: skip
    heads = fed.training == "staged"
    # the first round it trains in (a staged federation over a public backbone
    # has no segmentation rounds): what the budget must allow from now on
    shape = RoundShape.of(fed, n_patients, fed.segmentation_rounds + 1)
    q, steps, rounds = shape.sample_rate, shape.steps, shape.rounds_left
    d = _trained_parameters(fed, heads)
    plan = SitePrivacy(privacy, config.run_dir, fed.dp_accountant).preview(shape)
    mode = "heads" if heads else "joint"
    if plan.dp is None:
        return Feasibility(
            mode, n_patients, d, q, steps, rounds, None, plan.epsilon_spent,
            None, None, plan.declined,
        )  # fmt: skip
    sigma = plan.dp.noise_multiplier
    step = sigma * math.sqrt(d) / max(q * n_patients, 1e-9)
    return Feasibility(
        mode, n_patients, d, q, steps, rounds, sigma, plan.epsilon_spent,
        step, step / math.sqrt(steps * rounds),
    )  # fmt: skip


def describe_feasibility(f: Feasibility, config: SiteConfig) -> list[str]:
    """Lines for ``moefl check``: the plan, its noise and what is not DP."""
    privacy = config.privacy
    assert privacy is not None
    lines = [
        f"differential privacy: target epsilon {privacy.target_epsilon:g}, delta "
        f"{privacy.delta:g}, clip {privacy.max_grad_norm:g}; "
        f"epsilon already spent {f.epsilon_spent:.3f}"
    ]
    if f.mode == "refused":
        lines.append(f"  this federation: {f.reason}")
    elif f.noise_multiplier is None:
        lines.append(f"  this federation: the site would decline: {f.reason}")
    else:
        what = (
            "the pCR heads over a public backbone"
            if f.mode == "heads"
            else ("the whole network (joint)")
        )
        lines.append(
            f"  trains {what}: {f.trained_parameters} parameters, {f.n_patients} "
            f"patients, sampling rate {f.sample_rate:.3g}, {f.steps_per_round} steps "
            f"x {f.rounds} rounds, noise multiplier {f.noise_multiplier:.3g}"
        )
        lines.append(
            f"  expected noise-to-signal: {f.noise_to_signal_step:.3g} per step, "
            f"{f.noise_to_signal_run:.3g} over the run"
            + ("  -> training cannot learn" if f.cannot_learn else "")
        )
    lines.append(
        "  not covered by DP: the patient counts per regimen sent with each round"
        + {
            "exact": "; validation counts (sent WITHOUT DP: privacy.release_evaluation "
            "is true)",
            "withhold": "; validation counts are withheld (privacy.release_evaluation)",
            "dp": "",
        }[privacy.release_evaluation]
    )
    if privacy.release_evaluation == "dp":
        lines.append(
            "  validation counts: released under DP at epsilon "
            f"{privacy.evaluation_epsilon:g} per evaluation round, charged to the "
            "budget (score histograms and Dice only)"
        )
    return lines
