"""OpenTelemetry trace propagation from enqueue to handler, when `opentelemetry-api` is present.

Install the `otel` extra (or any OpenTelemetry setup) and a task's handler span joins the
trace of the code that enqueued it: the client opens a PRODUCER span around the enqueue and
sends its W3C trace context (traceparent, tracestate) with each task; the server stores it
opaquely; the worker opens a CONSUMER span around each attempt, parented on it. Without the
package every function here is a no-op, so Conveyor does not depend on OpenTelemetry.
Spans follow the OpenTelemetry messaging conventions (`messaging.system`, operation names).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from conveyor.protocol.limits import MAX_TRACE_VALUE

try:
    from opentelemetry import propagate, trace
except ImportError:  # the optional extra is not installed
    propagate = None  # type: ignore[assignment]
    trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

TRACER_NAME = "conveyor"
TRACE_KEYS = frozenset({"traceparent", "tracestate"})
MAX_NAMED_TYPES = 5
# W3C's size past which a tracestate list member is the first to be dropped.
_LONG_MEMBER = 128


def enabled() -> bool:
    """Whether spans would be recorded: OpenTelemetry is importable and configured.

    With the API installed but no SDK (a tracer provider) set up, every span would be a
    no-op that still costs a few percent of a worker's time per task: skip the work.
    """
    return trace is not None and not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider
    )


@contextlib.contextmanager
def enqueue_span(task_types: Iterable[str], count: int) -> Iterator[dict[str, str]]:
    """A PRODUCER span for one enqueue call; yields the trace context to send with its tasks.

    `task_types` is read only when spans are recorded (a generator costs nothing otherwise).
    """
    if propagate is None or trace is None or not enabled():
        yield {}
        return
    # A batch names its types; a few are enough to recognise it.
    names = sorted(set(task_types))[:MAX_NAMED_TYPES]
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        f"send {names[0]}" if len(names) == 1 else "send",
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": "conveyor",
            "messaging.operation.type": "send",
            "messaging.destination.name": ",".join(names),
            "messaging.batch.message_count": count,
        },
    ):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        # Only the W3C trace context travels: baggage can be large and is the producer's
        # business, and every entry is stored with the task and sent with each lease.
        context = {key: value for key, value in carrier.items() if key in TRACE_KEYS}
        if len(context.get("tracestate", "")) > MAX_TRACE_VALUE:
            trimmed = trimmed_tracestate(context["tracestate"])
            if trimmed:
                context["tracestate"] = trimmed
            else:
                del context["tracestate"]
        yield context


def trimmed_tracestate(value: str, limit: int = MAX_TRACE_VALUE) -> str:
    """A `tracestate` cut to `limit` characters the way W3C Trace Context allows.

    An upstream service may hand on up to 32 vendors' entries, far more than a task stores
    (the server refuses a longer value, and a traced enqueue failed on every call). W3C
    says what to drop: list members over 128 characters first, then members from the end,
    the least recently added. Members are kept whole; "" when none fits.
    """
    members = [member.strip() for member in value.split(",") if member.strip()]
    size = len(",".join(members))
    for index in reversed(range(len(members))):
        if size <= limit:
            break
        if len(members[index]) > _LONG_MEMBER:
            size -= len(members.pop(index)) + (1 if members else 0)
    while members and size > limit:
        size -= len(members.pop()) + (1 if members else 0)
    return ",".join(members)


@contextlib.contextmanager
def handler_span(
    *,
    task_type: str,
    task_id: str,
    attempt: int,
    worker_id: str,
    trace_context: Mapping[str, str],
    traced: bool | None = None,
) -> Iterator[Any]:
    """A CONSUMER span around one attempt, child of the producer's span when it sent one.

    `traced` is `enabled()` when the caller already asked (a worker asks once per batch of
    leases: asking costs an environment lookup in the OpenTelemetry API, per task otherwise).
    """
    if traced is None:
        traced = enabled()
    if propagate is None or trace is None or not traced:
        yield None
        return
    parent = propagate.extract(dict(trace_context)) if trace_context else None
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        f"process {task_type}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "conveyor",
            "messaging.operation.type": "process",
            "messaging.destination.name": task_type,
            "messaging.message.id": task_id,
            "conveyor.attempt": attempt,
            "conveyor.worker.id": worker_id,
        },
    ) as span:
        yield span


def record_outcome(span: Any, outcome: str, error: str | None) -> None:
    """Mark a handler span with the attempt's outcome; anything but success is an error."""
    if span is None or trace is None:
        return
    span.set_attribute("conveyor.outcome", outcome)
    if outcome != "succeeded":
        span.set_status(trace.Status(trace.StatusCode.ERROR, error or outcome))
