"""App pinning without a federation: the hash a site approves, the
``approved_apps`` key of the site YAML, and the checks inside the task process."""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import LaunchResultStatus

from client.data.site_config import load_site_config, parse_site_yaml
from client.node import app_pinning
from client.node.app_approval import (
    AppNotApprovedError,
    _Guard,
    app_files,
    app_hash,
    approved_apps,
    forget_modules,
)
from client.node.app_pinning import _module_with, _PinnedExecutor
from shared_model.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec.*")

HASH_A = "a" * 64
HASH_B = "0123456789abcdef" * 4


def write_app(folder: Path, body: str = "VALUE = 1\n") -> Path:
    (folder / "tinyapp").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "tinyapp"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "moefltest"\n\n'
        "[tool.flwr.app.components]\n"
        'serverapp = "tinyapp.apps:server"\nclientapp = "tinyapp.apps:client"\n'
    )
    (folder / "tinyapp" / "__init__.py").write_text("")
    (folder / "tinyapp" / "apps.py").write_text(body)
    return folder


def write_site(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "site.yaml"
    path.write_text(f"site_name: pinned\ndataset_dir: data\n{extra}")
    return path


# --- the hash a site approves ---------------------------------------------------


def test_app_hash_is_the_sha256_of_the_bundle_flwr_run_sends(tmp_path: Path) -> None:
    app = write_app(tmp_path / "app")
    digest = app_hash(app)
    assert digest == hashlib.sha256(build_fab_from_disk(app)).hexdigest()
    assert app_hash(app) == digest  # reproducible: fixed dates, sorted files
    fab = tmp_path / "app.fab"
    fab.write_bytes(build_fab_from_disk(app))
    assert app_hash(fab) == digest  # the folder and its .fab approve the same


def test_one_changed_byte_changes_the_hash(tmp_path: Path) -> None:
    a = app_hash(write_app(tmp_path / "a", "VALUE = 1\n"))
    b = app_hash(write_app(tmp_path / "b", "VALUE = 2\n"))
    assert a != b and len(a) == len(b) == 64


def test_app_files_lists_what_the_bundle_holds(tmp_path: Path) -> None:
    app = write_app(tmp_path / "app")
    files = {name: (digest, size) for name, digest, size in app_files(app)}
    assert set(files) == {"pyproject.toml", "tinyapp/__init__.py", "tinyapp/apps.py"}
    body = (app / "tinyapp" / "apps.py").read_bytes()
    assert files["tinyapp/apps.py"] == (hashlib.sha256(body).hexdigest(), len(body))


@pytest.mark.parametrize("kind", ["missing", "not_a_zip", "no_pyproject"])
def test_app_hash_errors_name_the_path(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "thing"
    if kind == "not_a_zip":
        path.write_bytes(b"print('hello')\n")
    elif kind == "no_pyproject":
        path.mkdir()
        (path / "x.py").write_text("")
    with pytest.raises(ConfigError, match=str(path)):
        app_hash(path)


# --- the `approved_apps` key -----------------------------------------------------


def test_approved_apps_are_read_from_the_site_yaml(tmp_path: Path) -> None:
    yaml_path = write_site(tmp_path, f'approved_apps:\n  - "{HASH_A}"\n  - {HASH_B}\n')
    assert load_site_config(yaml_path).approved_apps == (HASH_A, HASH_B)
    assert approved_apps(yaml_path) == (HASH_A, HASH_B)


@pytest.mark.parametrize("extra", ["", "approved_apps:\n", "approved_apps: []\n"])
def test_the_key_is_optional_but_pinning_needs_it(tmp_path: Path, extra: str) -> None:
    yaml_path = write_site(tmp_path, extra)
    assert load_site_config(yaml_path).approved_apps == ()
    with pytest.raises(ConfigError, match="approved_apps") as err:
        approved_apps(yaml_path)
    assert str(yaml_path) in str(err.value)


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (f'["{HASH_A.upper()}"]', "approved_apps[0]"),  # upper case
        (f'["{HASH_A}", "{HASH_A[:63]}"]', "approved_apps[1]"),  # 63 characters
        (f'["{HASH_A}z"]', "approved_apps[0]"),  # 65 characters
        (f'["{HASH_A[:63]}g"]', "approved_apps[0]"),  # not hex
        ("[12345]", "approved_apps[0]"),  # not a string
        (f'"{HASH_A}"', "approved_apps"),  # a string, not a list
    ],
)
def test_a_malformed_hash_is_an_error_naming_the_key(
    tmp_path: Path, value: str, key: str
) -> None:
    config, problems = parse_site_yaml(
        write_site(tmp_path, f"approved_apps: {value}\n")
    )
    assert config is None
    assert [p.where for p in problems] == [key]
    assert f"`{key}`" in problems[0].message and "app-hash" in problems[0].fix
    with pytest.raises(ConfigError, match=r"approved_apps"):
        approved_apps(tmp_path / "site.yaml")


# --- the checks inside the task process -------------------------------------------


class FakeInstall:
    def __init__(self) -> None:
        self.calls: list[tuple[bytes, Path]] = []

    def __call__(self, data: bytes, install_dir: Path, skip_prompt: bool) -> Path:
        self.calls.append((data, install_dir))
        folder = install_dir / "apps" / "x"
        folder.mkdir(parents=True)
        return folder


def test_an_unapproved_app_is_refused_before_it_is_unpacked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = b"the changed app"
    digest = hashlib.sha256(data).hexdigest()
    guard = _Guard(tmp_path / "site.yaml", frozenset({HASH_A}), tmp_path)
    install = FakeInstall()
    with (
        caplog.at_level(logging.ERROR, logger="client.node.app_pinning"),
        pytest.raises(AppNotApprovedError) as err,
    ):
        guard.install(install, data, skip_prompt=True)
    assert install.calls == []  # nothing unpacked
    assert digest in str(err.value) and HASH_A not in str(err.value)
    assert str(tmp_path) not in str(err.value)  # the reply names no site file
    (record,) = caplog.records
    assert "REFUSED" in record.getMessage() and digest in record.getMessage()
    assert HASH_A in record.getMessage() and "site.yaml" in record.getMessage()


def test_an_approved_app_is_unpacked_privately_and_only_it_is_loaded(
    tmp_path: Path,
) -> None:
    data = b"the approved app"
    digest = hashlib.sha256(data).hexdigest()
    guard = _Guard(tmp_path / "site.yaml", frozenset({digest}), tmp_path / "private")
    install = FakeInstall()
    folder = guard.install(install, data, Path("/somewhere/else"), skip_prompt=False)
    assert install.calls == [(data, tmp_path / "private")]
    loaded: list[Any] = []

    def real_get_loader(ref: str, app_path: str, multi_app: bool) -> Any:
        return lambda *run: loaded.append((app_path, multi_app, run)) or "app"

    load = guard.loader(real_get_loader, default_app_ref="", app_path=None)
    assert load("moefltest/tinyapp", "1.0.0", digest) == "app"
    assert loaded == [(str(folder), True, ("moefltest/tinyapp", "1.0.0", digest))]
    # a run whose hash claims other bytes than those checked is not loaded
    with pytest.raises(AppNotApprovedError):
        load("moefltest/tinyapp", "1.0.0", HASH_A)
    assert len(loaded) == 1


def test_the_app_gets_its_own_packages_not_this_processs_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moefl's app ships `client` and `shared_model`, already imported here."""
    (tmp_path / "pinfake").mkdir()
    (tmp_path / "other.py").write_text("")
    for name in ("pinfake", "pinfake.sub", "pinkept", "other"):
        monkeypatch.setitem(sys.modules, name, ModuleType(name))
    forget_modules(tmp_path, packages=("pinfake", "pinkept", "other"))
    assert "pinfake" not in sys.modules and "pinfake.sub" not in sys.modules
    assert "other" not in sys.modules  # a top-level module file counts too
    assert "pinkept" in sys.modules  # the app does not ship it


def test_flower_internals_that_are_hooked_exist() -> None:
    """If a Flower update renames them, pinning refuses to start (fails closed)."""
    _module_with(app_pinning._CLIENTAPP_MODULE, app_pinning._CLIENTAPP_HOOKS)
    _module_with(app_pinning._SUPEREXEC_MODULE, ("run_superexec", "get_executor"))
    with pytest.raises(ConfigError, match="flwr 1.42"):
        _module_with(app_pinning._CLIENTAPP_MODULE, ("no_such_function",))


def test_the_launcher_takes_and_launches_clientapp_tasks_only(tmp_path: Path) -> None:
    executor = _PinnedExecutor(tmp_path / "site.yaml")
    eligible, _ = executor.get_eligible_capacity(set(TaskType), insecure=True)
    assert eligible == {TaskType.CLIENT_APP}
    spec = SimpleNamespace(task_type=TaskType.AGENT_APP, task_id=7)
    assert executor.launch(spec).status == LaunchResultStatus.FAILED
    assert executor.children == []  # nothing was started
