"""What the command modules share: failing with a plain message, site YAML
arguments, the ``--dp-*`` options."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import typer

from shared_model.errors import ConfigError, MoeflError


def fail(error: MoeflError) -> NoReturn:
    """Print ``error`` (it already says what to fix) and exit with code 2."""
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(code=2)


def site_yamls(sites: list[Path], ctx: typer.Context) -> list[Path]:
    """``--sites a.yaml b.yaml ...``: the option's value plus the YAMLs after it."""
    extra = [Path(a) for a in ctx.args]
    if any(a.suffix not in (".yaml", ".yml") for a in extra):
        fail(MoeflError(f"unexpected arguments {ctx.args}; site configs end in .yaml"))
    return [*sites, *extra]


def yamls_in(paths: list[Path]) -> list[Path]:
    """Each path as given, or the ``*.yaml`` files of a folder (sorted)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob("*.yaml"))
            if not found:
                raise ConfigError(f"{p}: no site YAML (*.yaml) in this folder")
            out.extend(found)
        else:
            out.append(p)
    return out


def privacy_option(epsilon: float, delta: float, clip: float) -> dict[str, float]:
    """The ``privacy`` section for ``--dp-*`` options, checked like a site YAML's."""
    from client.data.privacy_config import parse_privacy

    problems: list[Any] = []
    raw = {"target_epsilon": epsilon, "delta": delta, "max_grad_norm": clip}
    if parse_privacy(raw, problems) is None:
        option = {
            "privacy.target_epsilon": "--dp-epsilon",
            "privacy.delta": "--dp-delta",
        }
        raise ConfigError(
            "; ".join(
                f"{option.get(p.where, '--dp-clip')}: {p.message}" for p in problems
            )
        )
    return raw


@contextmanager
def progress_bar() -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar on the terminal (nothing when output is not one):
    yields ``update(label, done, total)``; a new label starts a new bar."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TimeElapsedColumn,
    )

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done, total=total)

        yield update
