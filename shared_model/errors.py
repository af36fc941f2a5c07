"""The project's one exception root.

Every error that a user can act on derives from :class:`MoeflError`, so a
command line can catch it, print the message and exit non-zero without a
traceback. Messages say what is wrong, where (file, case, key), what was
expected and how to fix it.
"""

from __future__ import annotations


class MoeflError(Exception):
    """Base class of every user-facing error raised by moefl."""


class ConfigError(MoeflError, ValueError):
    """A configuration file or value is invalid (names the file and key)."""


class DataError(MoeflError, ValueError):
    """Site data cannot be read or does not follow the site data format."""


class PlanRefused(ConfigError):
    """A site refuses the federation's plan: under it, its data would be
    unusable (names the axis, the plan's value and the site's)."""


class SecureAggregationRequired(ConfigError):
    """A site whose YAML sets ``secure_aggregation: required`` refuses a
    training round that is not securely aggregated."""
