"""`conveyor worker MODULE:ATTR`: import a Worker from user code and run it until signalled."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import click

from conveyor.errors import ConfigError
from conveyor.worker.runtime import Worker

log = logging.getLogger("conveyor.cli.worker")


def load_worker(spec: str) -> Worker:
    """Import `module:attribute` and check that it is a Worker."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(
            f"expected MODULE:ATTRIBUTE (for example myapp.tasks:worker), got {spec!r}"
        )
    # Like `python -m`, find modules in the current directory.
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from exc
    try:
        found = getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(found, Worker):
        raise ConfigError(f"{spec} is a {type(found).__name__}, not a conveyor.Worker")
    return found


@click.command()
@click.argument("spec", metavar="MODULE:ATTR")
@click.option(
    "--server",
    envvar="CONVEYOR_SERVER",
    default=None,
    metavar="ADDR",
    help="Server address(es), comma separated (overrides the Worker's).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="Most tasks in flight (overrides the Worker's).",
)
def worker(spec: str, server: str | None, concurrency: int | None) -> None:
    """Run the Worker at MODULE:ATTR until SIGINT or SIGTERM, then stop gracefully."""
    found = load_worker(spec)
    found.configure(server=server, concurrency=concurrency)
    found.run()
    stuck = found.busy_threads()
    if stuck:
        # Their tasks were handed back or reported; only the threads remain. Python cannot
        # kill a thread, and waiting could be forever.
        log.warning(
            "exiting with %d sync handler(s) still running; their leases are settled", stuck
        )
        logging.shutdown()
        os._exit(0)
