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
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class PrivacyConfig:
    """The differential-privacy budget a site accepts (sample-level DP-SGD)."""

    target_epsilon: float
    delta: float
    max_grad_norm: float
    secure_mode: bool = False
    public_backbones: tuple[str, ...] = ()
    release_evaluation: bool = False
    fingerprint_epsilon: float = 1.0
    """What the dataset fingerprint's release (federated planning) may spend."""


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
    for key in ("secure_mode", "release_evaluation"):
        if key in raw:
            if not isinstance(raw[key], bool):
                problems.append(
                    yaml_problem(
                        f"privacy.{key}",
                        f"`privacy.{key}` is {raw[key]!r}; expected true or false",
                        f"set `privacy.{key}` to true or false",
                    )
                )
            else:
                values[key] = raw[key]
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
