"""The house's packages, for the tests that read its source."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (
    "shared_model",
    "wire",
    "secagg",
    "client",
    "server",
    "multisite",
    "simulations",
    "cli",
)


def sources() -> list[Path]:
    """Every Python file of the house (tests are not part of it)."""
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
