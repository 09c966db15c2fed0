"""How the CLI's commands take the signals that ask a process to stop: SIGINT, SIGTERM, SIGHUP.

All three ask for the same graceful stop. SIGHUP is what a closed terminal or a dropped SSH
session sends: by default it kills a process outright, which left `conveyor dev`'s
PostgreSQL running and a worker's tasks to come back `lease_expired`. Before an event loop
takes the signals over (`conveyor dev` and `conveyor server` while they start PostgreSQL,
`conveyor migrate`), the first stop signal raises `StopSignal`, so that the `finally`
blocks stop what was started; later ones are ignored, so that they do not cut that cleanup
short in turn. The exit statuses this leads to are in docs/getting-started.md.
"""

from __future__ import annotations

import signal
from typing import Final

STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignal(KeyboardInterrupt):
    """A stop signal came while a command was not ready to stop gracefully: unwind."""

    def __init__(self, signum: int) -> None:
        """`signum`: the signal that came (its exit status is 128 + signum)."""
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_on_stop_signals() -> None:
    """The first SIGINT, SIGTERM or SIGHUP raises StopSignal in the main thread; others do not.

    An event loop's own handlers (`loop.add_signal_handler`) replace these while it runs.
    """
    raised = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise StopSignal(signum)

    for sig in stop_signals_taken():
        signal.signal(sig, on_signal)


def stop_signals_taken() -> tuple[signal.Signals, ...]:
    """The stop signals a command takes: those not ignored when it starts.

    `nohup` (SIGHUP) and a shell's background job (SIGINT) start a process with the signal
    ignored, and ask it to keep it so, as Python itself does for SIGINT: the worker used to
    stop at the SIGHUP nohup was meant to shield it from.
    """
    return tuple(sig for sig in STOP_SIGNALS if signal.getsignal(sig) != signal.SIG_IGN)


def ignore_stop_signals() -> None:
    """While stopping what was started: a signal must not interrupt that.

    A Python handler, not SIG_IGN, which the programs run meanwhile (pg_ctl) would inherit.
    """
    for sig in stop_signals_taken():
        signal.signal(sig, _ignore)


def _ignore(_signum: int, _frame: object) -> None:
    """Ignore the signal."""
