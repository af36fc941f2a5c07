"""The ``privacy`` section of a site YAML: the DP budget a site accepts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from client.problem import Problem, yaml_number, yaml_problem

PRIVACY_KEYS = ("target_epsilon", "delta", "max_grad_norm")
PRIVACY_OPTIONAL_KEYS = (
    "secure_mode",
    "public_backbones",
    "release_evaluation",
    "fingerprint_epsilon",
    "evaluation_epsilon",
)
EVALUATION_RELEASES = ("withhold", "exact", "dp")
"""What a DP site does with its validation counts: withholds them (YAML
``release_evaluation: false``), sends them exactly, NOT under DP (``true``), or
sends them through the Gaussian mechanism at ``evaluation_epsilon`` (``dp``)."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class PrivacyConfig:
    """The differential-privacy budget a site accepts (sample-level DP-SGD)."""

    target_epsilon: float
    delta: float
    max_grad_norm: float
    secure_mode: bool = False
    public_backbones: tuple[str, ...] = ()
    release_evaluation: str = "withhold"
    """One of :data:`EVALUATION_RELEASES`."""
    fingerprint_epsilon: float = 1.0
    """What the dataset fingerprint's release (federated planning) may spend."""
    evaluation_epsilon: float | None = None
    """What one DP release of the validation counts may spend (each evaluation
    round is one release, charged to the same budget); set with
    ``release_evaluation: dp`` only."""


def parse_privacy(raw: Any, problems: list[Problem]) -> PrivacyConfig | None:
    """The ``privacy`` mapping, or None with its problems added (naming each key)."""
    if not isinstance(raw, dict):
        problems.append(
            yaml_problem(
                "privacy",
                "`privacy` must be a mapping",
                "give target_epsilon, delta and max_grad_norm under it",
            )
        )
        return None
    n_before = len(problems)
    for key in raw:
        if key not in PRIVACY_KEYS + PRIVACY_OPTIONAL_KEYS:
            problems.append(
                yaml_problem(
                    f"privacy.{key}",
                    f"unknown key `privacy.{key}`",
                    f"allowed: {', '.join(PRIVACY_KEYS + PRIVACY_OPTIONAL_KEYS)}",
                )
            )
    values: dict[str, Any] = {}
    bounds: tuple[tuple[str, dict[str, Any]], ...] = (
        ("target_epsilon", {"low": 0.0, "low_open": True}),
        ("delta", {"low": 0.0, "high": 1.0, "low_open": True, "high_open": True}),
        ("max_grad_norm", {"low": 0.0, "low_open": True}),
    )
    for key, kwargs in bounds:
        if key not in raw:
            problems.append(
                yaml_problem(
                    f"privacy.{key}",
                    f"`privacy.{key}` is missing",
                    "all three privacy keys are required together",
                )
            )
            continue
        values[key] = yaml_number(
            raw[key], f"privacy.{key}", problems, kind=float, **kwargs
        )
    if "fingerprint_epsilon" in raw:
        values["fingerprint_epsilon"] = yaml_number(
            raw["fingerprint_epsilon"],
            "privacy.fingerprint_epsilon",
            problems,
            kind=float,
            low=0.01,
            high=10.0,
        )
    _parse_release(raw, values, problems)
    if "secure_mode" in raw:
        if not isinstance(raw["secure_mode"], bool):
            problems.append(
                yaml_problem(
                    "privacy.secure_mode",
                    f"`privacy.secure_mode` is {raw['secure_mode']!r}; expected true "
                    "or false",
                    "set `privacy.secure_mode` to true or false",
                )
            )
        else:
            values["secure_mode"] = raw["secure_mode"]
    if "public_backbones" in raw:
        hashes = raw["public_backbones"] or []
        if not isinstance(hashes, list) or not all(
            isinstance(h, str) and _SHA256.match(h) for h in hashes
        ):
            problems.append(
                yaml_problem(
                    "privacy.public_backbones",
                    "`privacy.public_backbones` must be a list of SHA-256 hex digests",
                    "copy each accepted backbone's `sha256` from `moefl pretrain`'s "
                    "output (64 lower-case hex characters)",
                )
            )
        else:
            values["public_backbones"] = tuple(hashes)
    if len(problems) > n_before:
        return None
    return PrivacyConfig(**values)


def _parse_release(
    raw: dict[str, Any], values: dict[str, Any], problems: list[Problem]
) -> None:
    """``release_evaluation`` (true, false or dp) and ``evaluation_epsilon``,
    which a DP release needs and nothing else takes."""
    release = raw.get("release_evaluation", False)
    if release is True or release is False or release == "dp":
        values["release_evaluation"] = {True: "exact", False: "withhold"}.get(
            release, "dp"
        )
    else:
        problems.append(
            yaml_problem(
                "privacy.release_evaluation",
                f"`privacy.release_evaluation` is {release!r}; expected true, false "
                "or dp",
                "false withholds the validation counts, dp sends them noised at "
                "`privacy.evaluation_epsilon`, true sends them exactly (not DP)",
            )
        )
        return
    if "evaluation_epsilon" in raw:
        if release != "dp":
            problems.append(
                yaml_problem(
                    "privacy.evaluation_epsilon",
                    "`privacy.evaluation_epsilon` is set but "
                    f"`privacy.release_evaluation` is {release!r}",
                    "set `privacy.release_evaluation: dp` or remove "
                    "`privacy.evaluation_epsilon`",
                )
            )
            return
        values["evaluation_epsilon"] = yaml_number(
            raw["evaluation_epsilon"],
            "privacy.evaluation_epsilon",
            problems,
            kind=float,
            low=0.01,
            high=10.0,
        )
    elif release == "dp":
        problems.append(
            yaml_problem(
                "privacy.evaluation_epsilon",
                "`privacy.release_evaluation` is dp but "
                "`privacy.evaluation_epsilon` is missing",
                "give the epsilon one evaluation round's release may spend, e.g. "
                "`evaluation_epsilon: 1.0` (each round spends it again)",
            )
        )
