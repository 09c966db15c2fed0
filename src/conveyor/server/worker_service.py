"""WorkerService: registration, the leasing long poll, heartbeats and result reports.

Fencing lives here: a heartbeat or report names (task_id, lease_id), and the SQL applies it
only while that lease is the task's current one. A report for a lease that was revoked
(cancel), expired (reaper) or replaced (another attempt) is refused with
FAILED_PRECONDITION and leaves the task untouched, so a late or duplicate worker can never
overwrite the outcome of the attempt that replaced it. A report that repeats the one that
settled its task (same lease, same worker, same outcome: its first answer was lost) is
answered as applied instead, and changes nothing. Reports and heartbeats are fenced by
the holding worker's id as well, and with authentication on, a worker id belongs to the
principal that registered it: no other credentials can lease, heartbeat or report for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

import grpc

from conveyor.codec import MAX_SEALED_TEXT, is_sealed_text, size_limit
from conveyor.errors import ConveyorError, InvalidTask, LeaseLost, PermissionDenied, TaskNotFound
from conveyor.group_commit import GroupCommit, concatenated, rows_and_bytes
from conveyor.protocol import convert
from conveyor.protocol.limits import MAX_HEARTBEAT_LEASES
from conveyor.protocol.status import status_for
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.server import failpoints
from conveyor.server.handoff import HandoffDesk
from conveyor.server.rpc import (
    EOF,
    Malformed,
    outliving_the_call,
    rpc_method,
    server_stopping,
    stream_method,
)
from conveyor.server.security import OPEN_GATE, Gate, caller
from conveyor.server.wake_rounds import WakeRounds
from conveyor.server.work_stream import WorkStream
from conveyor.storage import queries
from conveyor.types import (
    MAX_WORKER_HOST_LENGTH,
    MAX_WORKER_VERSION_LENGTH,
    TaskState,
    check_printable,
    normalize_task_id,
    validate_task_type,
    validate_worker_id,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from conveyor.monitoring.metrics import ServerMetrics
    from conveyor.server.config import ServerConfig
    from conveyor.server.database import Database
    from conveyor.server.notifier import TaskNotifier

log = logging.getLogger("conveyor.server.workers")

# What the server keeps of a worker's error, progress or release reason; a worker's sealed
# text is made to fit it whole (`seal_text`).
MAX_ERROR_LENGTH: Final = MAX_SEALED_TEXT
# A release spends no attempt, so nothing else ends a loop of leases and hand-backs (a
# fleet crash-looping through graceful stops, a task no worker can take, a hostile worker),
# and each cycle writes two history rows for good. The release that reaches this many since
# the task's last operator retry fails the task, saying why.
MAX_RELEASES: Final = 1000
MAX_TASK_TYPES: Final = 1000
MAX_REPORTS_PER_CALL: Final = 1000
# Outcomes other than success (failures, releases) of one ReportResults call applied at
# once: each takes a connection, and a burst of failures must not take the whole pool.
REPORT_CONCURRENCY: Final = 4
# Worker id -> principal, remembered so a worker's calls do not each look up its owner. A
# worker keeps its id for its whole life, and a new one is a new entry: at this many the
# memory is cleared and refilled from the database, one lookup per live worker.
MAX_REMEMBERED_OWNERS: Final = 10_000
# How long an owner is remembered. The leader deletes a gone worker's row after the worker
# retention, and another principal may then register its id: a server that remembered the
# old owner for ever would go on letting it act as that worker (heartbeats, leases), on
# someone else's id. A minute costs one lookup per worker a minute.
OWNER_MEMORY_SECONDS: Final = 60.0
# How long a worker's registered lease is trusted without a heartbeat bringing it again.
PACE_MEMORY_SECONDS: Final = 60.0
# Workers whose latest claim stopped at its reply's bytes with tasks left (see `lease`): at
# this many the memory is cleared, which costs each of them one claim it could have skipped.
MAX_REMEMBERED_LEFTOVERS: Final = 10_000
# A bound on a lease's bytes in a message besides its payload and its trace context's JSON
# text (`lease_size_bound`): ids, the type (at most 128 characters), numbers, timestamps,
# the trace context map's framing (at most 8 entries) and the lease's own tag and length.
LEASE_BYTES_BESIDES: Final = 1024
# A claim that found its types' ready tasks locked by another claim (`held`) claims again
# after this long, doubled for each such claim in a row up to the cap: the other claim
# holds them for the length of its statement, milliseconds, and then either took them or
# let them go. A poll interval (1 s) was what such a poll used to wait, and a worker kept
# for one type beside a busy worker that also serves it waited 1-3 s with a task ready.
# The cap bounds the statements a long hold costs (a bulk cancel's, say): 20 a second.
HELD_RETRY_FIRST_SECONDS: Final = 0.002
HELD_RETRY_MAX_SECONDS: Final = 0.05
# Why leases a LeaseTasks claim took went back to the queue (the `released` event's detail).
WORKER_WENT_AWAY: Final = "lease not delivered: the worker went away during the claim"
# What the joined success write answers for a report it left alone because another
# transaction held the task's row (see `_succeed_many`).
_BUSY: Final = object()
CALLER_REFUSED: Final = (
    "lease not delivered: the worker's token was refused (revoked, expired or narrowed) "
    "before its long poll answered"
)
REPLY_FULL: Final = (
    "lease not delivered: the long poll's reply had no room left for it under the server's "
    "message size limit"
)


def lease_size_bound(row: Any) -> int:
    """At least the bytes a leased row's `Lease` takes in a message, without encoding it.

    `ByteSize()` would serialise the payload once more before gRPC does: 0.7 ms a MiB, which
    a claim of 256 large payloads would spend on the event loop. The trace context comes as
    the JSON text of the stored jsonb, which holds every key and value as its UTF-8 bytes
    and more (quotes, separators, escapes), so its length in bytes bounds them; in
    characters it does not, as PostgreSQL writes non-ASCII characters unescaped. The claim
    (`task_claim`) makes the same estimate in SQL, to take only what a message carries.
    """
    trace_context = row["trace_context"]
    trace_bytes = len(trace_context.encode()) if trace_context else 0
    return len(row["payload"]) + trace_bytes + LEASE_BYTES_BESIDES


def _clean_error(error: str, field: str = "error") -> str:
    """A worker's text (`field`: error, progress, reason) as the database keeps it.

    PostgreSQL text cannot hold NUL; the text is for humans, so it is cut to
    MAX_ERROR_LENGTH. A sealed text is never cut, since nobody could open what is left:
    one too long (a codec with more overhead than the worker's `seal_text` allows for, or
    another client) is replaced by a plain note saying so, and the report is applied.
    """
    cleaned = error.replace("\x00", "\\x00")
    if len(cleaned) > MAX_ERROR_LENGTH:
        if is_sealed_text(cleaned):
            return (
                f"sealed {field} of {len(cleaned)} characters was too long to keep "
                f"(limit {MAX_ERROR_LENGTH}); its text is lost"
            )
        cleaned = cleaned[:MAX_ERROR_LENGTH] + "... (truncated)"
    return cleaned or "error"


def _worker_id(value: str) -> str:
    # Checked on every call, not only at registration: the id is logged and shown, and a
    # call naming an id no worker could register must not write it anywhere.
    return validate_worker_id(value)


def _label(value: str, field: str, limit: int) -> str:
    """A worker's host or version: for people to read, so printable, and cut to `limit`."""
    return check_printable(value, field)[:limit] or "unknown"


def _task_types(values: Sequence[str]) -> list[str]:
    if not values:
        raise InvalidTask("a worker must name at least one task type")
    if len(values) > MAX_TASK_TYPES:
        raise InvalidTask(f"at most {MAX_TASK_TYPES} task types per worker")
    return sorted({validate_task_type(value) for value in values})


def _success_weight(successes: Sequence[queries.Success]) -> int:
    return rows_and_bytes(len(successes), sum(len(s.result or b"") for s in successes))


Remembered = TypeVar("Remembered")


class RememberedPerWorker(Generic[Remembered]):
    """One value per worker id, each for a while, at most MAX_REMEMBERED_OWNERS at once.

    At that many the memory is cleared whole: it costs each worker one lookup, and keeps
    a server from remembering every worker id it ever saw.
    """

    def __init__(self) -> None:
        """Remember nothing yet."""
        # Worker id -> (the value, until when by the monotonic clock).
        self.entries: dict[str, tuple[Remembered, float]] = {}

    def get(self, worker_id: str, *, expired_too: bool = False) -> Remembered | None:
        """The value remembered for `worker_id`; None if none, or if it expired.

        `expired_too`: an expired value too, rather than None.
        """
        found = self.entries.get(worker_id)
        if found is None or (not expired_too and found[1] <= time.monotonic()):
            return None
        return found[0]

    def put(self, worker_id: str, value: Remembered, seconds: float) -> None:
        """Remember `value` for `worker_id` for `seconds`."""
        if len(self.entries) >= MAX_REMEMBERED_OWNERS:
            self.entries.clear()
        self.entries[worker_id] = (value, time.monotonic() + seconds)


class WorkerService(pb_grpc.WorkerServiceServicer):
    """The workers' API."""

    # Who may call (see rpc.rpc_method); open until the server installs its own gate.
    gate: Gate = OPEN_GATE

    def __init__(
        self,
        config: ServerConfig,
        database: Database,
        notifier: TaskNotifier,
        metrics: ServerMetrics,
    ) -> None:
        """Wire the service to its collaborators."""
        self.config = config
        self.database = database
        self.notifier = notifier
        self.wake_rounds = WakeRounds(lambda: notifier.generation)
        self.metrics = metrics
        self.draining = False
        # Each worker's principal, and the lease it registered with (`lease_ttl_for`).
        self._owners: RememberedPerWorker[str] = RememberedPerWorker()
        self._paces: RememberedPerWorker[timedelta] = RememberedPerWorker()
        # Workers whose latest claim left tasks for want of room in its reply (`more`).
        self._left_more: set[str] = set()
        # The long polls waiting here, by worker: a heartbeat that says the worker drains
        # ends them at once, empty. Left to wait out its `wait`, such a poll held the
        # stopping worker until that cancelled it, and a reply on its way at that moment
        # was lost: its leases expired, each at the cost of an attempt. Only the polls
        # waiting then: nothing is remembered of the worker, whose id a restarted worker
        # may reuse (a stable id), and whose polls must not be refused for it.
        self._waiting_polls: dict[str, set[asyncio.Future[None]]] = {}
        self._backoff = queries.Backoff(
            base=config.retry_backoff_base, cap=config.retry_backoff_cap
        )
        # The Work calls open here (see work_stream.py), so draining can end them, and an
        # event set while there are none (what a stopping server waits for: `calls_unwound`).
        self.streams: set[WorkStream] = set()
        self._no_streams = asyncio.Event()
        self._no_streams.set()
        # Claims running (long polls' and streams' alike), and an event set while there
        # are none: a claim cancelled by the stop hands its leases back as it unwinds.
        self._claims = 0
        self._no_claims = asyncio.Event()
        self._no_claims.set()
        # Enqueues lease tasks straight to the polls waiting here (see handoff.py).
        self.handoff = HandoffDesk(self.release_undelivered)
        # Successes reported at the same time share one statement and one commit, bounded
        # by their results' bytes as well as their count (see group_commit.rows_and_bytes).
        self.succeed_commit: GroupCommit[Sequence[queries.Success], Any] = GroupCommit(
            database.bind(self._succeed_and_count),
            combine=concatenated,
            count=len,
            weigh=_success_weight,
            stopped=server_stopping,
            observe_group=metrics.report_group_size.observe,
        )

    def start_draining(self) -> None:
        """Answer every waiting and future long poll at once, with no tasks; end the streams."""
        self.draining = True
        self.handoff.close_all()
        for stream in self.streams:
            stream.stop()
        self.notifier.wake()

    @rpc_method("RegisterWorker")
    async def RegisterWorker(  # noqa: N802 - gRPC method name
        self, request: pb.RegisterWorkerRequest, context: Any
    ) -> pb.RegisterWorkerResponse:
        """Record (or refresh) a worker as active."""
        worker_id = _worker_id(request.worker_id)
        task_types = _task_types(request.task_types)
        host = _label(request.host, "host", MAX_WORKER_HOST_LENGTH)
        version = _label(request.version, "version", MAX_WORKER_VERSION_LENGTH)
        if request.concurrency < 1:
            raise InvalidTask("concurrency must be at least 1")
        principal = caller() if self.gate.authenticating else None
        if principal is not None:
            principal.require_task_types(task_types)
        async with self.database.connection() as conn:
            registered = await queries.worker_register(
                conn,
                worker_id=worker_id,
                host=host,
                pid=min(request.pid, 2**31 - 1),
                task_types=task_types,
                concurrency=min(request.concurrency, 2**31 - 1),
                version=version,
                principal=principal.name if principal is not None else None,
                gone_after=self.config.worker_lost_after,
                lease_ttl=self.config.lease_ttl,
            )
        if not registered:
            raise PermissionDenied(
                f"worker id {worker_id} is registered by another principal; give each worker "
                "process its own id (the default is host-pid-random)"
            )
        if principal is not None:
            self._remember_owner(worker_id, principal.name)
        self._remember_pace(worker_id, self.config.lease_ttl)
        self.metrics.know_types(task_types)
        log.info(
            "worker %s registered for %s",
            worker_id,
            ", ".join(task_types),
            extra={"event": "worker_registered", "worker_id": worker_id},
        )
        return pb.RegisterWorkerResponse(
            heartbeat_interval=convert.duration(self.config.heartbeat_interval),
            lease_duration=convert.duration(self.config.lease_ttl),
        )

    @rpc_method("LeaseTasks", long_poll=True)
    async def LeaseTasks(  # noqa: N802 - gRPC method name
        self, request: pb.LeaseTasksRequest, context: Any
    ) -> pb.LeaseTasksResponse:
        """Lease up to max_tasks tasks, waiting up to `wait` for the first one."""
        worker_id = _worker_id(request.worker_id)
        task_types = _task_types(request.task_types)
        if request.max_tasks < 1:
            raise InvalidTask("max_tasks must be at least 1")
        if self.gate.authenticating:
            caller().require_task_types(task_types)
            await self._check_owner(worker_id)
        if self.draining:
            # UNAVAILABLE, as Work answers: an empty reply at once sent the worker straight
            # back for another (an audit counted 2,670 polls a second from one worker),
            # where this moves it to another server, after a backoff.
            raise server_stopping()
        limit = min(request.max_tasks, self.config.max_lease_batch)
        wait = (
            convert.from_duration(request.wait, field="wait")
            if request.HasField("wait")
            else timedelta(0)
        )
        wait = max(timedelta(0), min(wait, self.config.max_lease_wait))
        give_up_at = asyncio.get_running_loop().time() + wait.total_seconds()
        rows = await self.lease(worker_id, task_types, limit, give_up_at=give_up_at)
        if not rows and self.draining:
            raise server_stopping()  # the drain began while the poll waited
        if rows and self.gate.authenticating:
            # The caller was admitted when the poll began, up to max_lease_wait ago. A token
            # revoked, expired or narrowed since must not receive payloads (the Work stream
            # admits its caller again every second for the same reason).
            try:
                self.gate.admit("LeaseTasks", context.invocation_metadata).require_task_types(
                    task_types
                )
            except Exception:
                self.handoff.hand_back(rows, worker_id, CALLER_REFUSED)
                raise
        batches = self.lease_batches(rows)
        if len(batches) > 1:
            # One reply cannot be split. The claim took only what fits it, by the same
            # estimate, so this is the safety net (a handoff's leases come by count): the
            # leases past its room go back to the queue at once, with their attempt, and
            # the worker's next poll claims them.
            unsent = [row for batch_rows, _ in batches[1:] for row in batch_rows]
            self.handoff.hand_back(unsent, worker_id, REPLY_FULL)
        if not batches:
            return pb.LeaseTasksResponse()
        sent_rows, leases = batches[0]
        self.observe_starts(sent_rows)
        return pb.LeaseTasksResponse(leases=leases)

    async def lease(
        self, worker_id: str, task_types: list[str], limit: int, *, give_up_at: float | None
    ) -> list[Any]:
        """Lease up to `limit` tasks, waiting for the first until `give_up_at`.

        None waits for as long as it takes. Returns none once the server drains; cancelled,
        it leases nothing (what it had claimed is handed back).
        """
        loop = asyncio.get_running_loop()
        poll_interval = self.config.poll_interval.total_seconds()
        # The worker's previous claim stopped at its reply's bytes and left tasks ready. A
        # concurrent claim that skipped them while that claim held them locked, and leased
        # others, may have marked the types drained since (a claim that leased some is not
        # probed for `held`), and the first claim skipped for it would leave them waiting
        # for the fallback poll though the worker has room: claim them now.
        left_more = worker_id in self._left_more
        self._left_more.discard(worker_id)
        woken, first = False, not left_more
        held_retry = HELD_RETRY_FIRST_SECONDS
        while not self.draining:
            generation, claim = await self._look(
                worker_id, task_types, limit, woken=woken, may_skip=first
            )
            first = False
            rows = [] if claim is None else claim.rows
            if rows and rows[0]["more"]:
                self._remember_left_more(worker_id)
            held = claim is not None and claim.held
            self.metrics.count_claim(
                "skipped" if claim is None else "tasks" if rows else "held" if held else "empty"
            )
            if not rows:
                remaining = poll_interval if give_up_at is None else give_up_at - loop.time()
                if remaining <= 0:
                    break
                if held:
                    # Ready tasks another claim had locked: look again in milliseconds, not
                    # after a wake-up that has already come and gone.
                    remaining = min(remaining, held_retry)
                    held_retry = min(2 * held_retry, HELD_RETRY_MAX_SECONDS)
                elif claim is not None:
                    held_retry = HELD_RETRY_FIRST_SECONDS  # a new hold starts short again
                waited = await self._wait(worker_id, task_types, limit, generation, remaining)
                if waited is None:
                    return []  # the worker drains: its poll ends, empty
                rows = waited
                if rows:
                    self.metrics.count_claim("handed_over")
            if rows:
                failpoints.trigger(self.config.failpoints, "lease.after_claim")
                return rows
            woken = self.notifier.generation != generation
        return []

    # The generated base class declares the stream as a request iterator in, responses out;
    # this one reads and writes through the context instead (see rpc.stream_method).
    @stream_method("Work")
    async def Work(self, context: Any) -> None:  # type: ignore[override]  # noqa: N802
        """Lease as the worker grants room and apply its outcomes (see work_stream.py)."""
        if not self.config.work_stream:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "this server has Work streams turned off; use LeaseTasks and ReportResults",
            )
        first = await context.read()
        if first is EOF:
            return
        if isinstance(first, Malformed):
            raise InvalidTask(f"malformed Work request: {first.reason}")
        worker_id = _worker_id(first.worker_id)
        task_types = _task_types(first.task_types)
        if self.gate.authenticating:
            caller().require_task_types(task_types)
            await self._check_owner(worker_id)
        if self.draining:
            raise server_stopping()
        stream = WorkStream(self, context, worker_id, task_types)
        self.streams.add(stream)
        self._no_streams.clear()
        self.metrics.work_streams.inc()
        try:
            await stream.serve(first)
        finally:
            self.streams.discard(stream)
            if not self.streams:
                self._no_streams.set()
            self.metrics.work_streams.dec()

    async def calls_unwound(self, timeout: float) -> None:
        """Until every Work call and every claim on this server has unwound (at most `timeout`).

        gRPC's stop cancels the calls still open when its grace runs out and returns before
        their handlers have unwound; a stream hands back the leases it had not sent as it
        unwinds (those of a write the cancelling failed, and those an enqueue handed to its
        offer meanwhile). A stopping server waits for this before it waits for the
        hand-backs, or they would start after that wait, find the pool closing, and leave
        their tasks to a lease expiry, at the cost of an attempt.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._no_streams.wait()
                # A long poll's claim likewise: cancelled by the stop, it hands back what it
                # claimed once the claim commits, and that hand-back too must start before
                # the wait for hand-backs (it used to start after, and find the pool closed).
                await self._no_claims.wait()

    async def _look(
        self, worker_id: str, task_types: list[str], limit: int, *, woken: bool, may_skip: bool
    ) -> tuple[int, queries.Claim | None]:
        """Claim, or skip a claim that would find nothing: (generation, claim or None).

        `may_skip`: a poll's first claim, skipped if its types are drained this round.
        """
        if woken:
            # Woken with the other waiting polls: claim in turn (see wake_rounds.py).
            return await self.wake_rounds.claim(
                task_types, limit, lambda: self._claim(worker_id, task_types, limit)
            )
        if may_skip and self.wake_rounds.drained(task_types):
            # Nothing new since a claim found these types empty: wait for a wake-up.
            return self.notifier.generation, None
        generation = self.notifier.generation
        return generation, await self._claim(worker_id, task_types, limit)

    async def _wait(
        self, worker_id: str, task_types: list[str], limit: int, generation: int, remaining: float
    ) -> list[Any] | None:
        """Wait for a wake-up or a poll interval; the leases an enqueue handed over meanwhile.

        While it waits the poll has an offer at the handoff desk (see handoff.py). An offer
        an enqueue has reserved is settled by that enqueue's statement, so a poll that stops
        waiting first waits for those rows, and one whose call is cancelled abandons them
        to the desk, which hands them back. None: the worker's heartbeat said it drains
        (`_worker_leaving`), and nothing was handed over; the poll ends.
        """
        leaving = asyncio.get_running_loop().create_future()
        self._waiting_polls.setdefault(worker_id, set()).add(leaving)
        offer = self.handoff.open(worker_id, task_types, limit, self.lease_ttl_known(worker_id))
        try:
            await self.notifier.wait(
                generation,
                min(remaining, self.config.poll_interval.total_seconds()),
                until=(offer.delivered, leaving),
            )
            pending = self.handoff.close(offer)
            if pending is None:
                return None if leaving.done() else []
            # Shielded: the delivery is the offer's own future, which a cancelled wait
            # would cancel too, and the desk could then not hand its leases back.
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            self.handoff.close(offer, abandon=True)
            raise
        finally:
            polls = self._waiting_polls.get(worker_id)
            if polls is not None:
                polls.discard(leaving)
                if not polls:
                    del self._waiting_polls[worker_id]

    async def _claim(self, worker_id: str, task_types: list[str], limit: int) -> queries.Claim:
        # If the caller goes away (worker stopping, deadline) while the claim is in flight,
        # the claim may still commit. Shield it, and hand back whatever it leased, so no
        # task waits for a lease expiry because a reply could not be delivered. The
        # hand-back outlives the call too: a call cancelled again meanwhile (the server
        # stopping as well) used to stop it between two leases, and the rest waited for
        # their expiry, each at the cost of an attempt.
        # Tracked by the handoff desk as well, so that a stopping server waits for it before
        # it closes its pool (the desk's own hand-backs are waited for the same way).
        claim = asyncio.ensure_future(self._claim_now(worker_id, task_types, limit))
        self._claims += 1
        self._no_claims.clear()
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            hand_back = asyncio.ensure_future(self._hand_back_claimed(claim, worker_id))
            self.handoff.track(hand_back)
            await outliving_the_call(hand_back)
            raise
        finally:
            self._claims -= 1
            if not self._claims:
                self._no_claims.set()

    async def _hand_back_claimed(
        self, claim: asyncio.Future[queries.Claim], worker_id: str
    ) -> None:
        try:
            claimed = await claim
        except Exception:
            # The claim's own error: nothing was leased, and the call that would have
            # answered it is gone. (Raised, the desk logged it as a failed hand-back.)
            return
        await self.release_undelivered(claimed.rows, worker_id)

    async def _claim_now(self, worker_id: str, task_types: list[str], limit: int) -> queries.Claim:
        # Bounded by one message's bytes, for the Work stream too (see work_stream.py):
        # no claim takes a lease its message cannot carry.
        async with self.database.connection() as conn:
            lease_ttl = await self.lease_ttl_for(worker_id, conn)
            return await queries.task_claim(
                conn,
                task_types=task_types,
                limit=limit,
                worker_id=worker_id,
                lease_ttl=lease_ttl,
                deadline_grace=self.config.deadline_grace,
                max_bytes=self.config.lease_message_bytes,
                bytes_per_lease=LEASE_BYTES_BESIDES,
            )

    async def release_undelivered(
        self,
        rows: list[Any],
        worker_id: str,
        reason: str = WORKER_WENT_AWAY,
    ) -> None:
        """Hand back leases that never reached their worker: queued again at once.

        Each is counted `released`, as a worker's own hand-back is: it is what became of
        the task (queued again, its attempt not spent), whoever handed it back. None (the
        lease was never committed, or is no longer current) is not a hand-back.
        """
        async with self.database.connection() as conn:
            for row in rows:
                released = await queries.task_release(
                    conn,
                    task_id=str(row["id"]),
                    lease_id=str(row["lease_id"]),
                    worker_id=worker_id,
                    reason=reason,
                    delivered=False,
                    max_releases=MAX_RELEASES,
                )
                if released is not None:
                    self.metrics.observe_outcome(
                        released["type"],
                        queries.attempt_outcome(released["state"], "released"),
                        None,
                    )
        if rows:
            self.notifier.wake()

    def observe_starts(self, rows: list[Any]) -> None:
        """Observe the queue wait of leased rows sent to their worker: each starts its task.

        Not at the claim: a lease the server cannot deliver is handed back
        (`release_undelivered`) and its task claimed again, and observing both leases
        counted one wait twice, the second from the hand-back. The lease that goes out is
        the start; the hand-back keeps the task's available_at, so its one observation is
        the whole wait. (A reply lost on the way cannot be told from one delivered: that
        lease expires, and the retry is a start of its own.)
        """
        for row in rows:
            self.metrics.observe_queue_wait(row["type"], row["waited"])

    def lease_batches(self, rows: list[Any]) -> list[tuple[list[Any], list[pb.Lease]]]:
        """Leased rows as the worker receives them, in order, grouped to fit one message each.

        A claim stops at one message's bytes by the same estimate, so its rows make one
        group; a handoff's are capped by count only. Without this, a few large payloads
        could make one message over the gRPC send limit, whose write fails, and the same
        claim would repeat for ever. A lease alone always gets a group of its own: the
        limit holds one.
        """
        budget = self.config.lease_message_bytes
        batches: list[tuple[list[Any], list[pb.Lease]]] = []
        batch_rows: list[Any] = []
        leases: list[pb.Lease] = []
        size = 0
        for row in rows:
            lease = self.lease_message(row)
            lease_bytes = lease_size_bound(row)
            if leases and size + lease_bytes > budget:
                batches.append((batch_rows, leases))
                batch_rows, leases, size = [], [], 0
            batch_rows.append(row)
            leases.append(lease)
            size += lease_bytes
        if leases:
            batches.append((batch_rows, leases))
        return batches

    @staticmethod
    def lease_message(row: Any) -> pb.Lease:
        """A leased row as the worker receives it."""
        return pb.Lease(
            task_id=str(row["id"]),
            lease_id=str(row["lease_id"]),
            type=row["type"],
            payload=row["payload"],
            attempt=row["attempt"],
            max_retries=row["max_retries"],
            timeout=convert.duration(row["timeout"]),
            lease_expires_at=convert.timestamp(row["lease_expires_at"]),
            deadline=convert.timestamp(row["deadline_at"]),
            trace_context=json.loads(row["trace_context"]) if row["trace_context"] else None,
        )

    @rpc_method("Heartbeat")
    async def Heartbeat(  # noqa: N802 - gRPC method name
        self, request: pb.HeartbeatRequest, context: Any
    ) -> pb.HeartbeatResponse:
        """Extend the named leases; tell the worker which ones it must stop."""
        worker_id = _worker_id(request.worker_id)
        if len(request.leases) > MAX_HEARTBEAT_LEASES:
            # Each lease is a row locked on the reserved pool that leader elections share:
            # an unbounded list from one worker token slowed every other worker's beats.
            raise InvalidTask(
                f"{len(request.leases)} leases in one heartbeat; the limit is "
                f"{MAX_HEARTBEAT_LEASES} (a worker holding more splits its beat)"
            )
        leases = [
            (
                normalize_task_id(ref.task_id),
                normalize_task_id(ref.lease_id),
                _clean_error(ref.progress, "progress") if ref.has_progress else None,
            )
            for ref in request.leases
        ]
        if self.gate.authenticating and not await self._check_owner(
            worker_id, priority=True, unregistered_ok=True
        ):
            # No row, so no principal to hold the leases to: nothing is extended, and the
            # worker is told to register again (its row was deleted after a long silence).
            return pb.HeartbeatResponse(unregistered=True)
        if request.draining:
            self._worker_leaving(worker_id)
        # The reserved pool: a heartbeat that waits behind producers costs leases.
        async with self.database.priority_connection() as conn:
            touched = await queries.worker_touch(
                conn,
                worker_id=worker_id,
                draining=request.draining,
                in_flight=min(request.in_flight, 2**31 - 1),
                loop_lag_ms=min(request.loop_lag_ms, 2**31 - 1),
            )
            self._remember_pace(worker_id, touched.lease_ttl)
            unextended = (
                await queries.task_lease_extend(
                    conn,
                    worker_id=worker_id,
                    leases=leases,
                    lease_ttl=self.lease_ttl_known(worker_id),
                    deadline_grace=self.config.deadline_grace,
                )
                if leases
                else []
            )
        stop = []
        not_extended = []
        for row in unextended:
            if row["busy"]:
                # Another transaction holds the row: not extended, not lost either.
                not_extended.append(
                    pb.LeaseRef(task_id=str(row["task_id"]), lease_id=str(row["lease_id"]))
                )
                continue
            reason = (
                pb.STOP_REASON_CANCELLED
                if row["state"] == TaskState.CANCELLED.value
                else pb.STOP_REASON_LEASE_LOST
            )
            stop.append(
                pb.LeaseToStop(
                    task_id=str(row["task_id"]), lease_id=str(row["lease_id"]), reason=reason
                )
            )
        return pb.HeartbeatResponse(
            stop=stop, unregistered=not touched.known, not_extended=not_extended
        )

    @rpc_method("ReportResult")
    async def ReportResult(  # noqa: N802 - gRPC method name
        self, request: pb.ReportResultRequest, context: Any
    ) -> pb.ReportResultResponse:
        """Apply an attempt's outcome if its lease is still current (fencing)."""
        worker_id = _worker_id(request.worker_id)
        if self.gate.authenticating:
            await self._check_owner(worker_id)
        return await self._report(request)

    @rpc_method("ReportResults")
    async def ReportResults(  # noqa: N802 - gRPC method name
        self, request: pb.ReportResultsRequest, context: Any
    ) -> pb.ReportResultsResponse:
        """Apply several outcomes, each fenced on its own; one answer per report, in order.

        The successes among them go to the group commit as one submission, so they share
        one statement with each other and with other calls' successes; the other outcomes,
        rarer, take a connection each, a few at a time. Handing the successes over together
        rather than one coroutine each halved the server's own time per report in the
        drain benchmark.
        """
        worker_id = _worker_id(request.worker_id)
        if self.gate.authenticating:
            await self._check_owner(worker_id)
        return pb.ReportResultsResponse(outcomes=await self.report_many(worker_id, request.reports))

    async def report_many(
        self, worker_id: str, reports: Sequence[pb.ReportResultRequest]
    ) -> list[pb.ReportOutcome]:
        """One answer per report, in order (see ReportResults); the caller is checked."""
        if len(reports) > MAX_REPORTS_PER_CALL:
            self.metrics.limit_refusals.labels("batch_size").inc()
            raise InvalidTask(
                f"{len(reports)} reports in one call; the limit is {MAX_REPORTS_PER_CALL}"
            )
        outcomes: list[pb.ReportOutcome | None] = [None] * len(reports)
        successes, others = self._sort_reports(worker_id, reports, outcomes)
        limit = asyncio.Semaphore(REPORT_CONCURRENCY)

        async def one_by_one(index: int, report: pb.ReportResultRequest) -> None:
            async with limit:
                try:
                    answer = await self._report(report)
                except ConveyorError as exc:
                    outcomes[index] = _refused(exc)
                else:
                    outcomes[index] = pb.ReportOutcome(code=0, state=answer.state)

        async def together() -> None:
            rows = await self._succeed_many([success for _, success in successes])
            refused: list[tuple[int, queries.Success]] = []
            for (index, success), row in zip(successes, rows, strict=True):
                if row is None:
                    refused.append((index, success))
                else:
                    outcomes[index] = pb.ReportOutcome(code=0, state=pb.TASK_STATE_SUCCEEDED)
            # One lookup for all the refused: a call of a thousand stale (or forged)
            # reports must not cost a thousand queries.
            reasons = await self._unapplied(
                [
                    (success.task_id, success.lease_id, pb.OUTCOME_SUCCEEDED)
                    for _, success in refused
                ],
                worker_id,
            )
            for (index, _), reason in zip(refused, reasons, strict=True):
                outcomes[index] = (
                    _refused(reason)
                    if isinstance(reason, ConveyorError)
                    else pb.ReportOutcome(code=0, state=convert.STATE_TO_PB[reason])
                )

        await asyncio.gather(
            *([together()] if successes else []),
            *(one_by_one(index, report) for index, report in others),
        )
        answered = [outcome for outcome in outcomes if outcome is not None]
        assert len(answered) == len(outcomes)  # noqa: S101 - every report gets one answer
        return answered

    def _sort_reports(
        self,
        worker_id: str,
        reports: Sequence[pb.ReportResultRequest],
        outcomes: list[pb.ReportOutcome | None],
    ) -> tuple[list[tuple[int, queries.Success]], list[tuple[int, pb.ReportResultRequest]]]:
        """Split reports into successes for the group commit and the rest, by position.

        A malformed report is answered in `outcomes` at once and goes in neither list.
        """
        successes: list[tuple[int, queries.Success]] = []
        others: list[tuple[int, pb.ReportResultRequest]] = []
        for index, report in enumerate(reports):
            try:
                if report.worker_id != worker_id:
                    raise InvalidTask("each report must carry the call's worker_id")
                task_id, lease_id = self._checked_ids(report)
            except ConveyorError as exc:
                outcomes[index] = _refused(exc)
                continue
            if report.outcome == pb.OUTCOME_SUCCEEDED and self.config.group_commit:
                result = report.result if report.has_result else None
                successes.append((index, queries.Success(task_id, lease_id, worker_id, result)))
            else:
                others.append((index, report))
        return successes, others

    def _checked_ids(self, request: pb.ReportResultRequest) -> tuple[str, str]:
        """The report's task and lease ids, canonical; InvalidTask for a malformed report."""
        task_id = normalize_task_id(request.task_id)
        lease_id = normalize_task_id(request.lease_id)
        if len(request.result) > size_limit(request.result, self.config.max_payload_bytes):
            self.metrics.limit_refusals.labels("payload_size").inc()
            raise InvalidTask(
                f"result is {len(request.result)} bytes; the limit is "
                f"{self.config.max_payload_bytes}"
            )
        return task_id, lease_id

    async def _report(self, request: pb.ReportResultRequest) -> pb.ReportResultResponse:
        """One outcome, applied if its lease is current; ConveyorError otherwise."""
        task_id, lease_id = self._checked_ids(request)
        if request.outcome == pb.OUTCOME_SUCCEEDED and self.config.group_commit:
            result = request.result if request.has_result else None
            (row,) = await self._succeed_many(
                [queries.Success(task_id, lease_id, request.worker_id, result)]
            )
        else:
            # Run to its end even if this call is cancelled: `_apply` counts the outcome
            # it commits, and the retry of a committed outcome is not counted.
            row = await outliving_the_call(self._apply_alone(request, task_id, lease_id))
        if row is None:
            (reason,) = await self._unapplied(
                [(task_id, lease_id, request.outcome)], request.worker_id
            )
            if isinstance(reason, ConveyorError):
                raise reason
            return pb.ReportResultResponse(state=convert.STATE_TO_PB[reason])
        state = TaskState(row["state"])
        return pb.ReportResultResponse(state=convert.STATE_TO_PB[state])

    async def _unapplied(
        self, reports: Sequence[tuple[str, str, pb.Outcome.ValueType]], worker_id: str
    ) -> list[ConveyorError | TaskState]:
        """What to answer each (task id, lease id, outcome) report that was not applied.

        In one query. The task's state when the report repeats the one that settled the
        task (its first send was applied and the answer lost: a stream broken after the
        commit, a deadline shorter than the commit): that is answered as applied, not
        counted or logged as a fencing refusal. Otherwise the error: the task is unknown,
        or the lease is not current.
        """
        if not reports:
            return []
        async with self.database.connection() as conn:
            current = await queries.task_briefs_get(
                conn, task_ids=[task_id for task_id, _, _ in reports]
            )
        reasons: list[ConveyorError | TaskState] = []
        for task_id, lease_id, outcome in reports:
            task = current.get(task_id)
            if task is None:
                reasons.append(TaskNotFound(task_id=task_id))
                continue
            if _repeats_settlement(task, lease_id, outcome, worker_id):
                log.info(
                    "a report for task %s repeated the outcome its lease %s already settled; "
                    "answered as applied",
                    task_id,
                    lease_id,
                    extra={
                        "event": "report_repeated",
                        "task_id": task_id,
                        "task_type": task["type"],
                        "attempt": task["attempt"],
                        "worker_id": worker_id,
                    },
                )
                reasons.append(TaskState(task["state"]))
                continue
            self.metrics.stale_completions.inc()
            log.info(
                "rejected a report for task %s: lease %s is not current (task is %s, attempt %d)",
                task_id,
                lease_id,
                task["state"],
                task["attempt"],
                extra={
                    "event": "stale_report_rejected",
                    "task_id": task_id,
                    "task_type": task["type"],
                    # The task's attempt now, not the report's: a stale lease's attempt is
                    # an older one (logged as `attempt`, it named the wrong one).
                    "current_attempt": task["attempt"],
                    "worker_id": worker_id,
                },
            )
            reasons.append(
                LeaseLost(
                    f"lease {lease_id} of task {task_id} is no longer current "
                    f"(the task is {TaskState(task['state'])}); the outcome was not applied"
                )
            )
        return reasons

    async def _succeed_many(self, successes: list[queries.Success]) -> list[Any]:
        """Successes, applied together with those reported meanwhile: each row, or None.

        A success the joined write left alone because another transaction held its row
        (`_BUSY`) is applied by itself afterwards: it waits for that lock on a connection
        of its own, while the group commit goes on with everyone else's.
        """
        rows = await self.succeed_commit.submit(successes)
        busy = [index for index, row in enumerate(rows) if row is _BUSY]
        if busy:
            alone = await asyncio.gather(
                *(outliving_the_call(self._succeed_alone(successes[index])) for index in busy)
            )
            for index, row in zip(busy, alone, strict=True):
                rows[index] = row
        return rows

    async def _succeed_alone(self, success: queries.Success) -> Any:
        """Apply one success in a statement of its own, and count it; its row, or None."""
        async with self.database.connection() as conn:
            row = await queries.task_succeed(
                conn,
                task_id=success.task_id,
                lease_id=success.lease_id,
                worker_id=success.worker_id,
                result=success.result,
            )
        if row is not None:
            self.metrics.observe_outcome(row["type"], "succeeded", row["ran_for"])
        return row

    async def _succeed_and_count(
        self, conn: Any, successes: Sequence[queries.Success]
    ) -> list[Any]:
        """The group commit's write: apply `successes` and count those applied; row or None.

        Counted here, where the write completes, not by the calls that reported them: a
        call cancelled (deadline, client gone) while its reports sat in a shared write
        never resumes, yet the write commits, and the worker's retry repeats a settlement,
        which is answered as applied and not counted. Counted by the caller, those
        successes were counted nowhere.
        """
        applied: list[Any] = []
        for row in await queries.task_succeed_many(conn, successes):
            if row["applied"]:
                self.metrics.observe_outcome(row["type"], "succeeded", row["ran_for"])
                applied.append(row)
            else:
                applied.append(_BUSY if row["busy"] else None)
        return applied

    async def _apply_alone(
        self, request: pb.ReportResultRequest, task_id: str, lease_id: str
    ) -> Any:
        """`_apply` on a pooled connection of its own."""
        async with self.database.connection() as conn:
            return await self._apply(conn, request, task_id, lease_id)

    async def _apply(
        self, conn: Any, request: pb.ReportResultRequest, task_id: str, lease_id: str
    ) -> Any:
        outcome = request.outcome
        if outcome == pb.OUTCOME_SUCCEEDED:
            row = await queries.task_succeed(
                conn,
                task_id=task_id,
                lease_id=lease_id,
                worker_id=request.worker_id,
                result=request.result if request.has_result else None,
            )
            label = "succeeded"
        elif outcome in (pb.OUTCOME_FAILED, pb.OUTCOME_TIMED_OUT):
            event = "timed_out" if outcome == pb.OUTCOME_TIMED_OUT else "failed"
            row = await queries.task_fail(
                conn,
                task_id=task_id,
                lease_id=lease_id,
                worker_id=request.worker_id,
                error=_clean_error(request.error),
                event=event,
                retryable=not request.non_retryable,
                backoff=self._backoff,
            )
            if row is not None:
                label = queries.attempt_outcome(row["state"], "retried")
                if label == "retried":
                    self.notifier.wake_after(row["retry_in"])
                if event == "timed_out":
                    self.metrics.count_cut_short(row["type"], "timed_out")
        elif outcome == pb.OUTCOME_RELEASED:
            row = await queries.task_release(
                conn,
                task_id=task_id,
                lease_id=lease_id,
                worker_id=request.worker_id,
                reason=_clean_error(request.error or "handed back by the worker", "reason"),
                delivered=True,
                max_releases=MAX_RELEASES,
            )
            if row is not None:
                label = queries.attempt_outcome(row["state"], "released")
                if label == "released":
                    self.notifier.wake()
        else:
            raise InvalidTask(f"unknown outcome {outcome}")
        if row is not None:
            self.metrics.observe_outcome(row["type"], label, row.get("ran_for"))
        return row

    @rpc_method("UnregisterWorker")
    async def UnregisterWorker(  # noqa: N802 - gRPC method name
        self, request: pb.UnregisterWorkerRequest, context: Any
    ) -> pb.UnregisterWorkerResponse:
        """Mark a worker stopped (it said goodbye)."""
        worker_id = _worker_id(request.worker_id)
        if self.gate.authenticating:
            await self._check_owner(worker_id)
        async with self.database.connection() as conn:
            await queries.worker_set_state(conn, worker_id=worker_id, state="stopped")
        log.info("worker %s stopped", worker_id, extra={"event": "worker_stopped"})
        return pb.UnregisterWorkerResponse()

    async def _check_owner(
        self, worker_id: str, *, priority: bool = False, unregistered_ok: bool = False
    ) -> bool:
        """PermissionDenied unless the caller is the principal `worker_id` belongs to.

        The owner is remembered; a remembered owner that is not the caller is looked up
        again before refusing, since another server may have let the caller take the id
        meanwhile (one registered while authentication was off). `unregistered_ok`: an
        unknown worker id returns False instead of being refused (a heartbeat answers it).
        """
        if self._owners.get(worker_id) == caller().name:
            return True
        connection = self.database.priority_connection() if priority else self.database.connection()
        async with connection as conn:
            registered, principal = await queries.worker_principal(conn, worker_id=worker_id)
        if not registered and unregistered_ok:
            return False
        if not registered:
            raise PermissionDenied(
                f"worker {worker_id} is not registered; call RegisterWorker first"
            )
        # "": registered while authentication was off, so nobody's until registered again.
        self._remember_owner(worker_id, principal or "")
        if principal != caller().name:
            raise PermissionDenied(
                f"worker {worker_id} was registered by another principal; a worker calls "
                "with the credentials it registered with"
            )
        return True

    def _worker_leaving(self, worker_id: str) -> None:
        """The worker drains: end its long polls waiting here (see `_waiting_polls`)."""
        for waiting in self._waiting_polls.pop(worker_id, ()):
            if not waiting.done():
                waiting.set_result(None)

    def _remember_left_more(self, worker_id: str) -> None:
        if len(self._left_more) >= MAX_REMEMBERED_LEFTOVERS:
            self._left_more.clear()
        self._left_more.add(worker_id)

    def _remember_owner(self, worker_id: str, principal: str) -> None:
        self._owners.put(worker_id, principal, OWNER_MEMORY_SECONDS)

    def lease_ttl_known(self, worker_id: str) -> timedelta:
        """The lease to give `worker_id`, as far as this server remembers its pace.

        The longer of this server's --lease-ttl and the lease the worker registered with:
        servers may differ during a rolling change of settings, and the worker paces its
        heartbeats for the lease it was told (migration 0016). Kept in memory, filled by
        registrations, heartbeats and `lease_ttl_for`, so that no statement per task reads
        the worker's row (a subquery in the handoff's insert doubled its time).
        """
        remembered = self._paces.get(worker_id, expired_too=True)
        return (
            self.config.lease_ttl if remembered is None else max(self.config.lease_ttl, remembered)
        )

    async def lease_ttl_for(self, worker_id: str, conn: Any) -> timedelta:
        """`lease_ttl_known`, after reading the worker's row if not heard of for a while.

        A worker registered through another server, whose heartbeats go elsewhere, is read
        here at most once every PACE_MEMORY_SECONDS: it may have registered again
        meanwhile, with another server's lease.
        """
        if self._paces.get(worker_id) is None:
            lease_ttl = await queries.worker_lease_ttl(conn, worker_id=worker_id)
            self._remember_pace(worker_id, lease_ttl)
        return self.lease_ttl_known(worker_id)

    def _remember_pace(self, worker_id: str, lease_ttl: timedelta | None) -> None:
        self._paces.put(worker_id, lease_ttl or self.config.lease_ttl, PACE_MEMORY_SECONDS)


# The event each outcome records in the history (task_succeed, task_fail, task_release).
_OUTCOME_EVENTS: Final = {
    pb.OUTCOME_SUCCEEDED: "succeeded",
    pb.OUTCOME_FAILED: "failed",
    pb.OUTCOME_TIMED_OUT: "timed_out",
    pb.OUTCOME_RELEASED: "released",
}


def _repeats_settlement(
    task: Any, lease_id: str, outcome: pb.Outcome.ValueType, worker_id: str
) -> bool:
    """Whether a report not applied repeats the very one that settled `task`.

    The lease id a report keeps on the row names the lease that settled the last attempt
    (task_briefs_get); with the same worker, and the task's latest event the one this
    outcome records, nothing has happened to the task since that report was applied.
    """
    settled = task["settled_lease_id"]
    return (
        settled is not None
        and str(settled) == lease_id
        and task["worker_id"] == worker_id
        and task["last_event"] == _OUTCOME_EVENTS.get(outcome)
    )


def _refused(exc: ConveyorError) -> pb.ReportOutcome:
    """The answer to one report of a ReportResults call that was not applied."""
    code, message = status_for(exc)
    return pb.ReportOutcome(code=code.value[0], message=message)
