"""A site's privacy ledger: every DP release it made, on its own disk.

``<run_dir>/privacy/ledger.json`` (:func:`ledger_path`, the one place that
spells it), one entry per DP-SGD round and per fingerprint release, each
written (flushed to the disk with its folder) *before* the release, so a crash
or a resumed federation can only over-count, never under-count. The server
never holds it.

Each entry holds the Gaussian mechanism's settings (noise multiplier, clip,
sampling rate, steps, patients), the time and the accountant that measured the
spend when it was planned (``"rdp"`` or ``"prv"``,
:data:`shared_model.accounting.ACCOUNTANTS`). Ledgers of version 1 have no
accountant; they load, and :attr:`PrivacyLedger.accountants` reads None there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from client.privacy.rounds import DPRound
from shared_model.accounting import ACCOUNTANTS, Mechanism, epsilon_of
from shared_model.durable import write_atomic
from shared_model.errors import ConfigError, DataError

LEDGER_VERSION = 2
"""2: each entry names its accountant; 1 (still read): without it."""


def ledger_path(run_dir: Path) -> Path:
    """Where a site keeps its ledger, under its ``run_dir``."""
    return Path(run_dir) / "privacy" / "ledger.json"


class PrivacyLedger:
    """The site's record of every DP release it made (JSON, on the site's disk)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: list[dict[str, Any]] = []
        if self.path.is_file():
            self.entries = self._read()

    @classmethod
    def for_site(cls, run_dir: Path) -> PrivacyLedger:
        return cls(ledger_path(run_dir))

    @classmethod
    @contextmanager
    def locked(cls, run_dir: Path) -> Iterator[PrivacyLedger]:
        """The site's ledger, read and held under an exclusive file lock.

        Plan and record a round inside it: two trainings at one site (two
        federations on the same ``run_dir``) then cannot both plan against
        the same spend and under-count it.
        """
        try:
            import fcntl
        except ImportError as e:  # not a POSIX system
            raise ConfigError(
                "DP training needs file locking for the privacy ledger (fcntl), "
                "which this operating system lacks; run the site on Linux or macOS"
            ) from e
        path = ledger_path(run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield cls(path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> list[dict[str, Any]]:
        hint = (
            "restore it from a backup; deleting it would forget the privacy "
            "budget already spent on this site's patients"
        )
        try:
            raw = json.loads(self.path.read_text())
            entries = raw["entries"]
            for e in entries:
                if not (
                    float(e["noise_multiplier"]) > 0
                    and 0 < float(e["sample_rate"]) <= 1
                    and int(e["steps"]) >= 0
                    and e.get("accountant", ACCOUNTANTS[0]) in ACCOUNTANTS
                ):
                    raise ValueError(f"bad entry {e}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"{self.path}: the privacy ledger is unreadable ({err}); {hint}"
            ) from err
        return list(entries)

    @property
    def history(self) -> list[Mechanism]:
        """``(noise_multiplier, sample_rate, steps)`` of each entry, in order."""
        return [
            (float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
            for e in self.entries
        ]

    @property
    def accountants(self) -> list[str | None]:
        """The accountant each entry was measured with (None: a version-1 entry,
        written before the ledger recorded it)."""
        return [e.get("accountant") for e in self.entries]

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """The whole ledger's spend by ``accountant``."""
        return epsilon_of(self.history, delta, accountant)

    def record(self, dp: DPRound, *, accountant: str, **info: Any) -> None:
        """Append one release, measured by ``accountant``, and make it durable
        before anything uses it.

        The new ledger is written to a temporary file, flushed to the disk,
        renamed over the old one and the folder is flushed too: a crash or a
        power cut at any point leaves either the old ledger or the new one,
        never a torn or empty file and never a lost entry once this returns.
        """
        if accountant not in ACCOUNTANTS:
            raise ConfigError(f"accountant {accountant!r}: one of {ACCOUNTANTS}")
        entry = {**asdict(dp), "accountant": accountant, "time": time.time(), **info}
        entries = [*self.entries, entry]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"version": LEDGER_VERSION, "entries": entries}, indent=1)
        write_atomic(self.path, data.encode())
        self.entries = entries
