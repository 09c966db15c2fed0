"""Task wake-ups: a LISTEN connection plus an in-process broadcast that long polls wait on.

Enqueues (and releases) send one payload-free `NOTIFY conveyor_task_ready` per commit.
Every server LISTENs on a dedicated connection and, on each notification, wakes every
`LeaseTasks` call waiting in this process, so a new task starts within milliseconds on
whichever worker polls first. When the LISTEN connection is lost, long polls fall back to
polling every `poll_interval` until it is re-established; no wake-up is ever required for
correctness, only for latency.

Retries are the exception to "no wake-up is required": a retry waits out its backoff as
`scheduled`, out of the queue, until something promotes it (migration 0015). `wake_after`
arms a timer for the end of a backoff that runs `promote_due` (the server's: move the due
tasks into the queue and NOTIFY the other servers) and wakes the local polls only once
that has committed. The leader runs the same at every reaper round, for the timers of a
server that died.

States of the listener:

    disconnected --connect ok--> listening --connection lost--> disconnected (retry, backoff)
         any state --stop()--> stopped
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from conveyor.server.database import UNAVAILABLE_ERRORS
from conveyor.storage import queries

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Container, Iterable, Mapping

log = logging.getLogger("conveyor.server.notifier")

CHANNEL: Final = "conveyor_task_ready"
# Scheduled wake-ups (retries' backoffs ending) within this long of the first share its
# wake, which then comes this much after it: a retry may start up to 5 ms late, never early.
COALESCE_WAKE_UPS: Final = 0.005
LEADER_CHANNEL: Final = "conveyor_leader_resigned"


class TaskNotifier:
    """Broadcasts "tasks may be available" to waiters in this process."""

    def __init__(
        self,
        database_url: str,
        connect_options: Mapping[str, Any],
        promote_due: Callable[[], Awaitable[bool]],
        on_leader_resigned: Callable[[], None] | None = None,
        own_backends: Container[int] = frozenset(),
    ) -> None:
        """Nothing connects until `start`.

        `promote_due` moves the retries whose backoff ended into the queue and NOTIFYs every
        server; True if it moved any. `on_leader_resigned` is called when a leader gives up
        its role, so this server can campaign at once.
        `own_backends` holds the backend pids of this server's own connections: their task
        notifications are echoes of wake-ups this server already gave its long polls.
        """
        self._url = database_url
        self._connect_options = connect_options
        self._promote_due = promote_due
        self._on_leader_resigned = on_leader_resigned
        self._own_backends = own_backends
        self._due: list[float] = []  # loop times of scheduled wake-ups (a heap)
        self._timer: asyncio.TimerHandle | None = None
        self._promoting: set[asyncio.Task[None]] = set()
        self._generation = 0
        # One future per waiting call, resolved by the next wake-up: a future shared by
        # all would make each call's exit a linear search of every waiter's callback.
        self._waiters: set[asyncio.Future[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    @property
    def generation(self) -> int:
        """Increments on every wake-up; take it before looking for work, pass it to `wait`."""
        return self._generation

    def wake(self) -> None:
        """Wake every waiter (a notification arrived, or this process made work available)."""
        self._generation += 1
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def wake_after(self, seconds: float) -> None:
        """Promote the due retries and wake every server's waiters in `seconds`.

        Called when a retry's backoff is set: without this, it would wait for the leader's
        next reaper round. Nearby wake-ups are coalesced into one timer; if this server
        dies first, the leader's round promotes the task.
        """
        loop = asyncio.get_running_loop()
        heapq.heappush(self._due, loop.time() + max(seconds, 0.0))
        self._arm(loop)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._due:
            return
        # Wake-ups due close together share one wake, at the end of their window: never
        # before a due time, since a retry woken early is not yet claimable, the claim that
        # misses it marks its type drained for the round, and it waited for the fallback
        # poll (a whole `poll_interval`; an audit saw one pair in ten 4 ms apart do so).
        fire_at = self._due[0] + COALESCE_WAKE_UPS
        if self._timer is not None and self._timer.when() <= fire_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(fire_at, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        while self._due and self._due[0] <= now:
            heapq.heappop(self._due)
        task = asyncio.ensure_future(self._promote_then_wake())
        self._promoting.add(task)
        task.add_done_callback(self._promoting.discard)
        self._arm(loop)

    async def _promote_then_wake(self) -> None:
        # The local polls are woken once the promotion has committed: woken before, their
        # claims would not see the tasks, and would take the type for drained.
        if await self._promote_due():
            self.wake()

    async def wait(
        self, since: int, timeout: float, until: Iterable[asyncio.Future[Any]] = ()
    ) -> None:
        """Return at the next wake-up after generation `since`, or after `timeout` seconds.

        Return as soon as any future of `until` is done, too.
        """
        if self._generation != since:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        waited: set[asyncio.Future[Any]] = {waiter, *until}
        try:
            # asyncio.wait neither cancels what it waits for nor swallows a cancellation
            # of its caller (wait_for can, on Python 3.11).
            await asyncio.wait(waited, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiters.discard(waiter)

    def start(self) -> None:
        """Start listening in the background (idempotent)."""
        if self._runner is None:
            self._runner = asyncio.create_task(self._listen_forever(), name="task-notifier")

    async def stop(self) -> None:
        """Stop listening and wake every waiter so it can finish (safe to call twice)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()
        self.wake()

    def _on_notification(self, _conn: Any, pid: int, *_args: Any) -> None:
        # Every statement this server runs that makes tasks available is followed by a
        # local wake(); its NOTIFY is for the other servers. Waking again on the echo would
        # start a second round of claims for the same tasks (see wake_rounds.py).
        if pid not in self._own_backends:
            self.wake()

    def _on_leader_notification(self, *_args: Any) -> None:
        if self._on_leader_resigned is not None:
            self._on_leader_resigned()

    async def _listen_forever(self) -> None:
        delay = 0.1
        while True:
            conn: Any = None
            try:
                conn = await asyncpg.connect(self._url, **self._connect_options, timeout=5)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                # Bounded as the pings below are: a connection gone silent just after it
                # opened would otherwise hold the LISTEN until TCP gave up, minutes on.
                async with asyncio.timeout(5):
                    await conn.add_listener(CHANNEL, self._on_notification)
                    if self._on_leader_resigned is not None:
                        await conn.add_listener(LEADER_CHANNEL, self._on_leader_notification)
                self.listening.set()
                delay = 0.1
                # Tasks may have become available while we were not listening.
                self.wake()
                log.debug("listening for task notifications", extra={"event": "listen_started"})
                while not lost.is_set():
                    # The termination listener only fires when the driver notices; a cheap
                    # query every few seconds makes it notice a silently dead connection.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(5):
                            await lost.wait()
                    if not lost.is_set():
                        await queries.database_ping(conn, timeout=5)
            except UNAVAILABLE_ERRORS as exc:
                log.warning(
                    "task notification listener lost; polling until it is back",
                    extra={"event": "listen_lost", "error": str(exc)},
                )
            except Exception as exc:
                # Any other failure (database dropped, login refused, too many connections)
                # must not end the listener for good: log it and retry with backoff.
                log.warning(
                    "task notification listener failed (%s: %s); retrying",
                    type(exc).__name__,
                    exc,
                    extra={"event": "listen_failed"},
                )
            finally:
                self.listening.clear()
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
