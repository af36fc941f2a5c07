"""The ``secure_aggregation`` section of a site YAML: what the site asks of the
coordinator's aggregation of its updates.

Either one word, ``secure_aggregation: required`` (or ``optional``, the default),
or a mapping::

    secure_aggregation:
      mode: required          # refuse any training round not securely aggregated
      small_groups: withhold  # withhold | dp | clear (see below)
      small_group_noise: 1.0  # dp: Gaussian noise multiplier on the clipped update

A group that fewer than the run's ``secagg-min-group-sites`` sites train (the nCT
expert at one site) is not hidden by summing: the sum is that site's update. Per
its YAML the site then withholds it (``withhold``: it does not send the group,
which stays as it was), releases it with Gaussian noise of ``small_group_noise``
times the round's clip, unweighted, its patient count hidden (``dp``), or sends it
as a plain round would, count-weighted (``clear``: the site consents to the
coordinator seeing that group's update and count). Every round records which
choice each site applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from client.problem import Problem, yaml_number, yaml_problem

MODES = ("optional", "required")
SMALL_GROUP_CHOICES = ("withhold", "dp", "clear")
_KEYS = ("mode", "small_groups", "small_group_noise")


@dataclass(frozen=True)
class SecureAggregationConfig:
    """What a site asks of secure aggregation (the defaults: optional, withhold)."""

    required: bool = False
    small_groups: str = "withhold"
    small_group_noise: float = 1.0


def parse_secure_aggregation(
    raw: Any, problems: list[Problem]
) -> SecureAggregationConfig:
    """The ``secure_aggregation`` value (a word or a mapping); the default with
    its problems added (each naming its key) when it is wrong."""
    if raw is None:
        return SecureAggregationConfig()
    if isinstance(raw, str):
        raw = {"mode": raw}
    if not isinstance(raw, dict):
        problems.append(
            yaml_problem(
                "secure_aggregation",
                f"`secure_aggregation` is {raw!r}",
                "write `required`, `optional`, or a mapping with mode, "
                "small_groups and small_group_noise",
            )
        )
        return SecureAggregationConfig()
    n_before = len(problems)
    for key in raw:
        if key not in _KEYS:
            problems.append(
                yaml_problem(
                    f"secure_aggregation.{key}",
                    f"unknown key `secure_aggregation.{key}`",
                    f"allowed: {', '.join(_KEYS)}",
                )
            )
    for key, allowed in (("mode", MODES), ("small_groups", SMALL_GROUP_CHOICES)):
        value = raw.get(key, allowed[0])
        if value not in allowed:
            problems.append(
                yaml_problem(
                    f"secure_aggregation.{key}",
                    f"`secure_aggregation.{key}` is {value!r}",
                    f"one of {', '.join(allowed)}",
                )
            )
    mode = raw.get("mode", MODES[0])
    small = raw.get("small_groups", SMALL_GROUP_CHOICES[0])
    noise = 1.0
    if "small_group_noise" in raw:
        noise = yaml_number(
            raw["small_group_noise"],
            "secure_aggregation.small_group_noise",
            problems,
            kind=float,
            low=0.1,
            high=100.0,
        )
    if len(problems) > n_before:
        return SecureAggregationConfig()
    return SecureAggregationConfig(mode == "required", str(small), float(noise))
