"""A site's deployment commands: its authentication key, the hash of an app
it approves, and the pinned launcher that runs only approved apps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import fail
from shared_model.errors import MoeflError


def site_key(
    out: Annotated[Path, typer.Argument(help="Folder for <site>.key and <site>.pub.")],
    site: Annotated[str, typer.Argument(help="The site's name (as in its YAML).")],
) -> None:
    """Site: an authentication key pair (send only the .pub to the coordinator)."""
    from server.deploy import make_site_key

    try:
        private, public = make_site_key(out, site)
    except MoeflError as e:
        fail(e)
    typer.echo(
        f"wrote {private} (keep it on this site) and {public} (send to the coordinator)"
    )


def app_hash_cmd(
    app_path: Annotated[
        Path,
        typer.Argument(help="An app folder (as given to `flwr run`) or a .fab file."),
    ],
    files: Annotated[
        bool,
        typer.Option(
            "--files", help="Also list the bundled files (sha256, bytes, path)."
        ),
    ] = False,
) -> None:
    """Site: the SHA-256 to approve for an app (`approved_apps` in the site YAML)."""
    from client.node.app_approval import app_files, app_hash

    try:
        typer.echo(app_hash(app_path))
        if files:
            for name, digest, size in app_files(app_path):
                typer.echo(f"  {digest}  {size:>9}  {name}")
    except MoeflError as e:
        fail(e)


def pinned_clientapp_cmd(
    site_yaml: Annotated[
        Path,
        typer.Argument(help="The site YAML; `approved_apps` lists the apps to run."),
    ],
    runtime_api_address: Annotated[
        str, typer.Option(help="The SuperNode's Runtime API (its --host:--port).")
    ] = "127.0.0.1:9094",
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plain HTTP to the local Runtime API.")
    ] = False,
    root_certificates: Annotated[
        Path | None, typer.Option(help="CA of the Runtime API's TLS certificate.")
    ] = None,
    superexec_auth_secret_file: Annotated[
        Path | None,
        typer.Option(
            help="The secret file also given to the SuperNode, so that only this "
            "process takes its tasks."
        ),
    ] = None,
) -> None:
    """Site: serve `flower-supernode --isolation process`, running only approved apps."""
    from client.node.app_pinning import run_pinned_clientapp

    try:
        run_pinned_clientapp(
            site_yaml,
            runtime_api_address,
            insecure=insecure,
            root_certificates=root_certificates,
            superexec_auth_secret_file=superexec_auth_secret_file,
        )
    except MoeflError as e:
        fail(e)
