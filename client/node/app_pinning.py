"""App pinning: a site runs only the Flower app versions it has approved.

This module is the launcher; the hash, the approved list and the checks in the
task process are in :mod:`client.node.app_approval`.

A SuperNode executes whatever app (FAB: a zip of Python code) the SuperLink hands
it, next to the site's patients. Flower 1.42's only built-in gate,
``flower-supernode --trusted-entities``, accepts only FABs signed through Flower
Hub; a FAB sent by ``flwr run .`` carries no signature and is always refused. So
the site runs this gate itself, on Flower's ``--isolation process`` mode, in which
the SuperNode starts no app process and waits for a site-run SuperExec instead:

* :func:`run_pinned_clientapp` is that SuperExec (Flower's own loop), except that
  it takes only ClientApp tasks and runs each (:func:`run_pinned_task`) in a
  process forked from a warm fork server instead of a fresh ``flwr-clientapp``.
* The task is Flower's ``run_clientapp`` with two hooks (:class:`_Guard`). Before
  the FAB is unpacked, the SHA-256 of its bytes must be in the site YAML's
  ``approved_apps`` (re-read for every task: removing a hash takes effect at the
  next message). Otherwise the refused hash and the approved list are logged here,
  the coordinator gets an error reply, and nothing of the app is unpacked or run.
  An approved FAB is unpacked into a fresh private folder and only that folder is
  loaded, so nothing left in ``$FLWR_HOME/apps`` can stand in for it.

:func:`app_hash` gives the hash to approve: the SHA-256 of the bytes ``flwr run``
sends for an app folder (built by Flower's own builder), or of a ``.fab`` file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from flwr.supercore.auth import load_superexec_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supercore.version import package_version

from client.node.app_approval import AppNotApprovedError as AppNotApprovedError
from client.node.app_approval import _Guard, app_files, app_hash, approved_apps
from shared_model.errors import ConfigError, MoeflError

_MODULE = "client.node.app_pinning"
log = logging.getLogger(_MODULE)  # the same name when run as `python -m`

DEFAULT_RUNTIME_API_ADDRESS = "127.0.0.1:9094"
"""Where ``flower-supernode`` serves its Runtime API unless given ``--port``."""
_CLIENTAPP_MODULE = "flwr.supernode.runtime.run_clientapp"
_CLIENTAPP_HOOKS = ("run_clientapp", "install_from_fab", "get_load_client_app_fn")
_SUPEREXEC_MODULE = "flwr.supercore.superexec.run_superexec"
TASK_POLL_INTERVAL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's, in seconds


def _module_with(name: str, attributes: Sequence[str]) -> Any:
    """Import a Flower module, failing closed if it lacks what we hook."""
    module = importlib.import_module(name)
    missing = [a for a in attributes if not hasattr(module, a)]
    if missing:
        raise ConfigError(
            f"flwr {package_version}: {name} has no {', '.join(missing)}; "
            "client/node/app_pinning.py was written for flwr 1.42 and refuses to start "
            "rather than run apps unchecked: install flwr 1.42.* or update it"
        )
    return module


@contextlib.contextmanager
def _patched(module: Any, **replacements: Any) -> Iterator[None]:
    """Replace module attributes for the duration of the block, then restore."""
    saved = {name: getattr(module, name) for name in replacements}
    for name, value in replacements.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def run_pinned_task(
    site_yaml: Path,
    runtime_api_address: str,
    token: str,
    *,
    insecure: bool = False,
    root_certificates: Path | None = None,
    parent_pid: int | None = None,
) -> None:
    """Run one ClientApp task as ``flwr-clientapp`` would, if its app is approved.

    Started by :func:`run_pinned_clientapp` for each task. A site YAML that has
    become invalid refuses the app (with a reply to the coordinator) rather than
    leaving the task to time out. Runtime dependency installation stays off: the
    app runs on the packages the site installed, not on ones it fetches.
    """
    root = str(root_certificates) if root_certificates else None
    try:
        approved = frozenset(approved_apps(site_yaml))
    except ConfigError as e:
        log.error("%s; refusing every app until this is fixed", e)
        approved = frozenset()
    module = _module_with(_CLIENTAPP_MODULE, _CLIENTAPP_HOOKS)
    install_root = Path(tempfile.mkdtemp(prefix="moefl-pinned-app-"))
    guard = _Guard(Path(site_yaml), approved, install_root)
    hooks = {
        "install_from_fab": functools.partial(guard.install, module.install_from_fab),
        "get_load_client_app_fn": functools.partial(
            guard.loader, module.get_load_client_app_fn
        ),
    }
    try:
        with _patched(module, **hooks):
            module.run_clientapp(
                runtime_api_address=runtime_api_address,
                token=token,
                insecure=insecure,
                certificates=validate_and_resolve_root_certificates(root, insecure),
                parent_pid=parent_pid,
                runtime_dependency_install=False,
            )
    finally:
        shutil.rmtree(install_root, ignore_errors=True)


PRELOAD = (
    "numpy",
    "torch",
    "torch._dynamo",  # imported by the first optimizer a task builds (0.65 s)
    "monai",
    "monai.networks.nets",
    "monai.transforms",
    "monai.inferers",
    "opacus",
    "nibabel",
    "safetensors.torch",
    "sklearn.linear_model",
    "scipy.stats",
    _CLIENTAPP_MODULE,
)
"""Third-party modules the fork server imports once, so a task process starts
with them loaded (about 4 s a message on two cores otherwise). None of the app's
own modules is among them: each task still loads those from its approved FAB."""


def _task_process(**kwargs: Any) -> None:
    """One task, in a process forked from the fork server (:class:`_PinnedExecutor`)."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    t0 = time.perf_counter()
    try:
        run_pinned_task(**kwargs)
    finally:
        log.info("task process done in %.1f s", time.perf_counter() - t0)


class _PinnedExecutor:
    """Flower's ``Executor`` protocol: start our task process for ClientApps only.

    Each task runs in a process forked from a fork server (``multiprocessing``'s
    ``forkserver``, started at the first task) that has imported :data:`PRELOAD`:
    the task skips the import of PyTorch, MONAI and Flower, and still loads the
    app's own code from its approved FAB (:func:`run_pinned_task`). Other task
    types (an AgentApp run, say) are never taken from the SuperNode, and refused
    if offered: they would run app code without the check.
    """

    def __init__(self, site_yaml: Path) -> None:
        self.site_yaml = site_yaml
        self.children: list[Any] = []
        self.context: Any = None  # the fork server's, made at the first task

    def get_eligible_capacity(
        self, supported_task_types: set[Any], **_: Any
    ) -> tuple[set[Any], set[str]]:
        return {t for t in supported_task_types if t == TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, *_: Any, **__: Any) -> None:
        """A local process needs no capacity wait."""

    def close(self) -> None:
        """Task processes end on their own when this process ends (parent pid)."""

    def launch(self, spec: Any) -> Any:
        if spec.task_type != TaskType.CLIENT_APP:
            log.error("task %d: refused a %s task", spec.task_id, spec.task_type)
            return LaunchResult.failed("app pinning runs ClientApps only")
        kwargs = {
            "site_yaml": self.site_yaml,
            "runtime_api_address": spec.runtime_api_address,
            "token": spec.token,
            "insecure": bool(spec.insecure),
            "root_certificates": None
            if spec.insecure or spec.root_certificates_path is None
            else Path(spec.root_certificates_path),
            "parent_pid": spec.parent_pid,
        }
        log.info("task %d: pinned ClientApp for app %s", spec.task_id, spec.fab_hash)
        if self.context is None:
            self.context = multiprocessing.get_context("forkserver")
            self.context.set_forkserver_preload(list(PRELOAD))
        child = self.context.Process(target=_task_process, kwargs=kwargs)
        child.start()
        self.children.append(child)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished task processes (called between polls)."""
        self.children = [c for c in self.children if c.is_alive()]


def run_pinned_clientapp(
    site_yaml: Path,
    runtime_api_address: str = DEFAULT_RUNTIME_API_ADDRESS,
    *,
    insecure: bool = False,
    root_certificates: Path | None = None,
    superexec_auth_secret_file: Path | None = None,
) -> None:
    """Serve a ``flower-supernode --isolation process`` with pinned ClientApps.

    The site runs this in place of ``flower-superexec``, next to its SuperNode,
    until stopped (SIGTERM or Ctrl-C). It checks the site YAML and this Flower
    version before taking any task, so a mistake stops it at start, not mid-run.

    Args:
        site_yaml: The site YAML; its ``approved_apps`` lists the hashes to run.
        runtime_api_address: The SuperNode's Runtime API (its ``--host:--port``).
        insecure: Plain HTTP to the Runtime API (it listens on 127.0.0.1).
        root_certificates: CA of the Runtime API's certificate, if it uses TLS.
        superexec_auth_secret_file: The file also given to the SuperNode as
            ``--superexec-auth-secret-file`` (experimental in Flower), so that only
            this process can take its tasks.

    Raises:
        ConfigError: invalid YAML, no approved app, unreadable secret, or a Flower
            version whose internals this module does not know.
    """
    site_yaml = Path(site_yaml).resolve()
    approved = approved_apps(site_yaml)
    _module_with(_CLIENTAPP_MODULE, _CLIENTAPP_HOOKS)  # fail at start, not per task
    superexec = _module_with(_SUPEREXEC_MODULE, ("run_superexec", "get_executor"))
    secret = None
    if superexec_auth_secret_file is not None:
        try:
            secret = load_superexec_auth_secret(str(superexec_auth_secret_file))
        except ValueError as e:
            raise ConfigError(
                f"{superexec_auth_secret_file}: {e}; give the file the SuperNode "
                "was started with (--superexec-auth-secret-file)"
            ) from e
    log.info("app pinning (%s): approved apps: %s", site_yaml, ", ".join(approved))
    # Ask the SuperNode (127.0.0.1) for tasks every 0.1 s rather than Flower's 1 s.
    os.environ.setdefault(TASK_POLL_INTERVAL_ENV, "0.1")
    executor = _PinnedExecutor(site_yaml)
    root = str(root_certificates) if root_certificates else None
    with _patched(superexec, get_executor=lambda *_, **__: executor):
        superexec.run_superexec(
            runtime_api_address=runtime_api_address,
            insecure=insecure,
            root_certificates_path=root,
            superexec_auth_secret=secret,
            runtime_dependency_install=False,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m client.node.app_pinning hash|launch|task``: usable before the CLI."""
    parser = argparse.ArgumentParser(prog=f"python -m {_MODULE}", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    hash_cmd = sub.add_parser("hash", help="print the hash a site approves for an app")
    hash_cmd.add_argument("app", type=Path, help="app folder or .fab file")
    hash_cmd.add_argument("--files", action="store_true", help="also list its files")
    for name in ("launch", "task"):  # task: internal, one task (started by launch)
        cmd = sub.add_parser(name)
        cmd.add_argument("--site-config", dest="site_yaml", type=Path, required=True)
        cmd.add_argument("--runtime-api-address", default=DEFAULT_RUNTIME_API_ADDRESS)
        cmd.add_argument("--insecure", action="store_true")
        cmd.add_argument("--root-certificates", type=Path)
        if name == "launch":
            cmd.add_argument("--superexec-auth-secret-file", type=Path)
        else:
            cmd.add_argument("--token", required=True)
            cmd.add_argument("--parent-pid", type=int)
    kwargs = vars(parser.parse_args(argv))
    command = kwargs.pop("command")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # Flower's loggers keep their own handlers
    try:
        if command == "hash":
            sys.stdout.write(app_hash(kwargs["app"]) + "\n")
            if kwargs["files"]:
                for name, digest, size in app_files(kwargs["app"]):
                    sys.stdout.write(f"  {digest}  {size:>9}  {name}\n")
        elif command == "launch":
            run_pinned_clientapp(**kwargs)
        else:
            run_pinned_task(**kwargs)
    except MoeflError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    # Run the importable module, not a `__main__` copy: the refusal then names
    # `client.node.app_pinning.AppNotApprovedError` in the coordinator's error reply.
    from client.node.app_pinning import main as _main

    sys.exit(_main())
