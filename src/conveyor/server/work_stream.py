"""WorkStream: one worker's `Work` call on this server, leases out and outcomes in.

A worker grants room for leases (`grant`, a credit it adds to as its slots free up) and the
stream leases that many tasks as they come, through the same long-poll machinery as
`LeaseTasks` (claims, wake-ups, the handoff desk) but with no call per lease, and with its
remaining room on offer at the desk while it writes a lease message too. Outcomes
arrive as numbered batches and are applied as `ReportResults` applies them; each batch is
answered on the stream with its number, in whatever order the batches finish.

Why a stream: on this 2-core machine a unary call costs the server 0.7-1.1 ms of CPU and a
stream message 0.15-0.25 ms (docs/performance.md, "Calls and messages"). A task that needed a
lease call and a report call now needs three messages, and a lease reaches its worker
without a round trip of call set-up.

Delivery: a claim takes at most one message's worth of leases (`task_claim`'s byte
bound, the one a `LeaseTasks` reply needs), though a stream could write any claim as
several messages: a claim of 256 large payloads would hold them all in the server's memory
while they were written one by one, and the last ones' lease clocks would run all that
while. Large payloads cost one more claim per message, small ones nothing (the bound does
not bind). The leases are still packed into messages within the server's gRPC send limit
(`lease_batches`), should the claim's estimate or a handoff pass it. Leases the stream
claimed but had not started writing when the call ended are handed back at once, like those
of a cancelled long poll. A lease whose message was being written when the call broke is in
the same place as a unary reply lost on the way: its lease expires and the task is retried,
and fencing keeps whatever the worker did from counting twice. A worker whose connection
dies without a word looks present until the server's keepalive pings go unanswered
(`keepalive_interval` + `keepalive_timeout`, 10 s by default); gRPC then ends the call as
broken, and the stream claims nothing more for it. The stream ends OK when the
worker half-closes (it is leaving) or the server drains; batches of outcomes received by
then are applied and answered first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import InvalidTask
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.server import failpoints
from conveyor.server.rpc import EOF, Malformed

if TYPE_CHECKING:
    from conveyor.server.worker_service import WorkerService

# A worker grants at most its free slots; no honest worker comes near this much room open
# (granted, not yet filled by leases), and a stream that does is refused rather than
# leasing the queue.
MAX_CREDIT: Final = 100_000
# Report batches applied at once for one stream. A worker sends its next batch when the
# previous one is answered, so one is the norm; this bounds a misbehaving client.
MAX_REPORT_BATCHES: Final = 16
MESSAGE_KINDS: Final = ("grant", "reports", "leases", "answer")
STREAM_ENDED: Final = "lease not delivered: the worker's stream ended"
# How often an open stream's credentials are checked again when the server authenticates:
# a revoked, expired or narrowed token must stop leasing as it stops unary calls.
REAUTHENTICATE_EVERY: Final = 1.0


class WorkStream:
    """Serves one `Work` call until the worker leaves, the server drains, or the call ends."""

    def __init__(
        self, service: WorkerService, context: Any, worker_id: str, task_types: list[str]
    ) -> None:
        """Bind the stream to its worker (already checked by the caller)."""
        self._service = service
        self._context = context
        self._worker_id = worker_id
        self._task_types = task_types
        self._credit = 0
        self._granted = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._reporting: set[asyncio.Task[None]] = set()
        # Set when a batch of outcomes could not be applied: the call ends with its error,
        # as a ReportResults call would, and the worker retries the batch elsewhere.
        self._failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Retrieved even when nobody awaits it any more (the call ended first).
        self._failed.add_done_callback(lambda failed: failed.cancelled() or failed.exception())
        messages = service.metrics.work_stream_messages
        self._counted = {kind: messages.labels(kind) for kind in MESSAGE_KINDS}

    def stop(self) -> None:
        """The server drains: lease no more, answer what was received, end the call."""
        self._granted.set()

    async def serve(self, first: pb.WorkRequest) -> None:
        """Run the stream; return when it should end OK, raise to end it with a status."""
        self._take(first)
        # An empty first answer: the stream is accepted (the worker's breaker hears the
        # server is up even when no task comes for a long time). Under the lock like every
        # write: gRPC refuses a second write while one is in flight, and a report batch in
        # the first message may be answered at once (the fuzzer found that answer lost).
        async with self._write_lock:
            await self._context.write(pb.WorkResponse())
        leasing = asyncio.create_task(self._lease_loop(), name=f"work-lease-{self._worker_id}")
        reading = asyncio.create_task(self._read_loop(), name=f"work-read-{self._worker_id}")
        checking = asyncio.create_task(self._check_loop(), name=f"work-auth-{self._worker_id}")
        tasks = (leasing, reading, checking)
        try:
            await asyncio.wait({*tasks, self._failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Cancelling the lease loop hands back what it had claimed but not yet sent.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for done in (self._failed, checking, reading, leasing):
            error = done.exception() if done.done() and not done.cancelled() else None
            if error is not None:
                raise error
        # Leaving or draining: answer the outcomes already received before ending.
        if self._reporting:
            await asyncio.gather(*self._reporting, return_exceptions=True)
        if self._failed.done():
            raise self._failed.exception() or RuntimeError("unreachable")

    def _take(self, request: pb.WorkRequest) -> None:
        """Apply one request: its grant at once, its reports in their own task."""
        if request.worker_id and request.worker_id != self._worker_id:
            raise InvalidTask("a Work stream serves the one worker its first message named")
        self._counted["reports" if request.reports else "grant"].inc()
        if request.grant:
            self._credit += request.grant
            if self._credit > MAX_CREDIT:
                raise InvalidTask(
                    f"more than {MAX_CREDIT} leases of room granted and not yet filled "
                    "on one stream"
                )
            self._granted.set()
        if request.reports:
            if not request.reports_id:
                raise InvalidTask("a batch of reports needs a reports_id other than 0")
            if len(self._reporting) >= MAX_REPORT_BATCHES:
                raise InvalidTask(
                    f"more than {MAX_REPORT_BATCHES} report batches unanswered on one stream"
                )
            task = asyncio.create_task(self._report(request.reports_id, request.reports))
            self._reporting.add(task)
            task.add_done_callback(self._reporting.discard)

    async def _check_loop(self) -> None:
        """With authentication on, admit the stream's caller again every second.

        A unary call is admitted per call; a stream lives for hours. Revoking a token,
        letting it expire or narrowing its task types must end the worker's leasing within
        the same bound as its calls (security.md, "Tokens"), so the stream asks the gate
        again and ends with its refusal.
        """
        gate = self._service.gate
        if not gate.authenticating:
            await asyncio.Event().wait()  # nothing to check again: wait for the stream's end
        while True:
            await asyncio.sleep(REAUTHENTICATE_EVERY)
            principal = gate.admit("Work", self._context.invocation_metadata)
            principal.require_task_types(self._task_types)

    async def _read_loop(self) -> None:
        while True:
            request = await self._context.read()
            if request is EOF:
                return
            if isinstance(request, Malformed):
                raise InvalidTask(f"malformed Work request: {request.reason}")
            self._take(request)

    async def _lease_loop(self) -> None:
        service = self._service
        while not service.draining:
            if self._credit <= 0:
                self._granted.clear()
                await self._granted.wait()
                continue
            limit = min(self._credit, service.config.max_lease_batch)
            rows = await service.lease(self._worker_id, self._task_types, limit, give_up_at=None)
            if not rows:
                return  # the server drains
            while rows:
                self._credit -= len(rows)
                rows = await self._deliver_offering(rows)

    async def _deliver_offering(self, rows: list[Any]) -> list[Any]:
        """Deliver `rows` with the room left on offer at the desk meanwhile; what it got.

        A write takes a few hundred microseconds, and without an offer at the desk for that
        time an enqueue found none for this worker and queued its task for a claim (about
        a fifth of the tasks at 1,000/s; docs/performance.md, "The twentieth round"). The
        offer joins the desk behind the polls already waiting, which get the next tasks
        first. It is settled as a long poll's is: a reserved offer's rows are waited for,
        and abandoned to the desk (handed back) if the call ends first; a stopping server
        waits for the stream to unwind before its hand-backs (`calls_unwound`).
        """
        service = self._service
        desk = service.handoff
        room = min(self._credit, service.config.max_lease_batch)
        offer = (
            desk.open(
                self._worker_id,
                self._task_types,
                room,
                service.lease_ttl_known(self._worker_id),
            )
            if room > 0
            else None
        )
        try:
            await self._deliver(rows)
            pending = desk.close(offer) if offer is not None else None
            # Shielded: the offer's own future, which a cancelled wait would cancel too.
            handed: list[Any] = await asyncio.shield(pending) if pending is not None else []
        except BaseException:
            if offer is not None:
                desk.close(offer, abandon=True)
            raise
        if handed:
            service.metrics.count_claim("handed_over")
            failpoints.trigger(service.config.failpoints, "lease.after_claim")
        return handed

    async def _deliver(self, rows: list[Any]) -> None:
        """Send leases; hand them back if the call ends before their message is written.

        A claim's leases go in as many messages as the server's send limit needs: one, as
        the claim is bounded by it, unless its estimate fell short or a handoff brought
        more. A message over the limit fails to write, and its leases would be handed back
        and claimed again, for ever.
        """
        batches = self._service.lease_batches(rows)
        # Batches whose write has begun: from then on the write's outcome settles them.
        started = 0
        try:
            for batch_rows, leases in batches:
                async with self._write_lock:
                    # Shielded, and waited for even when this task is cancelled (the stream
                    # ending): grpc goes on with a write it has started and refuses any
                    # other on the call (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS) until it
                    # completes, so an abandoned one lost the answers to batches still
                    # being applied. A stress test saw about one stream in 600 end OK
                    # without them. Once started, the write's own outcome settles its
                    # leases (sent, or handed back), whatever happens here.
                    write = asyncio.ensure_future(
                        self._context.write(pb.WorkResponse(leases=leases))
                    )
                    started += 1
                    write.add_done_callback(functools.partial(self._settle, rows=batch_rows))
                    try:
                        await asyncio.shield(write)
                    except asyncio.CancelledError:
                        await asyncio.wait({write})
                        raise
        except BaseException:
            # Cancelled, or the call is over: nothing of the batches not begun was written.
            unsent = [row for batch_rows, _ in batches[started:] for row in batch_rows]
            if unsent:
                self._hand_back(unsent)
            raise

    def _settle(self, write: asyncio.Future[None], rows: list[Any]) -> None:
        if write.cancelled() or write.exception() is not None:
            # The call is over (grpc refuses writes to a finished call): nothing reached
            # the worker.
            self._hand_back(rows)
        else:
            self._counted["leases"].inc()
            self._service.observe_starts(rows)

    def _hand_back(self, rows: list[Any]) -> None:
        # Through the desk: in the background, so no cancellation interrupts it halfway,
        # and awaited by a stopping server before its pool closes.
        self._service.handoff.hand_back(rows, self._worker_id, STREAM_ENDED)

    async def _report(self, reports_id: int, reports: Any) -> None:
        try:
            outcomes = await self._service.report_many(self._worker_id, reports)
        except Exception as exc:
            if not self._failed.done():
                self._failed.set_exception(exc)
            return
        # The call may be over (the worker went away); the outcomes are applied either way,
        # and a worker that retries them on another stream is answered FAILED_PRECONDITION.
        with contextlib.suppress(Exception):
            async with self._write_lock:
                await self._context.write(pb.WorkResponse(reports_id=reports_id, outcomes=outcomes))
            self._counted["answer"].inc()
