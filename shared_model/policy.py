"""Treatment recommendations and an honest estimate of what following them is worth.

Three rules (documented for clinicians in the README); regimens are ordered by
intensity, nCT < nCRT < TNT, and the model gives each patient's pCR
probability under every regimen:

* ``switch`` (the default of a model with a posterior over its head,
  :mod:`shared_model.posterior`): every patient keeps the ``reference``
  regimen unless the posterior says another allowed regimen gives a higher
  pCR with probability at least ``q``; then the one with the highest such
  probability. It declines to advise rather than guess.
* ``margin``: the *least intensive* regimen whose predicted pCR is within
  ``margin`` (absolute, default :data:`DEFAULT_MARGIN`) of the best: a de-intensification
  trade-off, judged against the oracle with the same margin.
* ``argmax``: the highest predicted pCR (the study's rule).
* ``fixed``: the ``reference`` regimen for everyone (the comparison every
  other rule must beat).

Against the regimen the patient received, the advice is an escalation (more
intensive), maintenance (the same) or de-intensification.

What following the advice is worth is estimated in :mod:`shared_model.policy_value`
(with the share of the oracle's gain a policy gets), and shown with
:func:`shared_model.federated_metrics.format_share`; the experts' support a run
record holds is read by :func:`server.run_folder.expert_support`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared_model.clinical import REGIMEN_INTENSITY, REGIMENS
from shared_model.posterior import Posterior

DIRECTIONS = ("escalate", "maintain", "de-intensify")
ESTIMATORS = ("model_estimate", "ipw", "dr", "observed")


RULES = ("switch", "margin", "argmax", "fixed")
DEFAULT_MARGIN = 0.05
"""The ``margin`` rule's absolute pCR a less intensive regimen may give up (the
run config's ``recommendation-margin`` and every scorer take it from here)."""
DEFAULT_MIN_SUPPORT = 30
"""The patients an expert needs before the margin and argmax rules may name its
regimen (the run config's ``min-expert-support``)."""
GUIDELINE = "TNT"
"""The reference a ``switch`` rule keeps unless another fixed regimen is better
with confidence (the regimen the trials favour for high-risk rectal cancer)."""
DEFAULT_GAIN_THRESHOLD = 0.9
"""A ``switch`` rule's ``q`` when none is chosen."""
GAIN_THRESHOLDS = (0.8, DEFAULT_GAIN_THRESHOLD, 0.95)
"""The ``q`` a federation chooses among on its validation split."""


@dataclass(frozen=True)
class RecommendationRule:
    """The advice rule (see the module docstring); one object, decided at the
    end of training and carried by the checkpoint.

    Attributes:
        kind: ``switch``, ``margin`` or ``argmax``.
        margin: ``margin``: the absolute pCR a less intensive regimen may give up.
        allowed: the regimens advice may name (experts with enough support).
        reference: ``switch``: the regimen kept unless a switch is confident.
        q: ``switch``: the posterior probability of a gain a switch needs.
        posterior: ``switch``: the posterior over the linear head.
    """

    kind: str = "margin"
    margin: float = DEFAULT_MARGIN
    allowed: tuple[str, ...] = REGIMENS
    reference: str = GUIDELINE
    q: float = DEFAULT_GAIN_THRESHOLD
    posterior: Posterior | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in RULES:
            raise ValueError(f"the advice rule is one of {RULES}, not {self.kind!r}")
        if not 0 <= self.margin < 1:
            raise ValueError("the recommendation margin must be in [0, 1)")
        if any(r not in REGIMENS for r in self.allowed):
            raise ValueError(f"allowed regimens must be among {REGIMENS}")
        if self.reference not in REGIMENS:
            raise ValueError(f"the reference regimen must be one of {REGIMENS}")
        if not 0.5 <= self.q <= 1:
            raise ValueError("the switch threshold q must be in [0.5, 1]")
        if self.kind == "switch" and self.posterior is None:
            raise ValueError("a switch rule needs the posterior over the head")
        if (
            self.kind == "switch"
            and self.allowed
            and self.reference not in self.allowed
        ):
            raise ValueError(
                f"the reference {self.reference} is not among the allowed regimens"
            )

    @property
    def withheld(self) -> bool:
        """No regimen may be advised: each patient's received regimen stands."""
        return not self.allowed

    def to_dict(self) -> dict[str, Any]:
        """What the checkpoint's config.json keeps (the posterior apart): every
        field, so a saved rule never depends on today's defaults."""
        return {
            "kind": self.kind,
            "allowed": list(self.allowed),
            "margin": self.margin,
            "reference": self.reference,
            "q": self.q,
        }

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any], posterior: Posterior | None = None
    ) -> RecommendationRule:
        """Read a rule written by :meth:`to_dict`; ValueError names what is wrong."""
        known = {"kind", "allowed", "margin", "reference", "q"}
        if not isinstance(raw, Mapping) or set(raw) - known:
            raise ValueError(f"an advice rule has the keys {sorted(known)}")
        return cls(
            kind=str(raw.get("kind", "margin")),
            margin=float(raw.get("margin", DEFAULT_MARGIN)),
            allowed=tuple(str(r) for r in raw.get("allowed", REGIMENS)),
            reference=str(raw.get("reference", GUIDELINE)),
            q=float(raw.get("q", DEFAULT_GAIN_THRESHOLD)),
            posterior=posterior,
        )

    def describe(self) -> str:
        """The rule in words, for logs and reports."""
        allowed = ", ".join(self.allowed) or "none"
        if self.kind == "switch":
            return (
                f"keep {self.reference} unless another regimen ({allowed}) gives a "
                f"higher pCR with posterior probability >= {self.q:g}"
            )
        if self.kind == "margin":
            return (
                f"the least intensive regimen ({allowed}) within {self.margin:g} of "
                "the best predicted pCR"
            )
        if self.kind == "fixed":
            return f"{self.reference} for every patient"
        return f"the regimen ({allowed}) with the highest predicted pCR"


def supported_regimens(
    support: Mapping[str, int] | None, min_support: int
) -> tuple[tuple[str, ...], dict[str, str]]:
    """The regimens whose expert may be recommended, and why the others not.

    ``support``: per regimen, the patients that trained its expert (summed over
    sites; None when unknown, e.g. an older checkpoint: every regimen is
    allowed). An expert below ``min_support`` patients is never recommended;
    when none has the support, the allowed set is empty and advice is withheld
    (:attr:`RecommendationRule.withheld`).
    """
    if support is None:
        return REGIMENS, {}
    reasons = {
        r: f"its expert was trained on {int(support.get(r, 0))} patients, fewer than "
        f"the {min_support} required (min-expert-support)"
        for r in REGIMENS
        if int(support.get(r, 0)) < min_support
    }
    return tuple(r for r in REGIMENS if r not in reasons), reasons


def what_if_rule(text: str, base: RecommendationRule) -> RecommendationRule:
    """A rule for a what-if from ``text`` (the checkpoint's own rule ``base``
    keeps its allowed regimens and posterior): ``margin[:M]``, ``argmax``,
    ``fixed:REGIMEN`` or ``switch[:Q]`` (the reference kept). ValueError says
    what is wrong."""
    kind, _, arg = text.partition(":")
    allowed, posterior = base.allowed, base.posterior
    if kind == "margin":
        margin = float(arg) if arg else DEFAULT_MARGIN
        return RecommendationRule(kind="margin", margin=margin, allowed=allowed)
    if kind == "argmax":
        return RecommendationRule(kind="argmax", allowed=allowed)
    if kind == "fixed":
        return RecommendationRule(
            kind="fixed", reference=arg or GUIDELINE, allowed=allowed
        )
    if kind == "switch":
        return RecommendationRule(
            kind="switch",
            reference=base.reference,
            q=float(arg) if arg else base.q,
            allowed=allowed,
            posterior=posterior,
        )
    raise ValueError(
        f"what-if rule {text!r}: use margin[:M], argmax, fixed:REGIMEN or switch[:Q]"
    )


def gain_probabilities(rule: RecommendationRule, design: Any) -> np.ndarray:
    """``(n, 3)``: each regimen's posterior probability of a higher pCR than
    the rule's reference (a ``switch`` rule; ``design``: the patients' head
    input, :attr:`shared_model.model.ModelOutput.head_input`)."""
    if rule.posterior is None or design is None:
        raise ValueError("a switch rule needs the posterior and the patients' design")
    return rule.posterior.gain_probability(
        np.asarray(design, np.float64), REGIMENS.index(rule.reference)
    )


def recommend(
    probs: np.ndarray,
    rule: RecommendationRule | None = None,
    received: Sequence[int] | np.ndarray | None = None,
    design: Any = None,
) -> np.ndarray:
    """Recommended regimen index per patient from ``probs`` (n, 3) (and, for a
    ``switch`` rule, the patients' ``design``); when the rule withholds advice,
    each patient's ``received`` regimen (required then)."""
    rule = rule or RecommendationRule()
    if rule.withheld:
        if received is None:
            raise ValueError("advice is withheld: the received regimens are needed")
        return np.asarray(received, int).copy()
    p = np.asarray(probs, np.float64)
    allowed = np.array([r in rule.allowed for r in REGIMENS])
    if rule.kind == "switch":
        return _switch(gain_probabilities(rule, design), rule, allowed)
    if rule.kind == "fixed":
        return np.full(len(p), REGIMENS.index(rule.reference), dtype=int)
    masked = np.where(allowed[None, :], p, -np.inf)
    best = masked.max(axis=1, keepdims=True)
    margin = rule.margin if rule.kind == "margin" else 0.0
    ok = masked >= best - margin - 1e-12
    by_intensity = sorted(
        range(len(REGIMENS)), key=lambda j: REGIMEN_INTENSITY[REGIMENS[j]]
    )
    out = np.full(len(p), -1, dtype=int)
    for j in reversed(by_intensity):  # the least intensive qualifying one wins
        out = np.where(ok[:, j], j, out)
    return out


def _switch(
    gain: np.ndarray, rule: RecommendationRule, allowed: np.ndarray
) -> np.ndarray:
    """The reference, or the allowed regimen with the highest probability of a
    gain over it where that probability reaches ``q``."""
    ref = REGIMENS.index(rule.reference)
    candidate = np.where(allowed[None, :], gain, -np.inf)
    candidate[:, ref] = -np.inf
    best = candidate.argmax(axis=1)
    confident = candidate[np.arange(len(gain)), best] >= rule.q
    return np.where(confident, best, ref).astype(int)


def direction(recommended: int, received: int) -> str:
    """escalate / maintain / de-intensify, by regimen intensity."""
    a, b = (
        REGIMEN_INTENSITY[REGIMENS[recommended]],
        REGIMEN_INTENSITY[REGIMENS[received]],
    )
    return DIRECTIONS[0] if a > b else DIRECTIONS[1] if a == b else DIRECTIONS[2]
