"""Coordinator commands: the SuperLink's certificates, a run's report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import fail
from shared_model.errors import ConfigError, MoeflError


def certs(
    out: Annotated[
        Path, typer.Argument(help="Folder for ca.crt, ca.key, server.pem, server.key.")
    ],
    host: Annotated[
        list[str],
        typer.Option("--host", help="IP or DNS name of the SuperLink (repeat)."),
    ] = ["127.0.0.1", "localhost"],  # noqa: B006
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
) -> None:
    """Coordinator: a CA and the SuperLink's TLS certificate."""
    from server.deploy import make_certificates

    try:
        paths = make_certificates(out, hosts=host, days=days)
    except MoeflError as e:
        fail(e)
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")
    typer.echo(f"give {paths['ca_cert']} to every site; keep {paths['ca_key']} offline")


def report(
    run_dir: Annotated[Path, typer.Argument(help="A federated run folder.")],
    compare: Annotated[
        list[str],
        typer.Option(
            "--compare",
            help="NAME=FOLDER of another model's `moefl evaluate` output (repeat).",
        ),
    ] = [],  # noqa: B006
) -> None:
    """Write report.md and report.html (with PNG figures) into a run folder."""
    from server.report import build_report

    try:
        comparators = {}
        for item in compare:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                raise ConfigError(f"--compare {item!r}: expected NAME=FOLDER")
            comparators[name] = Path(folder)
        md, page = build_report(run_dir, comparators)
    except MoeflError as e:
        fail(e)
    typer.echo(f"wrote {md} and {page}")
