"""The one type of finding, the report that collects them, and the check of a
number from a site's YAML.

Every problem the site side reports to a person (``moefl check``'s findings,
a site YAML's errors, a broken case skipped by ``moefl predict``) is a
:class:`Problem`: a code, where it is (file, case, key), what is wrong and how
to fix it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    """A problem a site must see: a finding code, where it is, what and how to fix."""

    code: str
    where: str
    message: str
    fix: str
    severity: str = "error"
    case: str | None = None  # the case it concerns, when it concerns one


def yaml_problem(key: str, message: str, fix: str) -> Problem:
    """A problem with the site YAML's ``key``."""
    return Problem("yaml", key, message, fix)


def yaml_number(
    value: Any,
    key: str,
    problems: list[Problem],
    *,
    kind: type,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """``value`` as ``kind`` when it is a finite number in range; otherwise None,
    with the problem added to ``problems`` (naming ``key``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not isinstance(value, int))
    ):
        problems.append(
            yaml_problem(
                key,
                f"`{key}` is {value!r}; expected a "
                f"{'whole number' if kind is int else 'number'}",
                f"set `{key}` to a {kind.__name__}",
            )
        )
        return None
    if not math.isfinite(value):
        problems.append(
            yaml_problem(
                key,
                f"`{key}` is {value}; expected a finite number",
                f"set `{key}` to a finite {kind.__name__}",
            )
        )
        return None
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        rng = " and ".join(x for x in (lo, hi) if x)
        problems.append(
            yaml_problem(
                key,
                f"`{key}` is {value}; expected a value {rng}",
                f"set `{key}` inside that range",
            )
        )
        return None
    return kind(value)


@dataclass
class CheckReport:
    """Everything the check found, plus identifier-free summaries."""

    yaml: str
    site: str | None = None
    role: str | None = None
    findings: list[Problem] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    # case ids: every case seen (images or table) and those that passed; they
    # stay at the site (not in to_dict), for `moefl predict --site`
    cases_seen: list[str] = field(default_factory=list)
    usable_cases: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, problem: Problem) -> None:
        self.findings.append(problem)

    def to_dict(self) -> dict[str, Any]:
        return {
            "yaml": self.yaml,
            "site": self.site,
            "role": self.role,
            "ok": self.ok,
            "n_errors": len(self.errors),
            "n_warnings": len(self.warnings),
            "findings": [asdict(f) for f in self.findings],
            "summary": self.summary,
        }
