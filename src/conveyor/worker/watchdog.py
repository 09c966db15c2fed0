"""LoopWatchdog: notices when the worker's event loop is blocked, and says so.

An `async def` handler that calls blocking code (time.sleep, a sync HTTP client, heavy CPU)
stops the whole event loop: no other handler runs and no heartbeat goes out, so the server
eventually marks the worker lost. Plain `def` handlers doing heavy CPU work starve it too,
when there are many: they run on threads that share the interpreter lock (the GIL) with
the loop, which then gets it too rarely for a heartbeat to get through (64 of them on 2
cores lost a worker its leases in a review). The warning says which of the two it is.

This thread measures how late the loop runs a scheduled callback; when that exceeds
`warn_after` it logs a warning from outside the loop (the loop cannot log while blocked),
and the worst lag since the last heartbeat is reported to the
server with the next heartbeat, where `conveyor workers` shows it. Each measurement also
goes to an optional `on_lag` callback (the worker's lag gauge), and, while the loop stays
blocked, the time blocked so far, so a scrape during the block already shows it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

log = logging.getLogger("conveyor.worker.watchdog")

DEFAULT_PERIOD: Final = 0.5
DEFAULT_WARN_AFTER: Final = 1.0


class LoopWatchdog:
    """Probes an event loop from a daemon thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        period: float = DEFAULT_PERIOD,
        warn_after: float = DEFAULT_WARN_AFTER,
        on_lag: Callable[[float], None] | None = None,
        sync_handlers_running: Callable[[], int] | None = None,
    ) -> None:
        """Nothing runs until `start`.

        `sync_handlers_running`: how many plain `def` handlers run now, for the warning.
        """
        self._loop = loop
        self._sync_running = sync_handlers_running
        self._period = period
        self._warn_after = warn_after
        self._on_lag = on_lag
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._max_lag = 0.0
        # The thread runs in a copy of its creator's context, so its warnings carry the
        # worker's log fields (worker_id) like the loop's own lines.
        self._thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._run,),
            name="conveyor-loop-watchdog",
            daemon=True,
        )

    def start(self) -> None:
        """Start probing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop probing (returns at once; the thread ends within one period)."""
        self._stopping.set()

    def take_max_lag_ms(self) -> int:
        """The worst lag seen since the previous call, in milliseconds (then reset)."""
        with self._lock:
            lag, self._max_lag = self._max_lag, 0.0
        return int(lag * 1000)

    def _run(self) -> None:
        while not self._stopping.wait(self._period):
            probe = threading.Event()
            sent = time.monotonic()
            try:
                self._loop.call_soon_threadsafe(probe.set)
            except RuntimeError:  # the loop is closed: the worker is gone
                return
            warned = False
            while not probe.wait(self._warn_after):
                if self._stopping.is_set():
                    return
                self._report(time.monotonic() - sent)
                if not warned:
                    self._warn_blocked(time.monotonic() - sent)
                    warned = True
            lag = time.monotonic() - sent
            with self._lock:
                self._max_lag = max(self._max_lag, lag)
            self._report(lag)
            if warned:
                with contextlib.suppress(Exception):
                    log.warning(
                        "the worker's event loop ran again after %.1fs blocked",
                        lag,
                        extra={"event": "event_loop_unblocked"},
                    )

    def _warn_blocked(self, blocked: float) -> None:
        running = self._sync_running() if self._sync_running is not None else 0
        if running > 1:
            log.warning(
                "the worker's event loop has been starved for %.1fs while %d plain def "
                "handlers run: CPU-bound handlers share the interpreter lock (GIL) with the "
                "loop, and heartbeats cannot go out meanwhile (past --worker-lost-after the "
                "worker is marked lost and its tasks run again); run fewer of them per "
                "process (a lower concurrency, more worker processes), or do the CPU work "
                "in a subprocess",
                blocked,
                running,
                extra={"event": "event_loop_blocked"},
            )
            return
        log.warning(
            "the worker's event loop has been blocked for %.1fs: an async handler is "
            "running blocking code (make it a plain def handler, or await a non-blocking "
            "call); heartbeats cannot go out meanwhile",
            blocked,
            extra={"event": "event_loop_blocked"},
        )

    def _report(self, lag: float) -> None:
        if self._on_lag is not None:
            with contextlib.suppress(Exception):  # a broken callback must not stop the probes
                self._on_lag(lag)
