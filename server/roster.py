"""The enrolment roster: which sites the coordinator agreed to, with which node
key and how many patients.

``roster.yaml`` in the coordinator's run folder (``run-dir``), when present::

    sites:
      west_china:
        node_key: "ecdsa-sha2-nistp384 AAAAE2VjZHNh..."   # the site's .pub line
        patients: [300, 420]   # the n-shared it may declare when it joins
      sysucc:
        patients: [150, 250]

With a roster, a site that is not on it is refused; a node whose public key
(as the SuperLink registered it) differs from its entry's ``node_key`` is
refused; and a site's first declaration must lie inside its ``patients`` range
(every count of an expert at most the range's top). Later replies stay bounded
by that declaration (:class:`server.strategy.GroupedStrategy`). ``node_key`` is
checked where the SuperLink reports keys (a deployment with node
authentication); simulated nodes have none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from shared_model.errors import ConfigError
from shared_model.federation_config import is_site_name
from shared_model.messages import SHARED
from shared_model.reply_values import MAX_SITE_PATIENTS

ROSTER = "roster.yaml"


@dataclass(frozen=True)
class Enrolment:
    """One site's entry: its node's public key (PEM, as Flower stores it) and
    the range of ``n-shared`` it signed up with."""

    site: str
    node_key: bytes | None
    patients: tuple[int, int]


def _pem_of(openssh: str, where: str) -> bytes:
    """A site's OpenSSH public key line as the PEM the SuperLink keeps."""
    try:
        key = serialization.load_ssh_public_key(openssh.strip().encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ConfigError(
            f"{where}: `node_key` is not an OpenSSH public key line (paste the "
            "site's .pub file, e.g. 'ecdsa-sha2-nistp384 AAAA...')"
        ) from e
    return key.public_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )


@dataclass(frozen=True)
class Roster:
    """The sites the coordinator enrolled (see the module docstring)."""

    path: Path
    sites: Mapping[str, Enrolment]

    @classmethod
    def load(cls, run_dir: Path) -> Roster | None:
        """The run folder's roster, or None when it has none; ConfigError names
        the file and key of anything malformed."""
        path = Path(run_dir) / ROSTER
        if not path.is_file():
            return None
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the roster ({e})") from e
        if not isinstance(raw, dict) or set(raw) != {"sites"}:
            raise ConfigError(f"{path}: expected one key, `sites`")
        entries = raw["sites"]
        if not isinstance(entries, dict) or not entries:
            raise ConfigError(f"{path}: `sites` must map site names to entries")
        sites = {}
        for name, entry in entries.items():
            where = f"{path}: sites.{name}"
            if not is_site_name(name):
                raise ConfigError(
                    f"{path}: {name!r} is not a site name (lower-case letters, "
                    "digits and _)"
                )
            if not isinstance(entry, dict) or not set(entry) <= {
                "node_key",
                "patients",
            }:
                raise ConfigError(f"{where}: expected `node_key` and `patients`")
            span = entry.get("patients")
            if (
                not isinstance(span, list)
                or len(span) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)
                or not 1 <= span[0] <= span[1] <= MAX_SITE_PATIENTS
            ):
                raise ConfigError(
                    f"{where}.patients must be [lowest, highest], whole numbers "
                    f"from 1 to {MAX_SITE_PATIENTS}"
                )
            key = entry.get("node_key")
            if key is not None and not isinstance(key, str):
                raise ConfigError(f"{where}.node_key must be a text")
            sites[name] = Enrolment(
                name,
                None if key is None else _pem_of(key, where),
                (span[0], span[1]),
            )
        return cls(path, sites)

    def verify_node(self, site: str, node_key: bytes | None) -> str | None:
        """Why a reply from ``site``'s node, holding ``node_key`` (None: the
        SuperLink reports none), is refused (None: it is not)."""
        entry = self.sites.get(site)
        if entry is None:
            return f"{site} is not enrolled in {self.path.name}"
        if (
            entry.node_key is not None
            and node_key is not None
            and _normal(node_key) != _normal(entry.node_key)
        ):
            return (
                f"the node's key is not the one {site} enrolled with in "
                f"{self.path.name}"
            )
        return None

    def verify_counts(self, site: str, counts: Mapping[str, int]) -> str | None:
        """Why ``site``'s first declaration ``counts`` (group -> patients) is
        refused (None: it lies inside its enrolment)."""
        entry = self.sites.get(site)
        if entry is None:
            return f"{site} is not enrolled in {self.path.name}"
        low, high = entry.patients
        shared = counts.get(SHARED, 0)
        if not low <= shared <= high:
            return (
                f"declares {shared} patients, outside the {low}-{high} it enrolled "
                f"with in {self.path.name}"
            )
        above = {g: n for g, n in counts.items() if n > high}
        if above:
            g, n = next(iter(above.items()))
            return f"declares {n} patients for `{g}`, above the {high} it enrolled with"
        return None

    def describe(self) -> dict[str, Any]:
        """What the run record says of the roster."""
        return {
            "path": str(self.path),
            "sites": {
                s: {"patients": list(e.patients), "node_key": e.node_key is not None}
                for s, e in sorted(self.sites.items())
            },
        }


def _normal(pem: bytes) -> bytes:
    return b"".join(pem.split())
