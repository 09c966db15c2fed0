"""HandlerThreads: the daemon threads a worker runs its sync handlers on.

A sync handler cannot be interrupted; one that ignores `ctx.cancelled` runs on after its
task was handed back at the drain. `concurrent.futures.ThreadPoolExecutor` joins its
threads when the interpreter exits, so such a handler kept a program that embeds a worker
(`worker.run()` returns after its drain) from exiting for as long as it ran: for ever, for
one that never returns. These threads are daemons, reused like a pool's and never more
than `max_threads`: the process exits without them, as `conveyor worker` always did.

They share the interpreter's lock (the GIL) with the worker's event loop, which sends the
heartbeats. Python hands the lock to a waiting thread every switch interval (5 ms by
default), and the waiter that gets it is any of them: with dozens of handlers doing
pure-Python work, a thread waking from a wait (the loop after its poll, gRPC's) went seconds
without it, and the worker, silent, was marked lost and its tasks ran again (64 such
handlers: no heartbeat for over 10 s). So the first handler thread lowers the interval to
`SWITCH_INTERVAL` for the process, unless it is lower already: the loop's heartbeats then
go out, up to about 5 s late on a loaded machine (3.3-5 s apart with a 3 s interval, same
test), for 0-3 % less pure-Python throughput when threads contend, and nothing when they
do not (docs/operations.md, "Sizing concurrency").
"""

from __future__ import annotations

import queue
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

Result = TypeVar("Result")

# Seconds; see the module's docstring.
SWITCH_INTERVAL: Final = 0.0005


@dataclass(eq=False, slots=True)
class _Work:
    future: Future[Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...]

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.fn(*self.args)
        except BaseException as exc:  # SystemExit too: the attempt fails, not the thread
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


class HandlerThreads:
    """Runs functions on up to `max_threads` daemon threads, started as they are needed."""

    def __init__(self, max_threads: int, name_prefix: str) -> None:
        """No thread starts before the first `submit`."""
        self._max_threads = max_threads
        self._name_prefix = name_prefix
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        # Released by a thread each time it finishes a function: a thread free to take
        # the next one exists when it can be acquired.
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads = 0
        self._closed = False
        # Functions running now: the watchdog names them when the event loop starves.
        self.running = 0

    def submit(self, fn: Callable[..., Result], /, *args: Any) -> Future[Result]:
        """Run `fn(*args)` on one of the threads; its future."""
        future: Future[Result] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the handler threads are shut down")
            self._work.put(_Work(future, fn, args))
            if not self._idle.acquire(blocking=False) and self._threads < self._max_threads:
                if not self._threads and sys.getswitchinterval() > SWITCH_INTERVAL:
                    sys.setswitchinterval(SWITCH_INTERVAL)
                self._threads += 1
                threading.Thread(
                    target=self._serve, name=f"{self._name_prefix}_{self._threads}", daemon=True
                ).start()
        return future

    def shutdown(self) -> None:
        """Cancel what has not started; without waiting, end each thread once it is free."""
        with self._lock:
            self._closed = True
            threads = self._threads
        while True:
            try:
                work = self._work.get_nowait()
            except queue.Empty:
                break
            if work is not None:
                work.future.cancel()
        for _ in range(threads):
            self._work.put(None)

    def _serve(self) -> None:
        while (work := self._work.get()) is not None:
            with self._lock:
                self.running += 1
            try:
                work.run()
            finally:
                with self._lock:
                    self.running -= 1
            # Not kept while waiting: it holds the handler's payload and result.
            del work
            self._idle.release()
