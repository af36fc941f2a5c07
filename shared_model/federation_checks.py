"""The run config's ranges: what each key of :class:`FederationConfig` accepts.

Each validator below is a table of rows ``(ok, key, expected)`` for one part of
the federation; :func:`check_config` (called when a config is made) raises a
ConfigError naming the key of the first row that fails. ``cfg`` is a
:class:`~shared_model.federation_config.FederationConfig` (typed ``Any``: the
config imports this module, not the other way round).
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from shared_model.errors import ConfigError
from shared_model.robust import AGGREGATIONS

Check = tuple[bool, str, str]
"""Whether a value is in range, the run-config key, and what it expects."""

STRATEGIES = ("fedavg", "fedprox", "fedadam")
TRAININGS = ("staged", "joint")
FEDERATED_PLAN = "federated"
"""The run config's ``plan`` value that asks the sites for their fingerprints."""


def check_config(cfg: Any) -> None:
    """Raise ConfigError for the first value out of range (see the tables)."""
    _check_finite(cfg)
    for table in (
        _local_training,
        _rounds,
        _plan_and_widths,
        _privacy,
        _scoring,
        _heads,
        _robustness,
        _secure_aggregation,
        _posterior_and_advice,
    ):
        for ok, key, expected in table(cfg):
            if not ok:
                raise ConfigError(
                    f"run config `{key}` is out of range; expected {expected}"
                )


def _check_finite(cfg: Any) -> None:
    """No number is infinite or NaN."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(
                f"run config `{f.name.replace('_', '-')}` is {value}; expected a "
                "finite number"
            )


def _local_training(cfg: Any) -> list[Check]:
    """A site's segmentation and joint rounds."""
    return [
        (1 <= cfg.num_server_rounds <= 100_000, "num-server-rounds", "1..100000"),
        (1 <= cfg.local_epochs <= 1000, "local-epochs", "1..1000"),
        (0 <= cfg.local_steps <= 1_000_000, "local-steps", "0..1000000"),
        (1 <= cfg.batch_size <= 512, "batch-size", "1..512"),
        (0 < cfg.lr <= 10, "lr", "in (0, 10]"),
        (
            cfg.lr_schedule in ("poly", "constant"),
            "lr-schedule",
            "poly or constant",
        ),
        (cfg.optimizer in ("sgd", "adamw"), "optimizer", "sgd or adamw"),
    ]


def _rounds(cfg: Any) -> list[Check]:
    """The strategy and the round loop."""
    return [
        (cfg.strategy in STRATEGIES, "strategy", " or ".join(STRATEGIES)),
        (cfg.proximal_mu >= 0, "proximal-mu", ">= 0"),
        (cfg.server_lr > 0, "server-lr", "> 0"),
        (
            0 <= cfg.server_beta1 < 1 and 0 <= cfg.server_beta2 < 1,
            "server-beta1/server-beta2",
            "in [0, 1)",
        ),
        (cfg.server_tau > 0, "server-tau", "> 0"),
        (cfg.min_sites >= 1, "min-sites", ">= 1"),
        (cfg.min_sites_per_expert >= 1, "min-sites-per-expert", ">= 1"),
        (
            0 < cfg.round_timeout <= 7 * 86400,
            "round-timeout",
            "in (0, 604800] seconds",
        ),
        (cfg.evaluate_every >= 0, "evaluate-every", ">= 0"),
    ]


def _plan_and_widths(cfg: Any) -> list[Check]:
    """The plan and the network's widths."""
    return [
        (0.25 <= cfg.plan_memory_gb <= 1024, "plan-memory-gb", "0.25..1024"),
        (
            not (cfg.backbone and cfg.plan == FEDERATED_PLAN),
            "plan",
            "not `federated` with a pretrained `backbone` (its plan is fixed)",
        ),
        (
            1 <= cfg.base_filters <= cfg.max_filters <= 2048,
            "base-filters/max-filters",
            "1 <= base-filters <= max-filters <= 2048",
        ),
    ]


def _privacy(cfg: Any) -> list[Check]:
    """Sample-level and client-level differential privacy."""
    return [
        (
            0 <= cfg.dp_noise_multiplier <= 1000,
            "dp-noise-multiplier",
            "0 (derive from each site's budget) or a noise multiplier > 0",
        ),
        (cfg.dp_accountant in ("rdp", "prv"), "dp-accountant", "rdp or prv"),
        (
            cfg.client_dp_noise_multiplier >= 0,
            "client-dp-noise-multiplier",
            ">= 0 (0 disables client-level DP)",
        ),
        (
            cfg.client_dp_clip >= 0
            and (cfg.client_dp_noise_multiplier == 0 or cfg.client_dp_clip > 0),
            "client-dp-clip",
            "> 0 when client-dp-noise-multiplier is set",
        ),
        (0 < cfg.client_dp_delta < 1, "client-dp-delta", "in (0, 1)"),
    ]


def _scoring(cfg: Any) -> list[Check]:
    """The operating point and the advice rule's guard."""
    return [
        (0 < cfg.target_sensitivity <= 1, "target-sensitivity", "in (0, 1]"),
        (
            0 <= cfg.recommendation_margin < 1,
            "recommendation-margin",
            "in [0, 1)",
        ),
        (
            0 <= cfg.min_expert_support <= 1_000_000,
            "min-expert-support",
            "0..1000000",
        ),
    ]


def _heads(cfg: Any) -> list[Check]:
    """Staged training, the features and the heads."""
    return [
        (cfg.training in TRAININGS, "training", " or ".join(TRAININGS)),
        (0 <= cfg.head_rounds <= 100_000, "head-rounds", "0..100000"),
        (1 <= cfg.head_epochs <= 10_000, "head-epochs", "1..10000"),
        (0 < cfg.head_lr <= 10, "head-lr", "in (0, 10]"),
        (1 <= cfg.head_batch_size <= 100_000, "head-batch-size", "1..100000"),
        (cfg.features in ("tumour", "stem"), "features", "tumour or stem"),
        (
            cfg.experts in ("residual", "independent"),
            "experts",
            "residual or independent",
        ),
        (1 <= cfg.embed_dim <= 1024, "embed-dim", "1..1024"),
        (
            cfg.head_type in ("mlp", "linear")
            and (cfg.head_type == "mlp" or cfg.features == "tumour"),
            "head-type",
            "mlp, or linear with features tumour",
        ),
        (0 < cfg.dp_head_lr <= 10, "dp-head-lr", "in (0, 10]"),
        (
            0 < cfg.dp_head_sample_rate <= 1,
            "dp-head-sample-rate",
            "in (0, 1]",
        ),
        (
            not cfg.backbone or cfg.training == "staged",
            "backbone",
            'empty unless training is "staged" (a pretrained backbone is '
            "frozen; joint training would change it)",
        ),
        (
            not cfg.backbone or cfg.head_rounds >= 1 or cfg.head_fit == "newton",
            "head-rounds",
            ">= 1 with a pretrained `backbone` (the run trains the heads alone)",
        ),
        (
            cfg.training == "joint" or cfg.features == "tumour",
            "training",
            "joint when features is stem (staged training caches tumour features)",
        ),
    ]


def _robustness(cfg: Any) -> list[Check]:
    """Robust aggregation."""
    return [
        (
            cfg.aggregation in AGGREGATIONS,
            "aggregation",
            " or ".join(AGGREGATIONS),
        ),
        (0 <= cfg.trim_fraction < 0.5, "trim-fraction", "in [0, 0.5)"),
        (
            cfg.update_bound == 0 or 1 <= cfg.update_bound <= 1e6,
            "update-bound",
            "0 (off) or a multiple from 1 to 1000000",
        ),
        (0 < cfg.max_site_share <= 1, "max-site-share", "in (0, 1]"),
    ]


def _secure_aggregation(cfg: Any) -> list[Check]:
    """Secure aggregation: the sites clip, and the coordinator can only sum."""
    on = cfg.secure_aggregation
    return [
        (
            not on or cfg.client_dp_clip > 0,
            "client-dp-clip",
            "> 0 with secure-aggregation (each site clips its update to it)",
        ),
        (
            not on or cfg.aggregation == "mean",
            "aggregation",
            "mean with secure-aggregation (the coordinator sees only sums)",
        ),
        (
            cfg.secagg_threshold == 0 or 2 <= cfg.secagg_threshold <= 10_000,
            "secagg-threshold",
            "0 (a majority of the round's sites) or 2..10000",
        ),
        (
            1 <= cfg.secagg_max_patients <= 1_000_000,
            "secagg-max-patients",
            "1..1000000",
        ),
        (
            2 <= cfg.secagg_min_group_sites <= 10_000,
            "secagg-min-group-sites",
            "2..10000",
        ),
    ]


def _posterior_and_advice(cfg: Any) -> list[Check]:
    """The Newton fit, its posterior and the advice rule."""
    return [
        (cfg.head_fit in ("rounds", "newton"), "head-fit", "rounds or newton"),
        (
            cfg.head_fit == "rounds"
            or (cfg.head_type == "linear" and cfg.experts == "residual"),
            "head-fit",
            "newton only with head-type linear and experts residual (a "
            "logistic regression)",
        ),
        (_numbers(cfg.prior_grid, 1e-6, 1e6), "prior-grid", "positive numbers"),
        (1 <= cfg.newton_rounds <= 100, "newton-rounds", "1..100"),
        (
            cfg.advice_rule in ("switch", "margin", "argmax"),
            "advice-rule",
            "switch, margin or argmax",
        ),
        (
            cfg.gain_threshold == "choose"
            or _numbers(cfg.gain_threshold, 0.5, 1.0, one=True),
            "gain-threshold",
            "choose, or a number in [0.5, 1]",
        ),
        (
            cfg.guideline_regimen in ("nCRT", "TNT", "nCT"),
            "guideline-regimen",
            "nCRT, TNT or nCT",
        ),
    ]


def _numbers(text: str, low: float, high: float, *, one: bool = False) -> bool:
    """Whether ``text`` is one (``one``) or more numbers, each in [low, high]."""
    try:
        values = [float(x) for x in str(text).split()]
    except ValueError:
        return False
    return (
        bool(values)
        and (len(values) == 1 or not one)
        and all(math.isfinite(v) and low <= v <= high for v in values)
    )
