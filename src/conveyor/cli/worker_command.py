"""`conveyor worker MODULE:ATTR`: import a Worker from user code and run it until signalled.

The command's flags override the Worker's own settings: servers, concurrency, the deadline
of its calls, and the address of its Prometheus metrics endpoint.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import sysconfig
import traceback
from pathlib import Path
from typing import Final

import click

import conveyor
from conveyor.cli.gc_policy import tune_for_long_running_process
from conveyor.cli.params import BoundedFloat
from conveyor.cli.stop_signals import StopSignal, raise_on_stop_signals
from conveyor.errors import ConfigError
from conveyor.protocol.limits import LONGEST_CALL_TIMEOUT, MAX_PORT
from conveyor.worker.runtime import (
    MAX_CONCURRENCY,
    SHORTEST_CALL_TIMEOUT,
    Worker,
    describe_error,
)

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
    # Any BaseException but an interrupt (a stop signal is one): a module calling
    # sys.exit() as it is imported (an argparse run at import time) ended the command
    # silently, with the module's status, and asyncio.CancelledError or a library's own
    # BaseException was a traceback.
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise ConfigError(_import_failure(module_name, exc)) from exc
    try:
        found = getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(found, Worker):
        raise ConfigError(f"{spec} is a {type(found).__name__}, not a conveyor.Worker")
    return found


def _import_failure(module_name: str, exc: BaseException) -> str:
    """Why `module_name` could not be imported, in one line naming the file:line at fault.

    No traceback: the error is in the user's module (or in one it imports), whose file and
    line say where to look; the frames of importlib and of this command would say nothing.
    A module that is simply not there has no file to name.
    """
    if isinstance(exc, ModuleNotFoundError) and exc.name is not None:
        missing = exc.name
        if module_name == missing or module_name.startswith(f"{missing}."):
            return f"cannot import {module_name!r}: {exc}"
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f"{_shown(exc.filename)}:{exc.lineno}"
        what = f"{type(exc).__name__}: {exc.msg}"
    else:
        frames = [
            frame
            for frame in traceback.extract_tb(exc.__traceback__)
            if not frame.filename.startswith("<")
            and Path(frame.filename) != Path(__file__)
            and Path(frame.filename).parent != Path(importlib.__file__).parent
        ]
        # The innermost frame of the user's own code: an error raised inside the standard
        # library or Conveyor (json.loads, Worker() reading a token file) named that
        # library's file, not the line of the user's module that called it.
        own = [frame for frame in frames if not _library_file(frame.filename)]
        at = (own or frames)[-1] if frames else None
        where = f"{_shown(at.filename)}:{at.lineno}" if at is not None else ""
        # An exception whose message cannot be read was a traceback of this command.
        what = describe_error(exc)
    return f"cannot import {module_name!r}: {what}" + (f" (at {where})" if where else "")


def _library_file(filename: str) -> bool:
    """Whether `filename` is the standard library's, an installed package's or Conveyor's."""
    path = Path(filename).resolve()
    return any(path.is_relative_to(directory) for directory in _LIBRARY_DIRECTORIES)


# Where library code lives: the standard library, installed packages, and Conveyor itself
# (which an editable install keeps outside site-packages).
_LIBRARY_DIRECTORIES: Final = tuple(
    {
        *(
            Path(sysconfig.get_paths()[name]).resolve()
            for name in ("stdlib", "platstdlib", "purelib", "platlib")
        ),
        Path(conveyor.__file__).resolve().parent,
    }
)


def _shown(filename: str) -> str:
    """`filename` relative to the current directory when it is under it (shorter to read)."""
    path = Path(filename)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return filename


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
    type=click.IntRange(min=1, max=MAX_CONCURRENCY),
    default=None,
    help="Most tasks in flight (overrides the Worker's).",
)
@click.option(
    "--call-timeout",
    # The Worker's own bounds: a value it would refuse is a usage error naming the flag.
    type=BoundedFloat(
        min=SHORTEST_CALL_TIMEOUT.total_seconds(), max=LONGEST_CALL_TIMEOUT.total_seconds()
    ),
    default=None,
    envvar="CONVEYOR_WORKER_CALL_TIMEOUT",
    metavar="SECONDS",
    help="Deadline of each call to a server (default 10; overrides the Worker's). "
    "Shorter fails over sooner, longer suits a slow link.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=MAX_PORT),
    default=None,
    envvar="CONVEYOR_WORKER_METRICS_PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port, logged).",
)
@click.option(
    "--metrics-host",
    default=None,
    envvar="CONVEYOR_WORKER_METRICS_HOST",
    metavar="HOST",
    help="Address of the metrics endpoint (default 127.0.0.1; 0.0.0.0 for every interface).",
)
def worker(
    spec: str,
    server: str | None,
    concurrency: int | None,
    call_timeout: float | None,
    metrics_port: int | None,
    metrics_host: str | None,
) -> None:
    """Run the Worker at MODULE:ATTR until SIGINT, SIGTERM or SIGHUP, then stop gracefully."""
    # While the module imports (an application's imports can take seconds), a stop signal
    # ends the command as a stop: status 0, as once the worker runs (`Worker.run` takes the
    # signals over). Nothing has started yet, so there is nothing to stop.
    raise_on_stop_signals()
    try:
        found = load_worker(spec)
        found.configure(
            server=server,
            concurrency=concurrency,
            call_timeout=call_timeout,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
        )
        tune_for_long_running_process()
    except StopSignal as stop:
        log.info(
            "received %s while loading %s: exiting",
            signal.Signals(stop.signum).name,
            spec,
            extra={"event": "stopped_while_starting"},
        )
        return
    found.run()
    stuck = found.busy_threads()
    if stuck:
        # Their tasks were handed back or reported; only the threads remain. Python cannot
        # kill a thread, and waiting could be forever.
        log.warning(
            "exiting with %d sync handler(s) still running; their leases are settled",
            stuck,
            extra={"event": "exit_with_busy_threads", "worker_id": found.worker_id},
        )
        logging.shutdown()
        os._exit(0)
