"""The ``moefl`` command line: thin wrappers over functions that tests call.

Each command parses its arguments, calls one library function, prints the
result and exits non-zero on failure. A :class:`MoeflError` is printed as a
plain message (no traceback): it already says what to fix. The commands live
by owner: :mod:`cli.site`, :mod:`cli.scoring` and :mod:`cli.site_deploy` (a
hospital), :mod:`cli.coordinator`, and :mod:`cli.simulation` (a researcher on
one machine).
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from cli import coordinator, scoring, simulation, site, site_deploy

app = typer.Typer(
    help="Federated UNet-MoE-Cli: synthetic cohorts, site checks, training, simulation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXTRA_ARGS = {"allow_extra_args": True}  # `--sites a.yaml b.yaml ...`


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


app.command()(simulation.synth)
app.command()(site.check)
app.command(context_settings=EXTRA_ARGS)(site.train)
app.command()(site.pretrain)
app.command("import-msd")(site.import_msd_cmd)
app.command()(scoring.predict)
app.command("evaluate", context_settings=EXTRA_ARGS)(scoring.evaluate_cmd)
app.command()(coordinator.report)
app.command()(simulation.simulate)
app.command()(coordinator.certs)
app.command()(site_deploy.site_key)
app.command("app-hash")(site_deploy.app_hash_cmd)
app.command("pinned-clientapp")(site_deploy.pinned_clientapp_cmd)
app.command()(simulation.demo)
app.command()(simulation.plan)


if __name__ == "__main__":  # pragma: no cover
    app()
