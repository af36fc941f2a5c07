"""App approval: the hash a site approves for a Flower app, the site's list
of approved hashes, and the checks (:class:`_Guard`) that
:mod:`client.node.app_pinning` places inside Flower's ClientApp process so
that only an approved app is unpacked and loaded.
"""

from __future__ import annotations

import hashlib
import io
import logging
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.cli.build import build_fab_from_disk

from shared_model.errors import ConfigError, MoeflError

# app pinning's one logger: the launcher gives it its handler
log = logging.getLogger("client.node.app_pinning")

_OWN_PACKAGES = ("client", "shared_model")  # what this process imported of moefl


class AppNotApprovedError(MoeflError):
    """The SuperLink handed this site an app whose hash the site has not approved.

    Its message travels to the coordinator in the error reply, so it names the hash
    and the key but not the site's files; the local log has the full detail.
    """

    # the name the coordinator's error reply gives it (importable there too)
    __module__ = "client.node.app_pinning"


def fab_bytes(path: Path) -> bytes:
    """The app bundle a SuperNode would receive for ``path``.

    ``path`` is an app folder (as given to ``flwr run``) or a ``.fab`` file. A
    folder is built by the function ``flwr run`` calls (fixed dates, sorted files,
    the same include rules), so the bytes match what the coordinator submits with
    the same Flower version. Raises :class:`ConfigError` for anything else.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        try:
            return build_fab_from_disk(path.resolve())
        except (ValueError, OSError, KeyError) as e:
            raise ConfigError(
                f"{path}: cannot build a Flower app bundle from this folder ({e}); "
                "give the folder that holds the app's pyproject.toml (the one passed "
                "to `flwr run`)"
            ) from e
    if path.is_file():
        data = path.read_bytes()
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                has_manifest = ".info/CONTENT" in zf.namelist()
        except zipfile.BadZipFile:
            has_manifest = False
        if not has_manifest:
            raise ConfigError(
                f"{path} is not a Flower app bundle (.fab: a zip with .info/CONTENT); "
                "give the app folder or the file `flwr build` wrote"
            )
        return data
    raise ConfigError(f"{path} does not exist; give an app folder or a .fab file")


def app_hash(path: Path) -> str:
    """The hash a site approves for an app: SHA-256 (hex) of its bundle's bytes.

    It is the run's ``fab_hash`` in Flower (``flwr run --format json`` prints its
    first 8 characters); a one-byte change to any bundled file changes it.
    """
    return hashlib.sha256(fab_bytes(path)).hexdigest()


def app_files(path: Path) -> list[tuple[str, str, int]]:
    """``(file, sha256, bytes)`` for each file in the bundle: what to review.

    The bundle holds fewer files than the folder (Flower's include and exclude
    rules, ``.gitignore``), and its pyproject.toml is re-serialised by Flower.
    """
    with zipfile.ZipFile(io.BytesIO(fab_bytes(path))) as zf:
        manifest = zf.read(".info/CONTENT").decode("utf-8").splitlines()
    return [(n, h, int(b) // 8) for n, h, b in (x.rsplit(",", 2) for x in manifest)]


def approved_apps(site_yaml: Path) -> tuple[str, ...]:
    """The app hashes ``site_yaml`` approves (its ``approved_apps`` key).

    Raises :class:`ConfigError` if the YAML is invalid or approves no app: a
    pinned node that refuses everything is a mistake, not a setting.
    """
    from client.data.site_config import load_site_config

    config = load_site_config(Path(site_yaml))
    if not config.approved_apps:
        raise ConfigError(
            f"{site_yaml}: `approved_apps` is missing or empty, so app pinning would "
            "refuse every app; review the app, then add the hash that `moefl app-hash "
            '<app folder or .fab>` prints as `approved_apps: ["<hash>"]`'
        )
    return config.approved_apps


@dataclass
class _Guard:
    """The two checks placed inside Flower's ClientApp process.

    ``install`` replaces ``install_from_fab``: it is the first code that touches
    the FAB's bytes, so refusing there refuses before anything is unpacked.
    ``loader`` replaces ``get_load_client_app_fn``: it loads only a folder that
    ``install`` unpacked from approved bytes in this process; if a Flower update
    ever bypassed ``install``, loading fails instead of running unchecked code.
    """

    site_yaml: Path
    approved: frozenset[str]
    install_root: Path
    installed: dict[str, Path] = field(default_factory=dict)

    def _refuse(self, digest: str, why: str) -> AppNotApprovedError:
        approved = ", ".join(sorted(self.approved)) or "none"
        log.error(
            "REFUSED app sha256 %s: %s. %s approves in `approved_apps`: %s. Nothing "
            "of this app was unpacked or run. To run it, review its code, compute "
            "its hash with `moefl app-hash` and add the hash to `approved_apps`.",
            digest,
            why,
            self.site_yaml,
            approved,
        )
        return AppNotApprovedError(
            f"site refused app sha256 {digest} ({why}); the site must review the app "
            "and add this hash to `approved_apps` in its site YAML before it runs"
        )

    def install(
        self,
        real_install: Callable[..., Path],
        fab_file: Path | bytes,
        install_dir: Path | None = None,
        skip_prompt: bool = False,
    ) -> Path:
        del install_dir, skip_prompt  # always our private folder, never a prompt
        data = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest not in self.approved:
            raise self._refuse(digest, "not in this site's approved apps")
        log.info("app sha256 %s is approved by %s", digest, self.site_yaml)
        path = Path(real_install(data, self.install_root, skip_prompt=True))
        self.installed[digest] = path.resolve()
        return path

    def loader(
        self,
        real_get_loader: Callable[..., Callable[[str, str, str], Any]],
        *_: Any,
        **__: Any,
    ) -> Callable[[str, str, str], Any]:
        def load(fab_id: str, fab_version: str, fab_hash: str) -> Any:
            folder = self.installed.get(fab_hash)
            if folder is None:
                raise self._refuse(
                    fab_hash, "not unpacked from approved bytes in this process"
                )
            forget_modules(folder)
            # Flower's own loader, pointed at our folder: it checks the app's id and
            # version against the run's before importing it.
            return real_get_loader("", str(folder), True)(fab_id, fab_version, fab_hash)

        return load


def forget_modules(folder: Path, packages: Sequence[str] = _OWN_PACKAGES) -> None:
    """Drop this process's copies of the packages the app ships itself.

    This process imported moefl's ``client`` and ``shared_model`` before loading
    the app; moefl's own app ships packages of those names, and Python would give
    it the site's copies instead of the approved files (Flower puts the app folder
    first on ``sys.path``, but a module already imported wins).
    """
    shipped = {p.name.removesuffix(".py") for p in folder.iterdir()}
    for name in [m for m in sys.modules if m.split(".")[0] in packages]:
        if name.split(".")[0] in shipped:
            del sys.modules[name]
