"""Worker: leases tasks over gRPC, runs their handlers, heartbeats, and shuts down gracefully.

The worker runs an asyncio event loop in a background thread (or in the caller's thread
under `run`). Async handlers run on that loop; sync handlers run on up to `concurrency`
daemon threads (worker/handler_threads.py). Three activities share the loop:

- the lease loop long-polls `LeaseTasks` for as many tasks as it has free slots (never
  more: no prefetch hoarding);
- one asyncio task per attempt runs the handler under its timeout and reports the outcome.
  The slot is free as soon as the handler returns, so the next task runs while the
  outcome is being committed (reports of attempts that finished together share one
  `ReportResults` call); at most `concurrency` outcomes may be in delivery at once;
- the heartbeat loop extends the leases of running attempts and stops those the server
  says are cancelled or lost. A handler whose lease has gone a whole lease duration
  without a heartbeat getting through is stopped by the worker itself: it can no longer
  claim to hold that lease.

Life cycle:

    new --start()--> registering --registered--> running --stop()--> draining --> stopped
                          |                                              |
                          +--stop() or fatal error-----------------------+

Draining: no new leases; in-flight attempts get `drain_timeout` to finish; the rest are
cancelled and their leases handed back (RELEASED), so the server re-queues them at once
without spending an attempt.

A sync handler cannot be interrupted. When it outlives its timeout or is cancelled, the
worker reports the attempt (timed out, or handed back) at once so the task is not held up,
sets `ctx.cancelled`, and keeps the thread's slot occupied until the function returns, so
the worker never runs more than `concurrency` handlers at the same time.

Observability: every log line about an attempt is emitted inside `log_context` with the
task's id, type, attempt, lease and the worker's id, and sync handlers run in a copy of that
context, so the user's own log lines inside a handler carry the same fields. With
`metrics_port`, the worker serves its Prometheus metrics (worker/metrics.py) over HTTP for
as long as it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, TypeVar

import grpc

from conveyor import __version__, event_loop
from conveyor.breaker import BreakerState
from conveyor.client import tracing
from conveyor.client.channel import (
    AddressRing,
    Credentials,
    Pick,
    RetryPolicy,
    TlsConfig,
    parse_addresses,
    tls_hint,
    translate,
)
from conveyor.codec import (
    KEYS_ENV,
    PayloadCodec,
    chosen_codec,
    is_sealed,
    kept_text,
    seal_text,
    sealed_key_id,
)
from conveyor.errors import (
    ConfigError,
    InvalidTask,
    PermanentFailure,
    SealError,
    ServerUnavailable,
    WorkerCrashed,
)
from conveyor.logs import ContextAdapter, bind_task_fields, log_context
from conveyor.protocol import convert
from conveyor.protocol.limits import LONGEST_CALL_TIMEOUT, MAX_HEARTBEAT_LEASES, MAX_PORT
from conveyor.protocol.status import TRANSIENT_CODES, is_backpressure, is_too_large
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.types import (
    MAX_WORKER_HOST_LENGTH,
    MAX_WORKER_VERSION_LENGTH,
    as_duration,
    printable,
    utf8_text,
    validate_worker_id,
)
from conveyor.worker.context import TaskContext
from conveyor.worker.handler_threads import HandlerThreads
from conveyor.worker.metrics import MetricsServer, WorkerMetrics
from conveyor.worker.registry import HandlerRegistry
from conveyor.worker.reporting import Refused, ReportBatcher, report_bytes, too_large_to_share
from conveyor.worker.watchdog import LoopWatchdog
from conveyor.worker.work_stream import StreamEnded, WorkStream

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence
    from concurrent.futures import Future

    from conveyor.worker.registry import Handler, RegisteredHandler

# A decorated handler keeps its own type (a team's tests call it directly).
HandlerT = TypeVar("HandlerT", bound="Handler")

# Records carry the bound log context even where no ContextFilter is installed.
log = ContextAdapter(logging.getLogger("conveyor.worker"))

DEFAULT_CONCURRENCY: Final = 4
DEFAULT_DRAIN_TIMEOUT: Final = timedelta(seconds=30)
DEFAULT_LEASE_WAIT: Final = timedelta(seconds=20)
DEFAULT_START_TIMEOUT: Final = timedelta(seconds=30)
DEFAULT_METRICS_HOST: Final = "127.0.0.1"
# Used until the server tells us its own values at registration.
FALLBACK_HEARTBEAT_INTERVAL: Final = timedelta(seconds=3)
FALLBACK_LEASE_DURATION: Final = timedelta(seconds=30)
# The deadline of each call a worker makes (its `call_timeout`) unless it is given another.
CALL_TIMEOUT: Final = 10.0
# The shortest call_timeout: a call carries a round trip and the server's statements, a
# report's commit among them, and every one that outlives its deadline counts against its
# server's breaker, so a shorter deadline fails a healthy server over on any hiccup. It is
# also the floor of a heartbeat's deadline (`heartbeat_timeout`), which thus never exceeds
# the worker's call_timeout.
SHORTEST_CALL_TIMEOUT: Final = timedelta(seconds=0.5)
# A handler calling ctx.heartbeat() in a tight loop must not flood the server.
MIN_HEARTBEAT_SPACING: Final = 0.2
# How many slot-fulls of outcomes may be on their way to the server before the worker
# stops leasing. Two: the reports of one slot-full travel and commit while the next
# slot-full runs. With one, a worker whose handlers are quick sat idle for a report's round
# trip and commit after every batch (W1 drained 2,559-3,524 tasks/s against 2,995-4,268
# with two, alternating runs). A worker thus holds at most three slot-fulls of leases: one
# running and two reporting, every one heartbeated.
REPORTING_SLOT_FULLS: Final = 2
# After a server answers UNIMPLEMENTED to the Work stream (it predates it, or has it turned
# off), the worker long-polls for this long before trying the stream again, so a rolling
# upgrade of the servers reaches workers without restarting them.
STREAM_RETRY_AFTER: Final = 60.0
# How often the lease loop looks again while a server's breaker is half-open and its probe, a
# heartbeat, is on its way: a long poll or a stream's opening is never the probe (see
# breaker.py), as it may wait for its answer much longer than the heartbeats may.
HALF_OPEN_RECHECK: Final = 0.25
# How long a stopping worker waits for its server to end the Work stream it half-closed
# (answering the outcomes on it, handing back leases it had claimed but not sent). A server
# that does not answer within this is unreachable: the outcomes are retried by call.
STREAM_LEAVE_TIMEOUT: Final = 3.0
# Attempts to hand back a lease that arrived after draining began, before leaving it to
# expire.
HAND_BACK_TRIES: Final = 3
# How long a stopping worker waits, after the drain, for the outcomes of the attempts it
# stopped and for its hand-backs to reach a server, before it says goodbye regardless.
HAND_BACK_WAIT: Final = 15.0
# How long a stopping worker waits for its heartbeat loop to end, and for the server to
# answer its goodbye (UnregisterWorker), before it goes on stopping regardless.
HEARTBEAT_END_WAIT: Final = 5.0
GOODBYE_TIMEOUT: Final = 3.0
# How long an async handler cancelled at shutdown gets to end before its task is handed back
# without it (it swallows its cancellation): its result still counts if it ends within this.
SHUTDOWN_CANCEL_GRACE: Final = 1.0
# How long the tasks left on the worker's loop when it stops get to end after their
# cancellation, before the loop closes without them (see event_loop.run).
LOOP_CLOSE_GRACE: Final = 2.0
# How long Worker.stop() waits, by default, beyond the drain: each bounded step that
# follows it at most, and 2 s for closing the channels and the thread's exit. It was 15 s,
# less than these steps may take, and a stop that returned early let the process exit with
# hand-backs still on their way: their tasks waited for their leases to expire.
STOP_WAIT_BEYOND_DRAIN: Final = (
    STREAM_LEAVE_TIMEOUT
    + HAND_BACK_WAIT
    + HEARTBEAT_END_WAIT
    + GOODBYE_TIMEOUT
    + LOOP_CLOSE_GRACE
    + 2.0
)
# The longest the thread that calls start() or stop() blocks at a time. Python runs its signal
# handlers only in the main thread, once it is back in its own code, and the kernel may give a
# process's signal to any of its threads (gRPC's, the worker's): then nothing wakes a main
# thread blocked with no timeout. Under `run`, a SIGINT caught by a gRPC thread while start()
# waited for a server went unseen until start() gave up, 30 s later, and a second one during
# the drain waited for the drain's end instead of exiting at once.
SIGNAL_CHECK_INTERVAL: Final = 0.2
# What an untraced attempt runs its handler in: no span, and no generator to make one.
_NO_SPAN: Final = contextlib.nullcontext()
# The worker whose attempt the current code runs in: set in each attempt's runner, so its
# handler sees it, in the worker's thread (async) or its own (sync, a copy of the context).
_HANDLER_OF: Final[contextvars.ContextVar[Worker | None]] = contextvars.ContextVar(
    "conveyor_handler_of", default=None
)


class _Unreachable(Exception):
    """No server answered: a transient gRPC failure, or every server's breaker is open."""

    def __init__(
        self,
        detail: str,
        retry_in: float | None = None,
        address: str | None = None,
        *,
        probe_held: bool = False,
    ) -> None:
        super().__init__(detail)
        self.retry_in = retry_in
        # The server that gave no answer (None: none was called, or it answered "not now").
        self.address = address
        # No server was called only because other calls hold the half-open breakers'
        # probes: this worker's own breakers refused, which says nothing of the servers.
        self.probe_held = probe_held


# The hostname's share of a default worker id: the id's limit (200) less "-<pid>-<6 hex>",
# with room to spare.
_ID_HOST_LENGTH: Final = 150


def host_name() -> str:
    """This machine's name as servers accept it: printable, within the host limit.

    A hostname's control or format characters become "?": an unusual hostname must never
    stop a worker from registering.
    """
    return printable(socket.gethostname())[:MAX_WORKER_HOST_LENGTH] or "unknown"


class _HandlerExited(Exception):
    """A handler raised what asyncio cannot carry as an attempt's error.

    An async handler's SystemExit or KeyboardInterrupt (argparse on a bad payload raises
    them): asyncio lets those two out of a task and out of the event loop itself, which
    ended the whole worker. A sync handler's StopIteration (`next()` on an empty iterator):
    asyncio refuses to set it on the loop's copy of the thread's future, which then never
    completed, and the attempt held its slot for good. Wrapped, each fails the attempt.
    """

    def __init__(self, original: BaseException) -> None:
        super().__init__(repr(original))
        self.original = original


def _call_sync(fn: Callable[..., Any], ctx: TaskContext, payload: bytes) -> Any:
    pid = os.getpid()
    try:
        result = fn(ctx, payload)
    except StopIteration as exc:
        _leave_if_forked(pid, ctx, failed=True)
        raise _HandlerExited(exc) from exc
    except BaseException:
        _leave_if_forked(pid, ctx, failed=True)
        raise
    _leave_if_forked(pid, ctx, failed=False)
    return result


async def _guarded(handler_call: Awaitable[Any], ctx: TaskContext) -> Any:
    pid = os.getpid()
    try:
        result = await handler_call
    except (SystemExit, KeyboardInterrupt) as exc:
        _leave_if_forked(pid, ctx, failed=True)
        raise _HandlerExited(exc) from exc
    except BaseException:
        _leave_if_forked(pid, ctx, failed=True)
        raise
    _leave_if_forked(pid, ctx, failed=False)
    return result


def _leave_if_forked(pid: int, ctx: TaskContext, *, failed: bool) -> None:
    """End a child a handler forked that returned (or raised) into the worker's code.

    Such a child is a copy of the worker: its thread (the handler's, or for an async
    handler the event loop's) went on to report the attempt and ran the loop's heartbeats
    and leases over the parent's connections, which broke them (the parent was marked
    lost); a sync handler's child waited for more work for ever. It exits at once, as a
    multiprocessing child does after its target, without the parent's exit handlers or
    buffered output.
    """
    if os.getpid() == pid:
        return
    with contextlib.suppress(OSError):
        os.write(
            2,
            f"conveyor: process {os.getpid()}, forked by the handler of task {ctx.task_id} "
            f"(type {ctx.task_type}), returned into the worker instead of calling os._exit(); "
            "it exits\n".encode(errors="replace"),
        )
    os._exit(1 if failed else 0)


def _exit_from_a_handlers_task(exc: BaseException) -> None:
    # The handler that awaits the task fails with it (`_guarded`); one that did not await
    # it loses nothing but this warning.
    log.warning(
        "a task started by a handler raised %s; the worker goes on (a handler awaiting "
        "that task fails its attempt with it)",
        describe_error(exc),
        extra={"event": "handler_task_exited"},
    )


def default_worker_id() -> str:
    """host-pid-random: unique per process and readable in `conveyor workers`."""
    return f"{host_name()[:_ID_HOST_LENGTH]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _checked_worker_id(worker_id: object) -> str:
    if not isinstance(worker_id, str):
        raise ConfigError(f"worker_id must be a string, not {type(worker_id).__name__}")
    try:
        return validate_worker_id(worker_id)
    except InvalidTask as exc:  # the server would refuse it at registration
        raise ConfigError(exc.message) from None


def describe_error(exc: BaseException) -> str:
    """The error as "ExceptionType: message", whatever the exception's `__str__` does."""
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception as unprintable:  # a handler's exception, any bug in it
        # The attempt must still be reported: a raising __str__ once left it to expire.
        return f"{name} (its message could not be read: {type(unprintable).__name__})"
    # wire_text: an error about a file whose name did not decode (os.fsdecode) carries lone
    # surrogates, which protobuf refuses; the report must still go.
    # Cut to what the server keeps: a message of megabytes made the report too large to go.
    text = kept_text(convert.wire_text(text))
    return f"{name}: {text}" if text else name


def _updated_credentials(
    current: Credentials | None, token: str | None, tls: TlsConfig | bool | None
) -> Credentials:
    """The credentials after a `configure` call.

    The first call reads the environment for what it is not given; later calls change only
    what they are given.
    """
    if current is None:
        return Credentials.resolve(token, tls)
    if token is None and tls is None:
        return current
    return Credentials.resolve(
        token if token is not None else current.token,
        tls if tls is not None else (current.tls or False),
    )


# The most handlers one worker may run at once: each sync one is a thread. A larger value
# was accepted, and 2**32 failed only at start(), with protobuf's ValueError.
MAX_CONCURRENCY: Final = 10_000


def _checked_concurrency(concurrency: object) -> int:
    if isinstance(concurrency, bool) or not isinstance(concurrency, int):
        raise ConfigError("concurrency must be an integer")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ConfigError(f"concurrency must be from 1 to {MAX_CONCURRENCY}, got {concurrency}")
    return concurrency


def _checked_call_timeout(call_timeout: object) -> timedelta:
    checked = as_duration(call_timeout, "call_timeout", ConfigError, maximum=LONGEST_CALL_TIMEOUT)
    if checked < SHORTEST_CALL_TIMEOUT:
        shortest = SHORTEST_CALL_TIMEOUT.total_seconds()
        raise ConfigError(
            f"call_timeout must be at least {shortest:g} s, got {checked.total_seconds():g} s"
        )
    return checked


def _checked_host(host: object) -> str:
    if not isinstance(host, str) or not host:
        raise ConfigError("metrics_host must be a non-empty string")
    return utf8_text(host, "metrics_host")


def _checked_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise ConfigError("metrics_port must be an integer")
    if not 0 <= port <= MAX_PORT:
        raise ConfigError(f"metrics_port must be between 0 and {MAX_PORT}, got {port}")
    return port


# Why a stop did not end, said by `stop`'s log line and by `run`'s WorkerCrashed.
_LOOP_BLOCKED: Final = (
    "its event loop is blocked (an async handler doing blocking work?); its tasks in flight "
    "come back when their leases expire"
)


def _result_bytes(value: object) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if inspect.iscoroutine(value):
        # Closed, so Python does not add "never awaited" to the log: the message says it.
        value.close()
        raise TypeError(
            "handler returned a coroutine, never awaited: a plain def wrapping an async def "
            "(a decorator?) must be async def and await it, or register the async def itself"
        )
    raise TypeError(f"handler returned {type(value).__name__}; return bytes or None")


def _opened_payload(codec: PayloadCodec | None, payload: bytes, task_id: str) -> bytes:
    """The payload as the handler gets it.

    Raises:
        SealError: it is sealed with a key this worker does not have.
    """
    if codec is not None:
        return codec.open(payload, field="payload", task_id=task_id)
    if is_sealed(payload):
        # Handed to the handler, ciphertext was taken for the payload (and a "result" made
        # of it reported): one pod deployed without the keys.
        raise SealError(
            f"the payload of task {task_id} was sealed with key {sealed_key_id(payload)!r}, "
            f"which this worker does not have (it has no payload keys: set {KEYS_ENV} or "
            "give the Worker a codec)"
        )
    return payload


@dataclass(eq=False)
class _Attempt:
    """One leased attempt in this worker."""

    lease: pb.Lease
    ctx: TaskContext
    handler_future: asyncio.Future[Any] | None = None
    thread_future: Future[Any] | None = None
    # Why the worker stopped this attempt early: "cancelled", "lease_lost" or "shutdown".
    stop_reason: str | None = None
    # Whether its handler had already returned (or raised) when it was stopped: see stop().
    # Its outcome is then the handler's own, not the stop's.
    ended_before_stop: bool = False
    # Set once the attempt's outcome is known and being reported: stopping it changes
    # nothing any more, and the server's word on its lease comes with the report's answer.
    finished: bool = False
    reported: bool = False
    # Whether the attempt still counts against `concurrency`: from its lease until its
    # handler has stopped, not until its outcome is delivered.
    holds_slot: bool = False
    # Whether to open a span for it (tracing.enabled(), asked once per batch of leases).
    traced: bool = False
    # Progress from ctx.heartbeat(details), sent with the next heartbeat.
    progress: str | None = None
    # Set once the outcome is reported (or known to be unreportable): the lease is settled.
    settled: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    # When the lease was taken or last extended, by the loop's clock (when the extending
    # heartbeat left): the lease is known to last until then plus a lease duration.
    lease_renewed_at: float = field(default_factory=lambda: asyncio.get_running_loop().time())
    runner: asyncio.Task[None] | None = field(default=None, repr=False)
    # Wakes the runner waiting for the handler (see _finished_within): a stopped attempt is
    # settled without waiting for a handler that ignores its cancellation.
    wake_runner: Callable[[], None] | None = field(default=None, repr=False)

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            # The loop hears of a sync handler's end a callback after its thread returns
            # (wrap_future). A stop in between must not cancel the loop's copy: the drain
            # handed back a task whose handler had succeeded, and it ran again. An async
            # handler that ended before the stop is reported as it ended, likewise.
            thread, handler = self.thread_future, self.handler_future
            self.ended_before_stop = (
                thread.done() if thread is not None else handler is not None and handler.done()
            )
        self.ctx.cancelled.set()
        handler = self.handler_future
        if handler is not None and not handler.done():
            # Read even when nothing is reported (cancelled, lease lost), so that an error
            # it ends with (a sync handler's own, an async one's cleanup that raised on its
            # cancellation) is not logged as "never retrieved".
            handler.add_done_callback(_mark_read)
            if not self.ended_before_stop:
                handler.cancel()
        if self.wake_runner is not None:
            self.wake_runner()


def _mark_read(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class Worker:
    """Runs handlers for the task types registered on it.

    Args:
        server: "host:port", "host1:port,host2:port" or a list; defaults to the
            CONVEYOR_SERVER environment variable, then localhost:50051.
        concurrency: Most handlers running at once, 1 to 10,000 (a finished attempt whose
            outcome is still being delivered holds its lease but not a slot).
        drain_timeout: How long `stop` lets in-flight attempts finish before handing
            them back.
        lease_wait: How long one lease long poll waits on the server for work.
        call_timeout: The deadline of each call to a server (10 s): a report, a
            registration, a batch of outcomes on the Work stream, and what a long poll may
            take beyond its `lease_wait`; a heartbeat gets a quarter of the lease, at most
            this. When it passes, the call goes again, to the next server if there is one:
            shorter fails over sooner, longer suits a slow link. From 0.5 s to an hour.
        worker_id: Defaults to host-pid-random. Up to 200 characters, none of them a
            control or format character (ConfigError otherwise).
        metrics_port: Serve Prometheus metrics at http://metrics_host:metrics_port/metrics
            while the worker runs (None: do not serve; 0: any free port). After `start`,
            this attribute holds the port actually bound.
        metrics_host: The address the metrics endpoint listens on (loopback by default;
            0.0.0.0 for every interface).
        token: The worker's bearer token (role `worker`); defaults to CONVEYOR_TOKEN, then
            the file named by CONVEYOR_TOKEN_FILE.
        tls: TLS towards the servers (TlsConfig, True for the system's roots, False for
            plain text); defaults to the CONVEYOR_TLS* environment variables.
        codec: Opens sealed payloads before handlers see them, and seals results and
            error messages before they are reported (conveyor.codec). Defaults to an
            AesGcmCodec from CONVEYOR_PAYLOAD_KEYS when that is set, else none.

    Attributes:
        metrics: The worker's Prometheus metrics; `metrics.registry` can also be served
            by the application itself.
    """

    def __init__(
        self,
        server: str | Sequence[str] | None = None,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        drain_timeout: timedelta | float = DEFAULT_DRAIN_TIMEOUT,
        lease_wait: timedelta | float = DEFAULT_LEASE_WAIT,
        call_timeout: timedelta | float = CALL_TIMEOUT,
        worker_id: str | None = None,
        metrics_port: int | None = None,
        metrics_host: str = DEFAULT_METRICS_HOST,
        token: str | None = None,
        tls: TlsConfig | bool | None = None,
        codec: PayloadCodec | None = None,
    ) -> None:
        """Configure the worker; nothing connects until `start` or `run`."""
        self.registry = HandlerRegistry()
        self.codec = chosen_codec(codec)
        # `is not None`: "", 0 or False are no worker id, refused rather than replaced.
        self.worker_id = (
            _checked_worker_id(worker_id) if worker_id is not None else default_worker_id()
        )
        self.metrics = WorkerMetrics()
        self.metrics_port: int | None = None
        self.configure(
            server=server,
            concurrency=concurrency,
            drain_timeout=drain_timeout,
            lease_wait=lease_wait,
            call_timeout=call_timeout,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            token=token,
            tls=tls,
        )
        self._metrics_server: MetricsServer | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._start_error: BaseException | None = None
        # What ended the worker's event loop while it ran, if anything did: `run` raises it.
        self._crash: BaseException | None = None
        self._runtime: _Runtime | None = None
        # A signal under `run` that came before `start` made the runtime: it stops at once.
        self._stop_at_start = False

    def configure(
        self,
        *,
        server: str | Sequence[str] | None = None,
        concurrency: int | None = None,
        drain_timeout: timedelta | float | None = None,
        lease_wait: timedelta | float | None = None,
        call_timeout: timedelta | float | None = None,
        metrics_port: int | None = None,
        metrics_host: str | None = None,
        token: str | None = None,
        tls: TlsConfig | bool | None = None,
    ) -> None:
        """Change settings before start (the CLI's flags override a module's Worker this way).

        `server=None` keeps the current addresses once set (reads CONVEYOR_SERVER at first),
        and likewise for `token` and `tls` (which read CONVEYOR_TOKEN and CONVEYOR_TLS*);
        any other None keeps the current value. Durations are a timedelta or seconds.
        """
        if getattr(self, "_thread", None) is not None:
            raise ConfigError("configure() must be called before start()")
        if server is not None or not hasattr(self, "addresses"):
            self.addresses = parse_addresses(server)
        self.credentials = _updated_credentials(getattr(self, "credentials", None), token, tls)
        self.credentials.check(*self.addresses)
        if concurrency is not None:
            self.concurrency = _checked_concurrency(concurrency)
        if drain_timeout is not None:
            self.drain_timeout = as_duration(
                drain_timeout, "drain_timeout", ConfigError, zero_allowed=True
            )
        if lease_wait is not None:
            self.lease_wait = as_duration(lease_wait, "lease_wait", ConfigError)
        if call_timeout is not None:
            self.call_timeout = _checked_call_timeout(call_timeout)
        if metrics_port is not None:
            self.metrics_port = _checked_port(metrics_port)
        if metrics_host is not None:
            self.metrics_host = _checked_host(metrics_host)

    def register_handler(self, task_type: str, fn: Handler) -> None:
        """Run `fn(ctx, payload) -> bytes | None` for tasks of `task_type`.

        Raises:
            ConfigError: the type is taken or invalid, `fn` is not a handler, or the worker
                was already started (it told the servers its types when it registered).
        """
        if self._thread is not None:
            # Accepted, the type was never leased: its tasks stayed queued for good while
            # this worker, which "handles" them, ran idle.
            raise ConfigError(
                f"cannot register a handler for {task_type!r}: the worker was already "
                "started; register every handler before start()"
            )
        self.registry.register(task_type, fn)

    def handler(self, task_type: str) -> Callable[[HandlerT], HandlerT]:
        """Decorator form of `register_handler`; the function keeps its own type."""
        if not isinstance(task_type, str):
            # `@worker.handler` without its type: the function became the "type", the
            # decorator replaced it, and nothing was registered, without a word.
            raise ConfigError(
                "worker.handler takes the task type: write @worker.handler('task.type'), "
                f"not @worker.handler (got {type(task_type).__name__})"
            )

        def decorate(fn: HandlerT) -> HandlerT:
            self.register_handler(task_type, fn)
            return fn

        return decorate

    # --- life cycle ---------------------------------------------------------------------

    def start(self, timeout: timedelta | float = DEFAULT_START_TIMEOUT) -> None:
        """Start in a background thread; return once registered with a server and leasing.

        A `stop` (or, under `run`, a signal) while it registers ends the registration at
        once: it then returns without starting, and `running` is False.

        Raises:
            ConfigError: no handler is registered, the worker was already started, or the
                metrics port cannot be bound.
            ServerUnavailable: no server accepted the registration within `timeout` (a
                timedelta or seconds).
        """
        start_timeout = as_duration(timeout, "timeout", ConfigError)
        if not self.registry.task_types():
            raise ConfigError("register at least one handler before starting the worker")
        if self._thread is not None:
            raise ConfigError("this worker was already started")
        self._serve_metrics()
        try:
            self._runtime = _Runtime(self, start_timeout)
            if self._stop_at_start:
                self._runtime.request_stop()
            self._thread = threading.Thread(
                target=self._thread_main, name=f"conveyor-worker-{self.worker_id}", daemon=True
            )
            self._thread.start()
        except BaseException:
            # The thread that would stop the metrics endpoint never ran: stop it here.
            if self._metrics_server is not None:
                self._metrics_server.stop()
            raise
        _wait_seeing_signals(self._started.wait, self._started.is_set)
        if self._start_error is not None:
            thread = self._thread
            _wait_seeing_signals(thread.join, lambda: not thread.is_alive())
            error = self._start_error
            # Nothing runs any more: a later start() begins afresh (a loop that retries
            # while the servers come up), rather than "already started".
            self._thread = self._runtime = self._metrics_server = self._start_error = None
            self._started.clear()
            self._stopped.clear()
            raise error

    def _serve_metrics(self) -> None:
        if self.metrics_port is None:
            return
        server = MetricsServer(self.metrics.registry, self.metrics_host, self.metrics_port)
        self.metrics_port = server.start()
        self._metrics_server = server
        log.info(
            "serving metrics on http://%s:%d/metrics",
            self.metrics_host,
            self.metrics_port,
            extra={
                "event": "metrics_serving",
                "worker_id": self.worker_id,
                "metrics_port": self.metrics_port,
            },
        )

    def _thread_main(self) -> None:
        assert self._runtime is not None  # noqa: S101 - set by start()
        # Bound here, every line of this worker carries its id: asyncio tasks inherit it,
        # and handler threads get a copy of their attempt's context.
        with log_context(worker_id=self.worker_id):
            try:
                # Bounded: an async handler that swallows its cancellation must not keep
                # this thread (and the metrics endpoint it stops) alive for ever.
                event_loop.run(
                    self._runtime.main(self._on_started),
                    close_within=LOOP_CLOSE_GRACE,
                    on_exit_from_task=_exit_from_a_handlers_task,
                )
            except BaseException as exc:
                if not self._started.is_set():
                    self._start_error = exc
                else:
                    self._crash = exc
                    log.exception("worker crashed", extra={"event": "worker_crashed"})
            finally:
                # Scrapes keep working through the drain; the endpoint goes with the worker.
                if self._metrics_server is not None:
                    self._metrics_server.stop()
                self._started.set()
                self._stopped.set()

    def _on_started(self, error: BaseException | None) -> None:
        self._start_error = error
        self._started.set()

    def stop(self, timeout: timedelta | float | None = None) -> None:
        """Stop gracefully: stop leasing, drain, hand back the rest, unregister.

        Blocks until done, or until `timeout` (a timedelta or seconds; default: drain_timeout
        plus a margin). Called from inside one of this worker's handlers (async or sync),
        it asks for the stop and returns at once: waiting would wait for that very handler.
        The stop then completes after the handler returns, and its outcome is reported as
        usual (the drain waits for it like for any other).
        """
        limit = (
            as_duration(timeout, "timeout", ConfigError, zero_allowed=True)
            if timeout is not None
            else self.drain_timeout + timedelta(seconds=STOP_WAIT_BEYOND_DRAIN)
        )
        runtime, thread = self._runtime, self._thread
        if runtime is None:
            return
        runtime.request_stop()
        if thread is None or thread is threading.current_thread() or _HANDLER_OF.get() is self:
            return
        _wait_seeing_signals(thread.join, lambda: not thread.is_alive(), limit.total_seconds())
        if thread.is_alive():
            log.error(
                "the worker did not stop within %gs: %s",
                limit.total_seconds(),
                _LOOP_BLOCKED,
                extra={"event": "stop_timed_out", "worker_id": self.worker_id},
            )

    def hand_back_now(self) -> None:
        """Thread-safe: end the drain at once; stop the running handlers, hand their tasks back.

        For a second Ctrl-C: a `stop` waiting for handlers in another thread returns as soon
        as their tasks are handed back (queued again without spending an attempt), instead
        of after the drain timeout. Stops the worker if it was not stopping.
        """
        if self._runtime is not None:
            self._runtime.request_stop(hand_back=True)

    @property
    def running(self) -> bool:
        """Whether the worker is started and not yet stopped."""
        return self._started.is_set() and not self._stopped.is_set()

    def busy_threads(self) -> int:
        """Sync handlers still running (e.g. past their timeout, ignoring cancellation).

        Falls as their threads return, also after `stop`: those threads are daemons, so
        the process may exit without waiting for them (their tasks are already settled).
        """
        return self._runtime.busy_threads if self._runtime else 0

    def run(self) -> None:
        """Start, block until SIGINT, SIGTERM or SIGHUP, then stop gracefully.

        A second SIGINT or SIGTERM exits at once, without draining; a second SIGHUP changes
        nothing, since a closed terminal may send two (the kernel's, then the shell's).
        SIGHUP (a closed terminal, a dropped SSH session) used to kill the process by its
        default action, and its running tasks came back `lease_expired`, an attempt spent.

        Raises:
            WorkerCrashed: the worker's event loop ended on an error it could not handle, or
                did not stop within `stop`'s wait (`conveyor worker` then exits with
                status 1).
            ConfigError: called on a thread other than the main one.
        """
        stop_requested = threading.Event()
        worker_pid = os.getpid()

        def on_signal(signum: int, _frame: object) -> None:
            if os.getpid() != worker_pid:
                # A child a handler forked (multiprocessing's fork method) inherits these
                # handlers, and is no worker: Process.terminate() logged "stopping
                # gracefully" in the worker's name, and the child ran on. It gets what a
                # Python program starts with (the handlers before `run` may be
                # `conveyor worker`'s own) and takes the signal as that says.
                for sig in previous:
                    signal.signal(
                        sig,
                        signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL,
                    )
                signal.raise_signal(signum)
                return
            if stop_requested.is_set():
                log.warning(
                    "second signal: exiting without draining",
                    extra={"event": "abort", "worker_id": self.worker_id},
                )
                os._exit(1)
            log.info(
                "received %s; stopping gracefully (signal again to exit at once)",
                signal.Signals(signum).name,
                extra={"event": "stop_requested", "worker_id": self.worker_id},
            )
            stop_requested.set()
            # Also while `start` registers (the servers may be down): it gives up at once
            # instead of when its timeout runs out, past an orchestrator's grace period.
            if self._runtime is not None:
                self._runtime.request_stop()
            else:
                self._stop_at_start = True

        if threading.current_thread() is not threading.main_thread():
            # signal.signal's own ValueError said only "signal only works in main thread".
            raise ConfigError(
                "Worker.run() takes the stop signals, which only the main thread can; "
                "on another thread, call start() and stop()"
            )
        previous = _take_stop_signals(on_signal, stop_requested)
        try:
            self.start()
            while not stop_requested.wait(0.5):
                if self._stopped.is_set():
                    break
            self.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self._raise_unless_stopped_cleanly()

    def _raise_unless_stopped_cleanly(self) -> None:
        """WorkerCrashed if the worker crashed, or has not stopped (see `run`)."""
        if self._crash is not None:
            raise WorkerCrashed(
                f"worker {self.worker_id} crashed: {describe_error(self._crash)}"
            ) from self._crash
        if self._thread is not None and self._thread.is_alive():
            # `conveyor worker` exited 0 without a word, its tasks left to their leases.
            raise WorkerCrashed(f"worker {self.worker_id} did not stop: {_LOOP_BLOCKED}")


def _wait_seeing_signals(
    wait: Callable[[float], object], done: Callable[[], bool], timeout: float | None = None
) -> None:
    """`wait(seconds)` until `done()` or `timeout` seconds, a slice at a time.

    The signal handlers of `run` get to run between the slices (see SIGNAL_CHECK_INTERVAL).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while not done():
        left = SIGNAL_CHECK_INTERVAL if deadline is None else deadline - time.monotonic()
        if left <= 0:
            return
        wait(min(left, SIGNAL_CHECK_INTERVAL))


def _take_stop_signals(
    on_stop: Callable[[int, Any], None], stopping: threading.Event
) -> dict[signal.Signals, Any]:
    """Send SIGINT, SIGTERM and the first SIGHUP to `on_stop`; return the handlers replaced.

    Only the first SIGHUP: a closed terminal may send two, and `on_stop` takes a second
    signal for "exit without draining".
    """

    def on_hangup(signum: int, frame: object) -> None:
        if not stopping.is_set():
            on_stop(signum, frame)

    handlers: dict[signal.Signals, Callable[[int, Any], None]] = {
        signal.SIGINT: on_stop,
        signal.SIGTERM: on_stop,
    }
    hangup = getattr(signal, "SIGHUP", None)  # not on Windows
    if hangup is not None:
        handlers[hangup] = on_hangup
    # A signal ignored when this starts stays ignored: `nohup` (SIGHUP) and a shell's
    # background job (SIGINT) ask for that, and Python keeps an ignored SIGINT so too.
    return {
        sig: signal.signal(sig, handler)
        for sig, handler in handlers.items()
        if signal.getsignal(sig) != signal.SIG_IGN
    }


class _Runtime:
    """The asyncio side of a Worker: lives and dies inside the worker's event loop."""

    def __init__(self, worker: Worker, start_timeout: timedelta) -> None:
        self.worker = worker
        self.start_timeout = start_timeout
        self.ring = AddressRing(worker.addresses)
        self.metadata = worker.credentials.metadata
        self.retry = RetryPolicy()
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.stubs: dict[str, pb_grpc.WorkerServiceStub] = {}
        self.call_timeout = worker.call_timeout.total_seconds()
        self.reports = ReportBatcher(worker.worker_id, self.report_call)
        # The open Work stream, if any (see worker/work_stream.py), the call's pick (its
        # server), when the latest heartbeat to that server that went unanswered was sent
        # (None: the latest one was answered), and when to try a stream again after a
        # server without it.
        self.stream: WorkStream | None = None
        self.stream_pick: Pick | None = None
        self.stream_silent_since: float | None = None
        self.streams_retry_at = 0.0
        # Set while a Work stream is being opened; set when the opening ends either way
        # (then `stream` is the stream, if it opened). See stop_leasing.
        self.stream_opening: asyncio.Event | None = None
        # Leases that arrived after draining began, being handed back.
        self.hand_backs: set[asyncio.Task[None]] = set()
        self.attempts: dict[str, _Attempt] = {}
        # Handlers holding a slot (at most `concurrency`), and finished attempts whose
        # outcome is still being delivered (they hold a lease, not a slot).
        self.busy = 0
        self.unreported = 0
        # Sync handlers whose thread has not returned; counted in those threads, so that
        # the count still falls after the event loop has closed.
        self.busy_threads = 0
        self.threads_lock = threading.Lock()
        self.heartbeat_interval = FALLBACK_HEARTBEAT_INTERVAL
        self.lease_duration = FALLBACK_LEASE_DURATION
        self.pool = HandlerThreads(worker.concurrency, name_prefix="conveyor-handler")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        # Set by `hand_back_now`: the drain stops waiting for the running handlers.
        self.drain_cut: asyncio.Event | None = None
        self.slot_freed: asyncio.Event | None = None
        self.heartbeat_now: asyncio.Event | None = None
        # Set whenever a call's outcome reaches its breaker (see `probe_settled`).
        self.call_settled: asyncio.Event | None = None
        self.draining = False
        # What `request_stop` asked for, kept for `main` to read once its loop exists: a
        # request made before then (right after `start` began) was dropped.
        self.stop_requested = False
        self.hand_back_requested = False
        self.watchdog: LoopWatchdog | None = None
        self.log = log
        self.metrics = worker.metrics
        self.metrics.prepare(
            task_types=worker.registry.task_types(),
            concurrency=worker.concurrency,
            breakers=self.ring.breakers,
        )

    # --- plumbing -------------------------------------------------------------------------

    def request_stop(self, *, hand_back: bool = False) -> None:
        """Thread-safe: ask the runtime to drain and stop.

        `hand_back`: without waiting for the running handlers (`Worker.hand_back_now`).
        """
        # Recorded before the loop is looked at: `main` reads these after setting the loop,
        # so a request finding no loop yet is seen there.
        self.stop_requested = True
        if hand_back:
            self.hand_back_requested = True
        loop, event, cut = self.loop, self.stop_event, self.drain_cut
        if loop is None or event is None or cut is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(event.set)
            if hand_back:
                loop.call_soon_threadsafe(cut.set)

    def stub(self, address: str) -> pb_grpc.WorkerServiceStub:
        # One stub per channel: building one per call showed up in profiles (~2 %).
        stub = self.stubs.get(address)
        if stub is None:
            # The shared channel options (client/channel.py): among them the keepalive
            # that ends a silently dead Work stream within 15 s.
            channel = self.worker.credentials.open_channel(address, aio=True)
            self.channels[address] = channel
            stub = self.stubs[address] = pb_grpc.WorkerServiceStub(channel)
        return stub

    async def call(
        self, method: str, request: Any, *, timeout: float | None = None, probe: bool = True
    ) -> Any:
        """One RPC on a server whose breaker allows it (`probe`: see `call_at`).

        `timeout`: the call's deadline in seconds, the worker's `call_timeout` by default.

        Raises:
            _Unreachable: no server answered (the next call goes to the next server).
            grpc.aio.AioRpcError: the server answered with an error status.
        """
        response, _ = await self.call_at(method, request, timeout=timeout, probe=probe)
        return response

    async def call_at(
        self, method: str, request: Any, *, timeout: float | None = None, probe: bool = True
    ) -> tuple[Any, str]:
        """`call`, and the address of the server that answered.

        `probe=False`: a call that may wait long for its answer goes only to a server whose
        breaker is closed (see `refused`).
        """
        pick = self.ring.pick(probe=probe)
        if pick is None:
            raise self.refused(probe=probe)
        try:
            return await self.call_picked(pick, method, request, timeout)
        finally:
            # Its breaker has heard how the call went: a heartbeat waiting for a probe to
            # settle (`probe_settled`) looks again.
            if self.call_settled is not None:
                self.call_settled.set()

    async def call_picked(
        self, pick: Pick, method: str, request: Any, timeout: float | None
    ) -> tuple[Any, str]:
        """`call_at` on the server `pick` names; its breaker hears the outcome."""
        address = pick.address
        try:
            response = await getattr(self.stub(address), method)(
                request,
                timeout=self.call_timeout if timeout is None else timeout,
                metadata=self.metadata,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in TRANSIENT_CODES:
                cause = f"{exc.code().name} {exc.details()}"
                self.ring.record(pick, reachable=False, cause=cause)
                raise _Unreachable(f"{address}: {cause}", address=address) from exc
            if is_backpressure(exc.code(), exc.details()):
                # "Not now" from a server that answered: its breaker hears it is reachable
                # (a probe must not stay in flight for ever), and every caller of `call`
                # retries an _Unreachable after its own jittered backoff (a report within
                # its lease, a heartbeat at its next beat), so an overloaded server is not
                # hammered in step.
                self.ring.record(pick, reachable=True)
                raise _Unreachable(f"{address}: {exc.details()}") from exc
            self.ring.record(pick, reachable=True)
            raise
        except BaseException:
            # Cancelled before an answer (a long poll when the worker stops): if the call
            # was the breaker's probe, the next one probes instead of none ever again.
            self.ring.abandon(pick)
            raise
        self.ring.record(pick, reachable=True)
        return response, address

    def refused(self, *, probe: bool) -> _Unreachable:
        """The error of a call that no server's breaker let through.

        A call that may not probe (a long poll, a stream's opening) and finds a breaker
        half-open with its probe's place free asks for a heartbeat now, which probes: a
        short call settles the half-open state within its deadline. While another call
        holds the probe, it only looks again a little later. As the probe, a long poll held
        it for up to its whole wait, and the heartbeats and reports to a lone server were
        refused meanwhile, while the leases they would have kept ran out.
        """
        retry_in = self.ring.next_probe_in()
        if retry_in > 0:
            # With the failure that opened them: "the breaker is open" alone leaves an
            # operator to guess at the cause (a refused port, a TLS handshake, a deadline).
            last = self.ring.last_failure
            return _Unreachable(
                "every server's circuit breaker is open"
                + (f"; last failure ({last[0]}): {last[1]}" if last else ""),
                retry_in=retry_in,
            )
        if not probe and any(b.probe_free() for b in self.ring.breakers.values()):
            if self.heartbeat_now is not None:
                self.heartbeat_now.set()
            return _Unreachable(
                "no server's circuit breaker is closed yet; a heartbeat probes first",
                retry_in=HALF_OPEN_RECHECK,
            )
        # Another call (a report, a hand-back) holds the probe. A heartbeat asked for now
        # would be refused too: it used to be asked for at every recheck, and each failed
        # at once, a warning and a counted heartbeat failure every 0.25 s until the probe
        # was answered.
        return _Unreachable(
            "no server's circuit breaker is closed; a probe is in flight",
            retry_in=HALF_OPEN_RECHECK if not probe else 0.0,
            probe_held=True,
        )

    def probes_held(self) -> bool:
        """Whether every server's breaker refuses a call, some only for a probe in flight.

        Those are half-open, and another call holds their probe; the others are open.
        """
        held = False
        for breaker in self.ring.breakers.values():
            state = breaker.state
            if state is BreakerState.CLOSED or breaker.probe_free():
                return False
            held = held or state is BreakerState.HALF_OPEN
        return held

    async def probe_settled(self) -> None:
        """Wait, for up to a heartbeat's deadline, while `probes_held`.

        A heartbeat asking meanwhile is refused by this worker's own breakers, which says
        nothing of the servers: it used to be counted and logged as a failed heartbeat, and
        then waited a whole interval, although the probe (a report, a hand-back) was often
        answered within milliseconds and the breaker closed.
        """
        assert self.loop is not None  # noqa: S101
        assert self.call_settled is not None  # noqa: S101
        if not self.probes_held():
            return
        self.log.debug(
            "the heartbeat waits: another call holds the probe of every half-open breaker",
            extra={"event": "heartbeat_waiting_for_probe"},
        )
        give_up_at = self.loop.time() + self.heartbeat_timeout()
        while self.probes_held() and (left := give_up_at - self.loop.time()) > 0:
            self.call_settled.clear()
            # Also until an open breaker turns half-open: its probe is free for the heartbeat.
            reopening = [r for b in self.ring.breakers.values() if (r := b.retry_in()) > 0]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min([left, *reopening])):
                    await self.call_settled.wait()

    # --- main -----------------------------------------------------------------------------

    def bind_to_running_loop(self) -> None:
        """Make the loop-bound state (the loop, the events) on the running loop.

        A stop or hand-back requested before the loop existed takes effect here.
        """
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        self.drain_cut = asyncio.Event()
        self.slot_freed = asyncio.Event()
        self.heartbeat_now = asyncio.Event()
        self.call_settled = asyncio.Event()
        if self.stop_requested:
            self.stop_event.set()
        if self.hand_back_requested:
            self.drain_cut.set()

    async def main(self, on_started: Callable[[BaseException | None], None]) -> None:
        self.bind_to_running_loop()
        assert self.loop is not None  # noqa: S101
        assert self.stop_event is not None  # noqa: S101
        assert self.heartbeat_now is not None  # noqa: S101
        try:
            registered = await self.register_unless_stopped()
        except BaseException as exc:
            on_started(exc)
            await self.close_channels()
            return
        if not registered:
            self.log.info(
                "stopped before any server accepted the worker", extra={"event": "worker_stopped"}
            )
            await self.close_channels()
            return
        pool = self.pool
        self.watchdog = LoopWatchdog(
            self.loop,
            on_lag=self.metrics.event_loop_lag.set,
            sync_handlers_running=lambda: pool.running,
        )
        self.watchdog.start()
        on_started(None)
        heartbeat = asyncio.create_task(self.heartbeat_loop(), name="heartbeat")
        leasing = asyncio.create_task(self.lease_loop(), name="lease-loop")
        await self.stop_event.wait()
        self.log.info("draining", extra={"event": "worker_draining"})
        self.draining = True
        self.heartbeat_now.set()  # tell the servers at once: this worker takes no more work
        await self.stop_leasing(leasing)
        await self.drain()
        heartbeat.cancel()
        # Bounded: whatever the heartbeat loop is doing, the worker must finish stopping.
        await asyncio.wait({heartbeat}, timeout=HEARTBEAT_END_WAIT)
        with contextlib.suppress(grpc.aio.AioRpcError, _Unreachable):
            await self.call(
                "UnregisterWorker",
                pb.UnregisterWorkerRequest(worker_id=self.worker.worker_id),
                timeout=GOODBYE_TIMEOUT,
            )
        if self.watchdog is not None:
            self.watchdog.stop()
        await self.close_channels()
        # Threads of sync handlers that ignore cancellation are left to finish on their own
        # (daemon threads: they do not keep the process from exiting).
        self.pool.shutdown()
        self.log.info("stopped", extra={"event": "worker_stopped"})

    async def close_channels(self) -> None:
        # Taken out before the first wait: a hand-back still retrying (given up on, not
        # cancelled) may open a channel to another server meanwhile, and iterating over
        # the dict it grows raised "dictionary changed size during iteration".
        channels = list(self.channels.values())
        self.channels.clear()
        self.stubs.clear()
        for channel in channels:
            await channel.close(grace=None)

    async def register_unless_stopped(self) -> bool:
        """Register, unless a stop is requested first; whether the worker registered.

        Raises:
            ConveyorError: as `register`, when no stop was requested.
        """
        assert self.stop_event is not None  # noqa: S101
        registering = asyncio.create_task(self.register(), name="register")
        stopping = asyncio.create_task(self.stop_event.wait(), name="stop-while-registering")
        try:
            await asyncio.wait({registering, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            registering.cancel()
            raise
        finally:
            stopping.cancel()
        if registering.done():
            failure = registering.exception()
            if failure is None:
                return True
            if not self.stop_event.is_set():
                raise failure
            return False  # it gave up because of the stop
        registering.cancel()
        await asyncio.wait({registering})
        # The call cancelled may have reached a server that registered the worker: without
        # a goodbye, its row would stay active until the servers mark it lost.
        with contextlib.suppress(grpc.aio.AioRpcError, _Unreachable):
            await self.call(
                "UnregisterWorker",
                pb.UnregisterWorkerRequest(worker_id=self.worker.worker_id),
                timeout=1,
            )
        return False

    async def register(self, within: float | None = None) -> None:
        """Register with a server, retrying unreachable ones for up to `within` seconds.

        `within`: start_timeout unless given.
        """
        assert self.loop is not None  # noqa: S101
        assert self.stop_event is not None  # noqa: S101
        request = pb.RegisterWorkerRequest(
            worker_id=self.worker.worker_id,
            host=host_name(),
            pid=os.getpid(),
            task_types=self.worker.registry.task_types(),
            concurrency=self.worker.concurrency,
            version=printable(__version__)[:MAX_WORKER_VERSION_LENGTH],
        )
        within = self.start_timeout.total_seconds() if within is None else within
        give_up_at = self.loop.time() + within
        delays = self.retry.delays()
        retrying = False
        while True:
            # Each call within what is left of start_timeout: a server that accepts the
            # connection and never answers held start(timeout=1) for the whole call_timeout.
            left = max(SHORTEST_CALL_TIMEOUT.total_seconds(), give_up_at - self.loop.time())
            try:
                response = await self.call(
                    "RegisterWorker", request, timeout=min(self.call_timeout, left)
                )
                break
            except grpc.aio.AioRpcError as exc:
                # As the clients word it: a missing token names where a token is read from,
                # a server too old for the call says so.
                raise translate(
                    exc, method="RegisterWorker", token_sent=self.metadata is not None
                ) from None
            except _Unreachable as exc:
                if self.loop.time() >= give_up_at or self.stop_event.is_set():
                    # Worded as the clients word it: gRPC's "Tls handshake failed" or
                    # "Socket closed" names neither side's TLS setting.
                    raise ServerUnavailable(
                        f"no Conveyor server at {', '.join(self.ring.addresses)} accepted the "
                        f"worker within {within:g}s: {exc}"
                        + tls_hint(str(exc), tls=self.worker.credentials.tls is not None)
                    ) from None
                if not retrying:
                    retrying = True
                    self.log.warning(
                        "no server accepted the worker yet (%s); trying again for up to %.0fs",
                        exc,
                        give_up_at - self.loop.time(),
                        extra={"event": "worker_register_retrying"},
                    )
                # Never past the deadline: an open breaker's next probe (seconds away) made
                # start(timeout=1) give up after five.
                await asyncio.sleep(
                    min(exc.retry_in or next(delays), max(0.0, give_up_at - self.loop.time()))
                )
        if response.HasField("heartbeat_interval"):
            self.heartbeat_interval = response.heartbeat_interval.ToTimedelta()
        if response.HasField("lease_duration"):
            self.lease_duration = response.lease_duration.ToTimedelta()
        self.log.info(
            "registered with %s for %s (concurrency %d)",
            ", ".join(self.ring.addresses),
            ", ".join(request.task_types),
            self.worker.concurrency,
            extra={"event": "worker_registered"},
        )

    async def register_again(self) -> None:
        """Register once more: the servers deleted this worker's row after a long silence.

        A worker that was partitioned or suspended for longer than the worker retention (a
        day by default) comes back to find itself unknown; with tokens its calls would be
        refused as unregistered until a restart. One attempt per heartbeat that says so,
        bounded as a heartbeat is: it runs inside the beat, and the leases granted since
        must not wait start_timeout for their next one.
        """
        self.log.warning(
            "the servers no longer know this worker (deleted after a long silence): "
            "registering again",
            extra={"event": "worker_reregistering"},
        )
        try:
            await self.register(within=self.heartbeat_timeout())
        except Exception as exc:  # the next heartbeat says so again, and this runs again
            self.log.warning(
                "registering again failed: %s", exc, extra={"event": "worker_reregister_failed"}
            )

    # --- leasing --------------------------------------------------------------------------

    async def lease_loop(self) -> None:
        """Take work for as long as the worker runs: on a Work stream, else by long polls."""
        assert self.loop is not None  # noqa: S101
        delays = self.retry.delays()
        while not self.draining:
            polling = self.loop.time() < self.streams_retry_at
            opened_at = self.loop.time()
            try:
                if polling:
                    await self.long_poll()
                else:
                    await self.work_on_stream()
            except _Unreachable as exc:
                self.log.debug("lease call failed: %s", exc, extra={"event": "lease_failed"})
                if self.loop.time() - opened_at >= 1.0:
                    delays = self.retry.delays()  # a stream that served a while broke
                await asyncio.sleep(exc.retry_in or next(delays))
                continue
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED and not polling:
                    self.log.info(
                        "the server has no Work stream; long-polling for %gs",
                        STREAM_RETRY_AFTER,
                        extra={"event": "stream_unsupported"},
                    )
                    self.streams_retry_at = self.loop.time() + STREAM_RETRY_AFTER
                    continue
                self.log.error(  # noqa: TRY400 - the status says it all
                    "lease call refused: %s %s",
                    exc.code().name,
                    exc.details(),
                    extra={"event": "lease_refused"},
                )
                await asyncio.sleep(next(delays))
                continue
            except Exception:
                # Nothing awaits this task until the worker stops: had it ended, the worker
                # would have gone on heartbeating, looking healthy, while leasing nothing.
                self.log.exception(
                    "taking work failed; trying again", extra={"event": "worker_bug"}
                )
                await asyncio.sleep(next(delays))
                continue
            # A stream that ended OK (the server drains) is replaced at once, on the next
            # server, unless it was short-lived: a server ending streams as they come must
            # not be hammered.
            if not polling and not self.draining:
                self.ring.advance()  # not when the worker left: its last calls go here
            if polling or self.loop.time() - opened_at >= 1.0:
                delays = self.retry.delays()
            else:
                await asyncio.sleep(next(delays))

    def room(self, unfilled: int = 0) -> int:
        """How many more leases the worker can take now, less `unfilled` room granted."""
        if self.draining or self.unreported >= REPORTING_SLOT_FULLS * self.worker.concurrency:
            # Outcomes still on their way to the server count against leasing too: if
            # reports stall (a server unreachable), the worker stops taking new work after
            # REPORTING_SLOT_FULLS slot-fulls of them instead of piling up leases it
            # cannot report.
            return 0
        return max(0, self.worker.concurrency - self.busy - unfilled)

    async def work_on_stream(self) -> None:
        """Lease and report over one Work stream until it ends.

        Raises:
            _Unreachable: the server could not be reached, or the stream broke.
            grpc.aio.AioRpcError: the server refused the stream.
        """
        assert self.slot_freed is not None  # noqa: S101
        # Never the breaker's probe: an opening may wait (a server slow to accept, or gone
        # silent), and the heartbeats would be refused meanwhile.
        pick = self.ring.pick(probe=False)
        if pick is None:
            raise self.refused(probe=False)
        address = pick.address
        # No request iterator: grpc.aio then lets us write and read as we go.
        call = self.stub(address).Work(metadata=self.metadata)  # type: ignore[call-arg]
        stream = WorkStream(call, self.on_leases)
        granting: asyncio.Task[None] | None = None
        opening = self.stream_opening = asyncio.Event()
        try:
            try:
                await self.open_stream(stream, pick)
                self.stream, self.stream_pick, self.stream_silent_since = stream, pick, None
            finally:
                self.stream_opening = None
                opening.set()
            granting = asyncio.create_task(self.grant_loop(stream), name="grant-loop")
            await stream.read_all()
        except grpc.aio.AioRpcError as exc:
            cause = f"{exc.code().name} {exc.details()}"
            self.ring.record(pick, reachable=exc.code() not in TRANSIENT_CODES, cause=cause)
            if _replaceable(exc):
                raise _Unreachable(f"{address}: {cause}") from exc
            raise
        except StreamEnded as exc:
            if stream.abandoned is None:  # an abandoning worker has told the ring already
                self.ring.record(pick, reachable=False, cause=str(exc))
            raise _Unreachable(f"{address}: {exc}") from exc
        finally:
            if self.stream is stream:
                self.stream, self.stream_pick = None, None
            stream.close()
            if granting is not None:
                granting.cancel()
            call.cancel()  # type: ignore[no-untyped-call]

    async def open_stream(self, stream: WorkStream, pick: Pick) -> None:
        """Open the stream; its server's breaker hears whether the server answered."""
        try:
            await stream.open(self.worker.worker_id, self.worker.registry.task_types(), self.room())
        except asyncio.CancelledError:
            # Stopped while opening: nothing was learned of the server. Counted as a
            # failure, it moved the ring and could open the breaker, and the worker's last
            # calls (hand-backs, its goodbye) found every breaker open.
            self.ring.abandon(pick)
            raise
        except BaseException as exc:
            if not isinstance(exc, grpc.aio.AioRpcError | StreamEnded):
                self.ring.record(pick, reachable=False)
            raise
        self.ring.record(pick, reachable=True)

    async def grant_loop(self, stream: WorkStream) -> None:
        """Grant the room slots free up, when no outcome report carries it first."""
        assert self.slot_freed is not None  # noqa: S101
        while stream.writable:
            # Checked before every wait, not only after a wake-up: slots freed while the
            # stream opened, or while a grant was being written, still count.
            self.slot_freed.clear()
            room = self.room(stream.unfilled)
            # Reports waiting behind the batch in flight will carry the room; while the
            # server still has room to fill, there is no hurry to send it alone (W2: a
            # third of the tasks cost a grant message of their own before this).
            if room > 0 and not (stream.unfilled > 0 and self.reports.queued()):
                with contextlib.suppress(StreamEnded):
                    await stream.grant(room)
                continue
            await self.slot_freed.wait()
            # A handler that ends frees its slot and then reports: let the report go first,
            # so the room rides in its message instead of one of its own.
            await asyncio.sleep(0)

    def on_leases(self, leases: Sequence[pb.Lease]) -> None:
        """Leases from the stream: run them, or hand them back if the worker is leaving."""
        if self.draining:
            for lease in leases:
                self.hand_back(lease)
            return
        traced = tracing.enabled()
        for lease in leases:
            self.begin(lease, traced=traced)

    def hand_back(self, lease: pb.Lease) -> None:
        """Release a lease that arrived too late to run (the worker drains)."""
        self.send_alone(
            pb.ReportResultRequest(
                worker_id=self.worker.worker_id,
                task_id=lease.task_id,
                lease_id=lease.lease_id,
                outcome=pb.OUTCOME_RELEASED,
                error="handed back unstarted: the worker is stopping",
            )
        )

    def send_alone(self, request: pb.ReportResultRequest) -> None:
        """Deliver one outcome by ReportResult calls, a few tries, in the background.

        The drain waits for these (`hand_backs`) before the worker says goodbye.
        """

        async def release() -> None:
            delays = self.retry.delays()
            for _ in range(HAND_BACK_TRIES):
                try:
                    await self.call("ReportResult", request, timeout=3)
                except _Unreachable as exc:
                    await asyncio.sleep(exc.retry_in or next(delays))
                except grpc.aio.AioRpcError:
                    return  # answered: released, or the lease is no longer ours anyway
                else:
                    return

        task = asyncio.create_task(release())
        self.hand_backs.add(task)
        task.add_done_callback(self.hand_backs.discard)

    async def report_call(self, method: str, request: Any) -> Any:
        """The report batcher's call: on the Work stream when one is open.

        A lone report too large to share a message goes by call: over the server's message
        limit, it would end the stream, and the leases in flight on it, instead of one call.
        """
        stream = self.stream
        if (
            method != "ReportResults"
            or stream is None
            or not stream.writable
            or too_large_to_share(request.reports)
        ):
            return await self.call(method, request)
        try:
            # A deadline as a ReportResults call has: a stream whose connection died
            # silently looks open, and its batch would wait for keepalive to say otherwise.
            async with asyncio.timeout(self.call_timeout):
                return await stream.report(request, grant=self.room(stream.unfilled))
        except TimeoutError:
            why = f"a batch of outcomes had no answer within {self.call_timeout:g}s"
            if self.stream is stream:
                self.abandon_stream(why)
            raise _Unreachable(why) from None
        except StreamEnded as exc:
            raise _Unreachable(str(exc)) from exc

    def abandon_stream(self, why: str) -> None:
        """Give up on the open Work stream: its server stopped answering on it.

        Its unanswered batches fail as unreachable, and each report goes again by call; the
        ring moves past the stream's server first, so they go to another server if there is
        one. The lease loop then opens a new stream, there too.
        """
        stream, pick = self.stream, self.stream_pick
        if stream is None or pick is None or stream.abandoned is not None:
            return
        self.log.warning(
            "giving up on the Work stream to %s: %s",
            pick.address,
            why,
            extra={"event": "stream_abandoned"},
        )
        self.ring.record(pick, reachable=False, cause=why)
        stream.abandon(why)

    def note_heartbeat(self, address: str, *, answered: bool, sent_at: float) -> None:
        """Replace the Work stream when its server went silent and another server answers.

        A heartbeat shares the stream's connection: no answer from the stream's server says
        the stream may be dead as well, and an answer from elsewhere says where to lease
        and report instead. Until then the worker waited for the stream's own failure
        (keepalive, or a batch's deadline), and an idle worker leased nothing meanwhile.

        Silent means the stream, too, has carried nothing since that heartbeat was sent: a
        heartbeat fails alone (its deadline passed while the server's database was slow,
        or the server answered UNAVAILABLE because its statement failed). One such failure
        used to cancel a healthy stream, and the leases on their way in it were lost,
        each an attempt spent and a lease's wait.
        """
        stream, pick = self.stream, self.stream_pick
        if stream is None or pick is None:
            return
        if address == pick.address:
            self.stream_silent_since = None if answered else sent_at
            return
        silent_since = self.stream_silent_since
        if not answered or silent_since is None:
            return
        if stream.last_received >= silent_since:
            self.stream_silent_since = None  # it was heard from: alive
            return
        self.abandon_stream(
            f"a heartbeat to it failed, it carried nothing since, and {address} answered"
        )

    async def stop_leasing(self, leasing: asyncio.Task[None]) -> None:
        """Take no more leases: half-close the stream, whose end also ends the lease loop.

        Outcomes already sent on the stream are answered before the server ends it; those
        of attempts still running go by ReportResults. A long poll in flight is let end:
        its server answers it at once, empty, when the draining heartbeat arrives, and
        a reply with leases is handed back (`on_leases`). Cancelled instead, a reply on its
        way at that moment was lost, and its leases expired, each at the cost of an
        attempt (one stop in two or three under load).
        """
        assert self.slot_freed is not None  # noqa: S101
        self.slot_freed.set()  # a poll waiting for room sees the drain
        opening = self.stream_opening
        if self.stream is None and opening is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STREAM_LEAVE_TIMEOUT):
                    await asyncio.wait({leasing})
        else:
            # Whatever half-closing raises (grpc.aio has several ways to say the call is
            # over), the worker goes on stopping.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STREAM_LEAVE_TIMEOUT):
                    if opening is not None:
                        # Not cancelled: the server may have accepted the stream and sent
                        # leases on it already. Cancelled, they were never read, and their
                        # tasks waited for the leases to expire, an attempt spent.
                        await opening.wait()
                    if (stream := self.stream) is not None:
                        await stream.leave()
                        await asyncio.wait({leasing})
        leasing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leasing

    async def long_poll(self) -> None:
        """One LeaseTasks long poll for as many tasks as there is room.

        Raises:
            _Unreachable: no server answered.
            grpc.aio.AioRpcError: the server refused the call.
        """
        assert self.slot_freed is not None  # noqa: S101
        while (room := self.room()) <= 0:
            if self.draining:
                return
            self.slot_freed.clear()
            await self.slot_freed.wait()
        wait = self.worker.lease_wait
        request = pb.LeaseTasksRequest(
            worker_id=self.worker.worker_id,
            task_types=self.worker.registry.task_types(),
            max_tasks=room,
            wait=convert.duration(wait),
        )
        poll = asyncio.ensure_future(
            self.call(
                "LeaseTasks", request, timeout=wait.total_seconds() + self.call_timeout, probe=False
            )
        )
        try:
            response = await asyncio.shield(poll)
        except asyncio.CancelledError:
            # The worker stops. Its reply may have arrived in the same loop iteration as the
            # cancellation: its leases were claimed for this worker and no one would run or
            # hand them back (each waited out its lease and lost an attempt). A poll still
            # waiting is cancelled; its server hands back what it could not deliver.
            if poll.done() and not poll.cancelled() and poll.exception() is None:
                for lease in poll.result().leases:
                    self.hand_back(lease)
            else:
                poll.cancel()
            raise
        # Handed back if the worker began to drain while the poll was out.
        self.on_leases(response.leases)

    def begin(self, lease: pb.Lease, *, traced: bool) -> None:
        task_id, lease_id = lease.task_id, lease.lease_id
        ctx = TaskContext(
            _progress_sink=lambda details: self.report_progress(task_id, lease_id, details),
            task_id=task_id,
            task_type=lease.type,
            attempt=lease.attempt,
            max_retries=lease.max_retries,
            lease_id=lease.lease_id,
            deadline=convert.from_timestamp(lease.deadline),
            worker_id=self.worker.worker_id,
        )
        attempt = _Attempt(lease=lease, ctx=ctx, traced=traced)
        earlier = self.attempts.get(task_id)
        if earlier is not None and earlier.lease.lease_id != lease_id:
            # The task was leased to us again, so the server has taken the earlier lease
            # back (reaped, or released by the sweeper) even if no heartbeat has said so
            # yet: that attempt is stopped, and only this one is heartbeated from now on.
            # (A sync handler past its timeout is already stopped and winds down alone.)
            self.abandon(earlier, "lease_lost")
        self.attempts[task_id] = attempt
        self.busy += 1
        attempt.holds_slot = True
        self.metrics.attempt_started(lease.type)
        attempt.runner = asyncio.create_task(self.execute(attempt), name=f"task-{task_id}")

    # --- running an attempt ---------------------------------------------------------------

    async def execute(self, attempt: _Attempt) -> None:
        lease = attempt.lease
        assert self.loop is not None  # noqa: S101
        # This runner is its own asyncio task: the fields bound here reach everything it
        # logs and, through `launch`, the handler.
        bind_task_fields(
            task_id=lease.task_id,
            task_type=lease.type,
            attempt=lease.attempt,
            lease_id=lease.lease_id,
        )
        _HANDLER_OF.set(self.worker)
        try:
            self.log.debug("task started", extra={"event": "task_started"})
            started = self.loop.time()
            # The span is current while the handler runs, so spans the handler opens
            # are its children, in the producer's trace.
            with (
                tracing.handler_span(
                    task_type=lease.type,
                    task_id=lease.task_id,
                    attempt=lease.attempt,
                    worker_id=self.worker.worker_id,
                    trace_context=lease.trace_context,
                    traced=True,
                )
                if attempt.traced
                else _NO_SPAN
            ) as span:
                report = await self.run_handler(attempt)
                outcome = _outcome_label(attempt, report)
                tracing.record_outcome(span, outcome, report.error if report else None)
            took = self.loop.time() - started
            self.metrics.observe_handler(lease.type, outcome, took)
            if outcome == "succeeded":
                self.log.debug("task succeeded in %.3fs", took, extra={"event": "task_succeeded"})
            attempt.finished = report is not None
            if report is not None and self.handler_stopped(attempt):
                # The handler is done: its slot can run the next task while the outcome
                # travels to the server and is committed. The lease stays ours (and
                # heartbeated) until the report is settled.
                self.free_slot(attempt)
                self.unreported += 1
                try:
                    await self.report(attempt, report)
                finally:
                    self.unreported -= 1
                    self.wake_lease_loop()
            elif report is not None:
                await self.report(attempt, report)
            attempt.settled.set()
            await self.handler_ended(attempt)
        except Exception as exc:
            self.log.exception("attempt bookkeeping failed", extra={"event": "worker_bug"})
            self.salvage(attempt, exc)
        finally:
            attempt.settled.set()
            # Only our own entry: a newer attempt of the same task may have replaced it, and
            # removing that one would stop its heartbeats while its handler runs.
            if self.attempts.get(lease.task_id) is attempt:
                del self.attempts[lease.task_id]
            self.free_slot(attempt)

    def salvage(self, attempt: _Attempt, failure: Exception) -> None:
        """Settle an attempt whose bookkeeping failed (a bug, or a codec that raised).

        Its task is reported failed (handed back when the worker is stopping), by calls of
        its own: left unreported, it sat `running` until its lease expired, and that
        expiry was blamed on the worker. Without the failure's message, which may hold
        what the codec was to seal: the worker's log has it.
        """
        if attempt.reported or attempt.stop_reason in ("cancelled", "lease_lost"):
            return  # delivered, or the lease is gone: nothing may be reported
        self.metrics.reports_failed.inc()
        if attempt.stop_reason == "shutdown":
            request = self.handed_back(attempt)
        else:
            request = self.outcome(
                attempt,
                pb.OUTCOME_FAILED,
                error=(
                    f"the worker could not settle the attempt ({type(failure).__name__}); "
                    "its log says why"
                ),
                seal=False,
            )
        self.send_alone(request)

    @staticmethod
    def handler_stopped(attempt: _Attempt) -> bool:
        """Whether the handler has really returned (a sync thread past its timeout has not)."""
        if attempt.thread_future is not None:
            return attempt.thread_future.done()
        return attempt.handler_future is None or attempt.handler_future.done()

    def free_slot(self, attempt: _Attempt) -> None:
        """Give the attempt's handler slot back, once."""
        if attempt.holds_slot:
            attempt.holds_slot = False
            self.busy -= 1
            # The gauge counts slots held, as its help says, not outcomes still travelling:
            # those may be two slot-fulls more (REPORTING_SLOT_FULLS).
            self.metrics.attempt_ended()
            self.wake_lease_loop()

    def wake_lease_loop(self) -> None:
        if self.slot_freed is not None:
            self.slot_freed.set()

    def attempt_log_context(self, attempt: _Attempt) -> contextlib.AbstractContextManager[None]:
        """Bind the attempt's fields for the log lines about it (the worker id is bound)."""
        lease = attempt.lease
        return log_context(
            task_id=lease.task_id,
            task_type=lease.type,
            attempt=lease.attempt,
            lease_id=lease.lease_id,
        )

    async def handler_ended(self, attempt: _Attempt) -> None:
        """Wait until the handler has really stopped running: until then it holds its slot.

        A sync handler's thread cannot be interrupted, and an async handler may swallow its
        cancellation; either way the outcome is already reported, but the worker must not
        start more handlers than `concurrency` (see the module docstring).
        """
        if attempt.thread_future is not None and not attempt.thread_future.done():
            with contextlib.suppress(BaseException):
                await asyncio.wrap_future(attempt.thread_future)
        elif attempt.handler_future is not None and not attempt.handler_future.done():
            await asyncio.wait({attempt.handler_future})

    async def run_handler(self, attempt: _Attempt) -> pb.ReportResultRequest | None:
        """Run the handler under its timeout; return the report to send (None: send none).

        Whatever fails around the handler (a codec that raises, a result that cannot be
        read) fails the attempt with a report naming the error: left unreported, the
        attempt was recorded as a lease expiry that blamed a healthy worker.
        """
        try:
            return await self.run_handler_unguarded(attempt)
        except Exception as exc:
            error = describe_error(exc)
            attempt.ctx.logger.exception(
                "attempt failed around its handler: %s", error, extra={"event": "worker_bug"}
            )
            if attempt.stop_reason in ("cancelled", "lease_lost"):
                return None
            try:
                return self.outcome(attempt, pb.OUTCOME_FAILED, error=error)
            except Exception as sealing:  # the codec fails us: say so in the clear
                # Its own error, not the message it could not seal, which may be secret.
                return self.outcome(
                    attempt,
                    pb.OUTCOME_FAILED,
                    error=f"the worker could not seal the outcome: {describe_error(sealing)}",
                    seal=False,
                )

    async def run_handler_unguarded(self, attempt: _Attempt) -> pb.ReportResultRequest | None:
        lease = attempt.lease
        handler = self.worker.registry.get(lease.type)
        if handler is None:  # never leased in practice: we only ask for registered types
            return self.outcome(attempt, pb.OUTCOME_RELEASED, error="no handler on this worker")
        if attempt.stop_reason is not None:
            # Stopped before its handler started (the drain came first): nothing ran.
            return self.handed_back(attempt) if attempt.stop_reason == "shutdown" else None
        timeout = convert.seconds(lease.timeout)
        future = attempt.handler_future = self.launch(handler, attempt)
        if await _finished_within(future, timeout, attempt):
            return self.settle(attempt, future)
        if attempt.stop_reason is not None:
            return await self.settle_stopped(attempt, future)
        attempt.stop("timeout")
        if attempt.ended_before_stop:
            # It returned as its timeout came: report its own outcome, read from the
            # thread's future (the loop's copy hears of it a callback later, if ever).
            return self.settle(attempt, attempt.thread_future or future)
        self.log.warning(
            "task %s attempt %d timed out after %gs",
            lease.task_id,
            lease.attempt,
            timeout,
            extra={"event": "task_timed_out"},
        )
        return self.outcome(
            attempt,
            pb.OUTCOME_TIMED_OUT,
            error=f"TimeoutError: the handler ran past its timeout of {timeout:g}s",
        )

    async def settle_stopped(
        self, attempt: _Attempt, future: asyncio.Future[Any]
    ) -> pb.ReportResultRequest | None:
        """The report for an attempt the worker stopped while its async handler runs on."""
        if attempt.stop_reason != "shutdown":
            # Cancelled, or its lease lost, and the handler ignores its cancellation: the
            # lease is gone, so nothing may be reported, its timeout included.
            return None
        if attempt.ended_before_stop:
            # It had returned: its own outcome (a sync one's from the thread's future).
            return self.settle(attempt, attempt.thread_future or future)
        if await _finished_within(future, SHUTDOWN_CANCEL_GRACE):
            return self.settle(attempt, future)
        # Waiting for it would keep the task from being handed back at all: the drain gives
        # up on the reports, and the lease would expire, spending an attempt.
        attempt.ctx.logger.warning(
            "the handler ignores its cancellation: handing its task back without it",
            extra={"event": "handler_ignores_cancellation"},
        )
        return self.handed_back(attempt)

    def settle(
        self, attempt: _Attempt, future: asyncio.Future[Any] | Future[Any]
    ) -> pb.ReportResultRequest | None:
        """The report for a handler that has returned, raised or been cancelled."""
        if attempt.stop_reason in ("cancelled", "lease_lost"):
            return None  # the lease is gone; nothing may be reported
        error: BaseException | None = (
            asyncio.CancelledError() if future.cancelled() else future.exception()
        )
        if isinstance(error, _HandlerExited):
            error = error.original
        if (
            error is not None
            and attempt.stop_reason == "shutdown"
            and not attempt.ended_before_stop
        ):
            # Stopped by the shutdown before it could finish: hand the task back.
            return self.handed_back(attempt)
        if error is not None:
            # Includes a handler cancelled by something other than this worker: that is a
            # failed attempt like any other, retried within max_retries.
            attempt.ctx.logger.info(
                "attempt failed: %s", describe_error(error), extra={"event": "task_attempt_failed"}
            )
            return self.outcome(
                attempt,
                pb.OUTCOME_FAILED,
                error=describe_error(error),
                non_retryable=isinstance(error, PermanentFailure),
                # Which key is missing is no secret, and must be readable by whoever has
                # to deploy that key (this worker could not seal it for them anyway).
                seal=not isinstance(error, SealError),
            )
        try:
            result = _result_bytes(future.result())
        except Exception as exc:  # also a buffer that cannot be read (ValueError)
            return self.outcome(attempt, pb.OUTCOME_FAILED, error=describe_error(exc))
        return self.outcome(attempt, pb.OUTCOME_SUCCEEDED, result=result)

    def handed_back(self, attempt: _Attempt) -> pb.ReportResultRequest:
        """The report that hands the attempt's task back at shutdown, attempt unspent.

        Its note is the worker's own and says nothing of the task: unsealed. Sealed, a codec
        that could not seal (its key service down) failed the hand-back, and the attempt was
        reported failed instead: an attempt spent at every stop.
        """
        return self.outcome(attempt, pb.OUTCOME_RELEASED, error="worker shutting down", seal=False)

    def launch(self, handler: RegisteredHandler, attempt: _Attempt) -> asyncio.Future[Any]:
        assert self.loop is not None  # noqa: S101
        codec = self.worker.codec
        payload = attempt.lease.payload
        try:
            payload = _opened_payload(codec, payload, attempt.lease.task_id)
            if handler.is_async:
                # Called here, not in the task: a call that fails before a coroutine exists
                # (the handler takes other arguments) fails the attempt like a sync one.
                handler_call = handler.fn(attempt.ctx, payload)
        except Exception as exc:  # whatever the codec or the call raised
            # A failed attempt like a handler's exception: retried (perhaps on a worker that
            # has the key), and the error says what went wrong (which key was missing).
            unopened: asyncio.Future[Any] = self.loop.create_future()
            unopened.set_exception(exc)
            return unopened
        if handler.is_async:
            return self.loop.create_task(
                _guarded(handler_call, attempt.ctx), name=f"handler-{attempt.lease.task_id}"
            )
        with self.threads_lock:
            self.busy_threads += 1
        self.metrics.sync_handlers_running.inc()
        # Threads do not inherit context variables: run the handler in a copy of this
        # attempt's, so its own log lines carry the task fields.
        thread_future = self.pool.submit(
            contextvars.copy_context().run, _call_sync, handler.fn, attempt.ctx, payload
        )
        # Added before the loop's own callback (wrap_future): once the loop sees the
        # handler done, the count has fallen.
        thread_future.add_done_callback(self._thread_done)
        attempt.thread_future = thread_future
        return asyncio.wrap_future(thread_future, loop=self.loop)

    def _thread_done(self, _future: Future[Any]) -> None:
        """In the handler's thread: it may return long after the loop has closed."""
        with self.threads_lock:
            self.busy_threads -= 1
        self.metrics.sync_handlers_running.dec()

    def outcome(
        self,
        attempt: _Attempt,
        outcome: pb.Outcome.ValueType,
        *,
        result: bytes | None = None,
        error: str = "",
        non_retryable: bool = False,
        seal: bool = True,
    ) -> pb.ReportResultRequest:
        codec = self.worker.codec
        if codec is not None and seal:
            task_id = attempt.lease.task_id
            if result is not None:
                result = codec.seal(result, field="result", task_id=task_id)
            if error:
                error = seal_text(codec, error, field="error", task_id=task_id)
        return pb.ReportResultRequest(
            worker_id=self.worker.worker_id,
            task_id=attempt.lease.task_id,
            lease_id=attempt.lease.lease_id,
            outcome=outcome,
            result=result or b"",
            has_result=result is not None,
            error=error,
            non_retryable=non_retryable,
        )

    async def report(self, attempt: _Attempt, request: pb.ReportResultRequest) -> None:
        """Send the outcome, retrying transient failures while the lease can still be valid.

        Until the lease's known expiry: its latest extension plus a lease duration. The
        attempt is heartbeated while its report is retried, so a report that cannot get
        through to one server is retried for as long as another keeps the lease alive; it
        used to be given up one lease after its first send, whatever the heartbeats did.
        """
        assert self.loop is not None  # noqa: S101
        if attempt.progress is not None:
            await self.send_last_progress(attempt)
        lease = self.lease_duration.total_seconds()
        delays = self.retry.delays()
        while True:
            try:
                await self.reports.send(request)
            except _Unreachable as exc:
                retry_in = exc.retry_in or next(delays)
                failure: object = exc
            except (grpc.aio.AioRpcError, Refused) as exc:
                if exc.code() not in TRANSIENT_CODES:
                    replacement = self._after_refusal(attempt, request, exc)
                    if replacement is None:
                        return
                    request = replacement
                    continue
                # The server answered this report alone with UNAVAILABLE (its database
                # failed the statement: a timeout, a lost connection). The outcome stands
                # and goes again, as when no server answered: it used to be dropped as
                # refused, and the lease expired into a retry of a finished attempt.
                retry_in, failure = next(delays), f"{exc.code().name} {exc.details()}"
                attempt.ctx.logger.info(
                    "the server could not record the outcome yet (%s); sending it again",
                    failure,
                    extra={"event": "report_retried"},
                )
            else:
                attempt.reported = True
                return
            if self.loop.time() >= attempt.lease_renewed_at + lease:
                self.metrics.reports_failed.inc()
                attempt.ctx.logger.error(
                    "could not report the outcome: %s", failure, extra={"event": "report_failed"}
                )
                return
            await asyncio.sleep(retry_in)

    def _after_refusal(
        self,
        attempt: _Attempt,
        request: pb.ReportResultRequest,
        refusal: grpc.aio.AioRpcError | Refused,
    ) -> pb.ReportResultRequest | None:
        """The report to send instead of one the server refused for good, or None."""
        if (
            refusal.code() == grpc.StatusCode.INVALID_ARGUMENT
            and request.outcome == pb.OUTCOME_SUCCEEDED
        ):
            # The result itself was refused (too large): the attempt failed, and running
            # it again would produce the same result.
            return self.outcome(
                attempt,
                pb.OUTCOME_FAILED,
                error=f"InvalidTask: the result was refused: {refusal.details()}",
                non_retryable=True,
            )
        if is_too_large(refusal.code(), refusal.details()):
            replacement = self._shrunk(attempt, request, refusal.details() or "")
            if replacement is not None:
                return replacement
        if refusal.code() == grpc.StatusCode.FAILED_PRECONDITION:
            self.metrics.reports_rejected.inc()
            attempt.ctx.logger.info(
                "outcome refused, the lease is no longer ours: %s",
                refusal.details(),
                extra={"event": "report_rejected"},
            )
            return None
        self.metrics.reports_failed.inc()
        attempt.ctx.logger.error(
            "the outcome was refused: %s %s",
            refusal.code().name,
            refusal.details(),
            extra={"event": "report_failed"},
        )
        return None

    def _shrunk(
        self, attempt: _Attempt, request: pb.ReportResultRequest, details: str
    ) -> pb.ReportResultRequest | None:
        """The report to send instead of one larger than the server takes in a message.

        A result that large fails the attempt for good, as one over the payload limit does
        (the server refuses it before it looks at the payload limit); an error text that
        large is replaced by a note of its size. None: the report has nothing to shrink.
        """
        if request.outcome == pb.OUTCOME_SUCCEEDED:
            replacement = self.outcome(
                attempt,
                pb.OUTCOME_FAILED,
                error=(
                    f"InvalidTask: the result was refused: result is {len(request.result)} "
                    f"bytes, larger than the server takes in one message ({details})"
                ),
                non_retryable=True,
            )
        else:
            replacement = self.outcome(
                attempt,
                request.outcome,
                error=(
                    f"the attempt's error message ({len(request.error)} characters) was "
                    f"larger than the server takes in one message ({details})"
                ),
                non_retryable=request.non_retryable,
            )
        return replacement if report_bytes(replacement) < report_bytes(request) else None

    # --- heartbeats -----------------------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        assert self.loop is not None  # noqa: S101
        assert self.heartbeat_now is not None  # noqa: S101
        last_success = self.loop.time()
        while True:
            # Every interval, or at once when a handler reports progress or draining begins.
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
            # cancellation that ends this loop if it arrives as the event fires.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_interval.total_seconds()):
                    await self.heartbeat_now.wait()
            self.heartbeat_now.clear()
            try:
                last_success = await self.beat(last_success)
            except Exception:
                # Nothing watches this task: had it ended, every lease of this worker would
                # have expired from then on while its handlers ran (a progress note that
                # protobuf could not encode once did that). One beat is lost, not the loop,
                # and a lease's worth of lost beats stops the attempts as silence does.
                self.log.exception("heartbeat failed", extra={"event": "worker_bug"})
                self.stop_if_silent(last_success)
            await asyncio.sleep(MIN_HEARTBEAT_SPACING)

    async def beat(self, last_success: float) -> float:
        """One heartbeat for the leases held; when the servers last heard one."""
        assert self.loop is not None  # noqa: S101
        # Attempts stopped or reported no longer hold a lease worth extending.
        # Sorted by task id, the order in which bulk cancels and retries lock rows, so a
        # heartbeat and an operator's action do not deadlock on the same tasks.
        held = sorted(
            (a for a in self.attempts.values() if a.stop_reason is None and not a.reported),
            key=lambda a: a.lease.task_id,
        )
        sent_progress = {a: a.progress for a in held if a.progress is not None}
        loop_lag_ms = self.watchdog.take_max_lag_ms() if self.watchdog else 0
        stops: list[pb.LeaseToStop] = []
        unregistered = False
        # The server takes at most MAX_HEARTBEAT_LEASES leases a call; more go in several
        # calls, in task id order still (and one call when nothing is held).
        for start in range(0, max(1, len(held)), MAX_HEARTBEAT_LEASES):
            chunk = held[start : start + MAX_HEARTBEAT_LEASES]
            request = self.heartbeat_request(chunk, loop_lag_ms)
            await self.probe_settled()
            sent_at = self.loop.time()
            try:
                # Short deadline: a heartbeat that cannot get through must be noticed well
                # within the lease, not after a long call timeout.
                response, address = await self.call_at(
                    "Heartbeat", request, timeout=self.heartbeat_timeout()
                )
            except (_Unreachable, grpc.aio.AioRpcError) as exc:
                if isinstance(exc, _Unreachable) and exc.probe_held:
                    # The probe is still out: no server was called, so none is blamed.
                    self.log.info(
                        "heartbeat deferred (%s); silent for %.1fs",
                        exc,
                        self.loop.time() - last_success,
                        extra={"event": "heartbeat_deferred"},
                    )
                else:
                    if isinstance(exc, _Unreachable) and exc.address is not None:
                        self.note_heartbeat(exc.address, answered=False, sent_at=sent_at)
                    self.metrics.heartbeat_failures.inc()
                    self.log.warning(
                        "heartbeat failed (%s); silent for %.1fs",
                        exc,
                        self.loop.time() - last_success,
                        extra={"event": "heartbeat_failed"},
                    )
                # The calls before this one got through: their stop orders hold (a task
                # cancelled, a lease lost) whatever became of the rest of the beat, and only
                # the leases not heartbeated may have gone silent (deferred or failed, no
                # heartbeat extended them).
                self.apply_stops(stops)
                self.stop_if_silent(last_success, held[start:])
                return last_success
            self.note_heartbeat(address, answered=True, sent_at=sent_at)
            stops.extend(response.stop)
            unrenewed = {(stop.task_id, stop.lease_id) for stop in response.stop}
            # Left alone because another transaction held the task's row: not renewed, so
            # a lease that stays so for a whole lease is stopped as a silent one is.
            unrenewed.update((ref.task_id, ref.lease_id) for ref in response.not_extended)
            for attempt in chunk:
                if (attempt.lease.task_id, attempt.lease.lease_id) not in unrenewed:
                    attempt.lease_renewed_at = sent_at
            unregistered = unregistered or response.unregistered
        if unregistered:  # once a beat, however many calls it took
            await self.register_again()
        for attempt, progress in sent_progress.items():
            if attempt.progress == progress:
                attempt.progress = None
        self.apply_stops(stops)
        self.stop_unrenewed(held)
        return self.loop.time()

    def heartbeat_request(self, attempts: list[_Attempt], loop_lag_ms: int) -> pb.HeartbeatRequest:
        """A heartbeat for the leases of `attempts`, with their progress notes not yet sent."""
        return pb.HeartbeatRequest(
            worker_id=self.worker.worker_id,
            leases=[
                pb.LeaseRef(
                    task_id=a.lease.task_id,
                    lease_id=a.lease.lease_id,
                    progress=a.progress or "",
                    has_progress=a.progress is not None,
                )
                for a in attempts
            ],
            draining=self.draining,
            in_flight=self.busy,
            loop_lag_ms=loop_lag_ms,
        )

    async def send_last_progress(self, attempt: _Attempt) -> None:
        """Record the progress note an attempt made after its last heartbeat, before its outcome.

        A handler that reports progress and then returns (a last "6 of 6 pages") finishes
        before the next heartbeat, and heartbeats leave an attempt out once it finishes: the
        note was never stored, and the finished task showed the one before it. One
        heartbeat call for that lease first, then; the outcome does not wait on it beyond
        a heartbeat's deadline, and its failure loses only the note (logged).
        """
        progress = attempt.progress
        loop_lag_ms = self.watchdog.take_max_lag_ms() if self.watchdog else 0
        try:
            await self.call_at(
                "Heartbeat",
                self.heartbeat_request([attempt], loop_lag_ms),
                timeout=self.heartbeat_timeout(),
            )
        except (_Unreachable, grpc.aio.AioRpcError) as exc:
            attempt.ctx.logger.info(
                "the attempt's last progress note was not recorded: %s",
                exc,
                extra={"event": "progress_not_recorded"},
            )
            return
        if attempt.progress == progress:
            attempt.progress = None

    def apply_stops(self, stops: list[pb.LeaseToStop]) -> None:
        """Stop the attempts a heartbeat's answer named (only the lease it named).

        Not an attempt whose outcome is already being reported: a heartbeat that named its
        lease and was answered after the outcome committed says the lease is over, as it
        is, and the worker warned "its lease was lost" of a task that had succeeded.
        """
        for stop in stops:
            stopped = self.attempts.get(stop.task_id)
            if (
                stopped is not None
                and stopped.lease.lease_id == stop.lease_id
                and not stopped.finished
                and not stopped.reported
            ):
                cancelled = stop.reason == pb.STOP_REASON_CANCELLED
                self.abandon(stopped, "cancelled" if cancelled else "lease_lost")

    def stop_if_silent(self, last_success: float, held: list[_Attempt] | None = None) -> None:
        """Stop the attempts of `held` whose lease may be gone after a lease of silence.

        `held` is by default every attempt holding a lease; of those, each whose own lease
        has gone a whole lease duration without being granted or renewed is stopped. Not
        by the worker's silence alone: a lease the Work stream granted during a heartbeat
        outage is good for a whole lease, and was stopped at the next failed beat, its
        outcome lost, its task run again.
        """
        assert self.loop is not None  # noqa: S101
        if self.loop.time() - last_success < self.lease_duration.total_seconds():
            return  # the common case: every lease was renewed since
        if held is None:
            held = [a for a in self.attempts.values() if a.stop_reason is None and not a.reported]
        self.stop_unrenewed(held)

    def stop_unrenewed(self, held: list[_Attempt]) -> None:
        """Stop each attempt of `held` whose lease went a whole lease without renewal.

        After a failed beat (`stop_if_silent`), and after an answered one for the leases it
        left alone because another transaction held their rows: such a lease may have
        expired under that lock, and the task then runs elsewhere.
        """
        assert self.loop is not None  # noqa: S101
        now, lease = self.loop.time(), self.lease_duration.total_seconds()
        for attempt in held:
            if (
                attempt.stop_reason is None
                and not attempt.reported
                and now - attempt.lease_renewed_at >= lease
            ):
                self.abandon(attempt, "lease_lost")

    def report_progress(self, task_id: str, lease_id: str, details: str | None) -> None:
        """Thread-safe: ctx.heartbeat(details) from a handler."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        if _running_loop() is loop:
            # An async handler: recorded now, for a handler that returns next finishes
            # before a callback scheduled here would run, and its outcome would be sent
            # without the note (`send_last_progress`).
            self._record_progress(task_id, lease_id, details)
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._record_progress, task_id, lease_id, details)

    def _record_progress(self, task_id: str, lease_id: str, details: str | None) -> None:
        attempt = self.attempts.get(task_id)
        if attempt is None or attempt.lease.lease_id != lease_id:
            return  # the attempt is over, or a newer one of the same task runs
        if details is not None:
            details = convert.wire_text(details)
            codec = self.worker.codec
            attempt.progress = (
                seal_text(codec, details, field="progress", task_id=task_id)
                if codec is not None
                else kept_text(details)
            )
        if self.heartbeat_now is not None:
            self.heartbeat_now.set()

    def heartbeat_timeout(self) -> float:
        """Deadline of one heartbeat call: a quarter of the lease, at most `call_timeout`."""
        shortest = SHORTEST_CALL_TIMEOUT.total_seconds()
        return max(shortest, min(self.call_timeout, self.lease_duration.total_seconds() / 4))

    def abandon(self, attempt: _Attempt, reason: str) -> None:
        if attempt.stop_reason is not None:
            return
        # Called from the heartbeat loop, outside the attempt's own context.
        with self.attempt_log_context(attempt):
            self.log.warning(
                "stopping task %s: %s",
                attempt.lease.task_id,
                "it was cancelled" if reason == "cancelled" else "its lease was lost",
                extra={"event": f"task_{reason}"},
            )
        attempt.stop(reason)

    # --- shutdown -------------------------------------------------------------------------

    async def drain(self) -> None:
        # The drain waits for outcomes, not for handlers: an attempt already settled (timed
        # out, or its task cancelled) whose handler ignores its cancellation has nothing
        # left to report. Waiting on its runner, which waits for that handler, kept every
        # such stop for the whole drain timeout, and then logged a hand-back that sent
        # nothing.
        unsettled = [a for a in self.attempts.values() if a.runner and not a.settled.is_set()]
        if unsettled:
            assert self.drain_cut is not None  # noqa: S101 - set in main()
            # Until every attempt is settled, the drain timeout passes, or `hand_back_now`.
            settling = [asyncio.ensure_future(a.settled.wait()) for a in unsettled]
            all_settled = asyncio.ensure_future(asyncio.wait(settling))
            cut = asyncio.ensure_future(self.drain_cut.wait())
            await asyncio.wait(
                {all_settled, cut},
                timeout=self.worker.drain_timeout.total_seconds(),
                return_when=asyncio.FIRST_COMPLETED,
            )
            for waiter in (all_settled, cut, *settling):
                waiter.cancel()
        remaining = [
            a
            for a in self.attempts.values()
            if a.runner and not a.runner.done() and not a.settled.is_set()
        ]
        for attempt in remaining:
            with self.attempt_log_context(attempt):
                self.log.info(
                    "handing back task %s",
                    attempt.lease.task_id,
                    extra={"event": "task_released"},
                )
            attempt.stop("shutdown")
        # Each stopped attempt reports RELEASED from its own runner. Wait for the reports,
        # not for sync threads that ignore cancellation: their leases are already handed back.
        settled = [asyncio.create_task(a.settled.wait()) for a in remaining]
        assert self.loop is not None  # noqa: S101 - set in main()
        give_up_at = self.loop.time() + HAND_BACK_WAIT
        waiting: list[asyncio.Future[Any]] = [*settled, *self.hand_backs]
        # Again for the hand-backs started meanwhile: an attempt whose bookkeeping fails as
        # it ends is salvaged by a hand-back of its own (`salvage`), begun after the list
        # above was taken. Not waited for, it was cut off when the worker said goodbye and
        # closed its channels, and the task waited for its lease to expire.
        while waiting and (left := give_up_at - self.loop.time()) > 0:
            await asyncio.wait(waiting, timeout=left)
            waiting = [task for task in self.hand_backs if not task.done()]


def _replaceable(ended: grpc.aio.AioRpcError) -> bool:
    """Whether a Work stream that ended with this status is to be replaced, not a refusal."""
    # grpc.aio turns a write that raced the server's end of the call into INTERNAL
    # (grpc/grpc#43486).
    return ended.code() in TRANSIENT_CODES or ended.code() == grpc.StatusCode.INTERNAL


_REPORTED_OUTCOMES: Final = {
    pb.OUTCOME_SUCCEEDED: "succeeded",
    pb.OUTCOME_FAILED: "failed",
    pb.OUTCOME_TIMED_OUT: "timed_out",
    pb.OUTCOME_RELEASED: "released",
}


async def _finished_within(
    future: asyncio.Future[Any], timeout: float, attempt: _Attempt | None = None
) -> bool:
    """Wait until `future` is done, `timeout` passes or `attempt` is stopped; if it is done.

    `asyncio.wait({future}, timeout=...)` for one future, without its set, its per-call
    checks and its counter: it ran once per attempt. The future is not cancelled either way.
    """
    if future.done():
        return True
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_later(timeout, wake)
    future.add_done_callback(wake)
    if attempt is not None:
        attempt.wake_runner = wake
    try:
        await waiter
    finally:
        timer.cancel()
        future.remove_done_callback(wake)
        if attempt is not None:
            attempt.wake_runner = None
    return future.done()


def _outcome_label(attempt: _Attempt, report: pb.ReportResultRequest | None) -> str:
    """The `outcome` label of a handler run (see OUTCOMES in worker/metrics.py)."""
    if report is None:
        # Nothing may be reported only when the lease went away under the handler.
        return "cancelled" if attempt.stop_reason == "cancelled" else "lease_lost"
    return _REPORTED_OUTCOMES.get(report.outcome, "failed")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
