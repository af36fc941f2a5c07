"""What a site and the server exchange: the one place that names the keys of
every message and the parameter groups.

A round's request (:class:`RoundRequest`) carries the federation's run config,
plan and model config, the round, the declared backbone's digest and, for
evaluation, the regimens advice may name. A training reply carries the
trained arrays and :class:`TrainReply`'s values: patients per parameter group
(``n-shared``, ``n-nCRT``, ``n-TNT``, ``n-nCT``), the steps and seconds, the
losses (not under DP) and the DP-SGD accounting (``dp-*``, under DP). The site builds it with
:meth:`TrainReply.to_values`; the server reads an untrusted reply with
:meth:`TrainReply.from_values`, which refuses anything malformed with a
ValueError that says what; :class:`SiteTrainReply` adds the site's name, its
arrays and a declined round. Evaluation replies carry
:class:`shared_model.site_evaluation.SiteEvaluation`'s values. No Flower here:
:mod:`wire.records` puts these values into Flower records for both sides.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared_model.clinical import REGIMENS
from shared_model.errors import ConfigError
from shared_model.federation_config import is_site_name
from shared_model.reply_values import MAX_SITE_PATIENTS as MAX_SITE_PATIENTS
from shared_model.reply_values import PRIVACY_FIELDS, privacy_field
from shared_model.reply_values import finite_number as finite_number
from shared_model.reply_values import whole_count as whole_count

SHARED = "shared"

# The records of a message (Flower RecordDict keys) and the info record's keys.
ARRAYS, METRICS, INFO, CONFIG = "arrays", "metrics", "info", "config"
SITE, DECLINED, WITHHELD = "site", "declined", "withheld"
SECONDS = "seconds"  # a reply's wall time at the site


def expert_group(regimen: str) -> str:
    """The parameter group of one regimen's expert (``expert/nCRT``)."""
    return f"expert/{regimen}"


GROUPS: tuple[str, ...] = (SHARED, *(expert_group(r) for r in REGIMENS))
"""Parameter groups, each aggregated over the sites that trained it."""

COUNT_KEYS: dict[str, str] = {
    SHARED: "n-shared",
    **{expert_group(r): f"n-{r}" for r in REGIMENS},
}
"""Group -> the reply key of its patient count (an aggregation weight)."""

LOSS_KEYS = {"train": "train-loss", "seg": "seg-loss", "pcr": "pcr-loss"}
PRIVACY_PREFIX = "dp-"
TRAIN_REPLY_KEYS = frozenset(
    {*COUNT_KEYS.values(), *LOSS_KEYS.values(), "steps", SECONDS}
)
"""The metric keys of a training reply besides its ``dp-*`` accounting."""


@dataclass(frozen=True)
class PrivacyAccount:
    """A site's DP accounting of one release (a training round or its
    fingerprint), as its reply carries it under ``dp-*`` keys.

    Attributes:
        epsilon: the site's cumulative epsilon after this release.
        target_epsilon: the budget its YAML accepts.
        delta: the delta both are stated at.
        epsilon_before: epsilon before this round (training replies).
        max_grad_norm: DP-SGD's per-sample clip.
        noise_multiplier: the Gaussian noise multiplier of the release.
        sample_rate: DP-SGD's Poisson sampling rate.
        steps: DP-SGD steps this round.
    """

    epsilon: float
    target_epsilon: float
    delta: float
    epsilon_before: float | None = None
    max_grad_norm: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None

    def to_dict(self) -> dict[str, float]:
        """The fields that are set (snake_case), as the run record keeps them."""
        return {
            name: getattr(self, name)
            for name in PRIVACY_FIELDS
            if getattr(self, name) is not None
        }

    def to_values(self) -> dict[str, float]:
        """Reply values (``dp-`` keys)."""
        return {
            f"{PRIVACY_PREFIX}{k.replace('_', '-')}": v
            for k, v in self.to_dict().items()
        }

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> PrivacyAccount | None:
        """The account in an untrusted reply's values (None: no ``dp-*`` key).

        A partial account (any ``dp-*`` key without ``dp-epsilon``,
        ``dp-target-epsilon`` and ``dp-delta``), an unknown ``dp-*`` key, a
        value that is not a finite number in its range, or an epsilon before
        the round above the one after, raise ValueError naming the key.
        """
        raw = {
            k[len(PRIVACY_PREFIX) :].replace("-", "_"): (k, v)
            for k, v in values.items()
            if k.startswith(PRIVACY_PREFIX)
        }
        if not raw:
            return None
        unknown = sorted(
            key for name, (key, _) in raw.items() if name not in PRIVACY_FIELDS
        )
        if unknown:
            raise ValueError(
                f"unknown DP accounting key `{unknown[0][:40]}`; known: "
                + ", ".join(f"dp-{k.replace('_', '-')}" for k in PRIVACY_FIELDS)
            )
        missing = [
            f"dp-{name.replace('_', '-')}"
            for name, (required, _, _) in PRIVACY_FIELDS.items()
            if required and name not in raw
        ]
        if missing:
            raise ValueError(
                f"partial DP accounting: `{missing[0]}` is missing (a DP reply "
                "carries dp-epsilon, dp-target-epsilon and dp-delta)"
            )
        out: dict[str, Any] = {}
        for name, (key, value) in raw.items():
            out[name] = privacy_field(name, key, value)
        account = cls(**out)
        if (
            account.epsilon_before is not None
            and account.epsilon_before > account.epsilon
        ):
            raise ValueError("`dp-epsilon-before` is above `dp-epsilon`")
        return account


@dataclass(frozen=True)
class TrainReply:
    """A site's training reply, apart from its arrays.

    Attributes:
        counts: patients per parameter group (:data:`GROUPS`); a group with a
            positive count must be uploaded whole.
        steps: optimiser steps taken this round.
        seconds: wall time of the round at the site.
        losses: mean ``train``, ``seg`` and ``pcr`` losses; None under DP
            (computed from the patients without noise, so never released).
        privacy: DP-SGD accounting; None without DP.
    """

    counts: Mapping[str, int]
    steps: int | None = None
    seconds: float | None = None
    losses: Mapping[str, float] | None = None
    privacy: PrivacyAccount | None = None

    def to_values(self) -> dict[str, Any]:
        """Flat values for a Flower MetricRecord (what the site sends)."""
        out: dict[str, Any] = {
            COUNT_KEYS[g]: int(self.counts.get(g, 0)) for g in GROUPS
        }
        if self.steps is not None:
            out["steps"] = int(self.steps)
        if self.seconds is not None:
            out["seconds"] = float(self.seconds)
        for name, value in (self.losses or {}).items():
            out[LOSS_KEYS[name]] = float(value)
        if self.privacy is not None:
            out |= self.privacy.to_values()
        return out

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> TrainReply:
        """Read an untrusted reply's values; ValueError says what is wrong
        (an unknown key included: nothing is accepted unread)."""
        unknown = sorted(
            k
            for k in values
            if k not in TRAIN_REPLY_KEYS and not k.startswith(PRIVACY_PREFIX)
        )
        if unknown:
            raise ValueError(f"unknown metric `{unknown[0][:40]}` in the reply")
        missing = [k for k in COUNT_KEYS.values() if k not in values]
        if missing:
            raise ValueError(f"the reply lacks `{missing[0]}`")
        counts = {g: whole_count(values[k], k) for g, k in COUNT_KEYS.items()}
        losses = {
            name: finite_number(values[key], key)
            for name, key in LOSS_KEYS.items()
            if key in values
        }
        steps = values.get("steps")
        return cls(
            counts=counts,
            steps=None if steps is None else whole_count(steps, "steps", 10**7),
            seconds=(
                finite_number(values["seconds"], "seconds")
                if "seconds" in values
                else None
            ),
            losses=losses or None,
            privacy=PrivacyAccount.from_values(values),
        )


@dataclass(frozen=True)
class SiteTrainReply:
    """A site's whole training reply: its name, the arrays of the groups it
    trained, and :class:`TrainReply`; or, for a round its DP budget declines,
    ``declined`` (the reason) and no arrays."""

    site: str
    reply: TrainReply
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    declined: str | None = None


@dataclass(frozen=True)
class RoundRequest:
    """What the coordinator sends with each round's weights.

    Attributes:
        run_config: the resolved federation config (kebab-case keys).
        plan: the preprocessing plan (:meth:`shared_model.plan.Plan.to_dict`).
        model_config: the network (:meth:`shared_model.model.ModelConfig.to_dict`).
        server_round: the round (Flower's strategy adds it to every message).
        backbone_sha256: the pretrained backbone the federation declares.
        allowed_regimens: evaluation only: the regimens advice may name
            (experts with enough support); None allows all.
        advice_rule: evaluation only: the advice rule to score
            (:meth:`shared_model.policy.RecommendationRule.to_dict`); None:
            the run config's.
        candidates: evaluation only: rules whose doubly robust value on the
            validation split the site also sums (the rule's choice).
    """

    run_config: Mapping[str, Any]
    plan: Mapping[str, Any]
    model_config: Mapping[str, Any]
    server_round: int = 0
    backbone_sha256: str | None = None
    allowed_regimens: tuple[str, ...] | None = None
    advice_rule: Mapping[str, Any] | None = None
    candidates: tuple[Mapping[str, Any], ...] | None = None

    def to_values(self) -> dict[str, Any]:
        """Flat values for a Flower ConfigRecord (``server-round`` is added by
        the strategy)."""
        out: dict[str, Any] = {
            "run-config": json.dumps(dict(self.run_config)),
            "plan": json.dumps(dict(self.plan)),
            "model-config": json.dumps(dict(self.model_config)),
        }
        if self.backbone_sha256 is not None:
            out["backbone-sha256"] = self.backbone_sha256
        if self.allowed_regimens is not None:
            out["allowed-regimens"] = json.dumps(list(self.allowed_regimens))
        if self.advice_rule is not None:
            out["advice-rule"] = json.dumps(dict(self.advice_rule))
        if self.candidates is not None:
            out["candidates"] = json.dumps([dict(c) for c in self.candidates])
        return out

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> RoundRequest:
        """Read the coordinator's request at a site; ConfigError names the key."""

        def obj(key: str) -> dict[str, Any]:
            if key not in values:
                raise ConfigError(f"the round's config lacks `{key}`")
            try:
                out = json.loads(str(values[key]))
            except json.JSONDecodeError as e:
                raise ConfigError(f"the round's `{key}` is not JSON") from e
            if not isinstance(out, dict):
                raise ConfigError(f"the round's `{key}` is not a JSON object")
            return out

        rnd = values.get("server-round")
        if isinstance(rnd, bool) or not isinstance(rnd, int) or not 0 < rnd < 10**6:
            raise ConfigError(f"the round's `server-round` is {rnd!r}")
        digest = values.get("backbone-sha256")
        allowed: tuple[str, ...] | None = None
        if "allowed-regimens" in values:
            try:
                raw = json.loads(str(values["allowed-regimens"]))
            except json.JSONDecodeError as e:
                raise ConfigError("`allowed-regimens` is not JSON") from e
            if not isinstance(raw, list) or any(r not in REGIMENS for r in raw):
                raise ConfigError(f"`allowed-regimens` must be a subset of {REGIMENS}")
            allowed = tuple(r for r in REGIMENS if r in raw)
        rule = obj("advice-rule") if "advice-rule" in values else None
        candidates = None
        if "candidates" in values:
            try:
                raw_candidates = json.loads(str(values["candidates"]))
            except json.JSONDecodeError as e:
                raise ConfigError("`candidates` is not JSON") from e
            if not isinstance(raw_candidates, list) or not all(
                isinstance(c, dict) for c in raw_candidates
            ):
                raise ConfigError("`candidates` must be a list of advice rules")
            candidates = tuple(raw_candidates[:64])
        return cls(
            run_config=obj("run-config"),
            plan=obj("plan"),
            model_config=obj("model-config"),
            server_round=rnd,
            backbone_sha256=None if digest is None else str(digest),
            allowed_regimens=allowed,
            advice_rule=rule,
            candidates=candidates,
        )


FINGERPRINT = "fingerprint"  # the info record's key of a fingerprint reply
MAX_FINGERPRINT_CHARS = 1_000_000


def fingerprint_query_values(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The planning query: the federation's run config (the site's DP
    accountant is one of its keys)."""
    return {"run-config": json.dumps(dict(run_config))}


def read_fingerprint_query(values: Mapping[str, Any]) -> dict[str, Any]:
    """A site reads the planning query; ConfigError names what is wrong."""
    try:
        out = json.loads(str(values["run-config"]))
    except (KeyError, json.JSONDecodeError) as e:
        raise ConfigError("the planning query lacks a JSON `run-config`") from e
    if not isinstance(out, dict):
        raise ConfigError("the planning query's `run-config` is not a JSON object")
    return out


@dataclass(frozen=True)
class FingerprintReply:
    """A site's answer to the planning query: its name, its fingerprint's
    values (:meth:`shared_model.fingerprint.Fingerprint.to_values`) and, when
    noised under DP, the accounting of that release."""

    site: str
    fingerprint: Mapping[str, Any]
    privacy: PrivacyAccount | None = None

    def info_values(self) -> dict[str, Any]:
        return {SITE: self.site, FINGERPRINT: json.dumps(dict(self.fingerprint))}

    def metric_values(self) -> dict[str, float]:
        return self.privacy.to_values() if self.privacy else {}

    @classmethod
    def from_values(
        cls, info: Mapping[str, Any], metrics: Mapping[str, Any]
    ) -> FingerprintReply:
        """Read an untrusted reply (its fingerprint is checked by
        ``Fingerprint.from_values``); ValueError says what is wrong."""
        site, text = info.get(SITE), info.get(FINGERPRINT)
        if not is_site_name(site):
            raise ValueError(
                f"the reply names no valid site (`{INFO}` record, `{SITE}`)"
            )
        unknown = sorted(set(info) - {SITE, FINGERPRINT}) + sorted(
            k for k in metrics if not k.startswith(PRIVACY_PREFIX)
        )
        if unknown:
            raise ValueError(f"unknown key `{unknown[0][:40]}` in the reply")
        if not isinstance(text, str) or len(text) > MAX_FINGERPRINT_CHARS:
            raise ValueError(
                f"`{FINGERPRINT}` must be a JSON text under {MAX_FINGERPRINT_CHARS} "
                "characters"
            )
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"`{FINGERPRINT}` is not JSON") from e
        if not isinstance(values, dict):
            raise ValueError(f"`{FINGERPRINT}` is not a JSON object")
        return cls(str(site), values, PrivacyAccount.from_values(metrics))
