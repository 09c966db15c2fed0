"""The RPC boundary, where errors become gRPC statuses.

Every servicer method runs inside `rpc_method` (`stream_method` for streams), which admits
the caller through the servicer's gate (authentication and role, see `security.Gate`),
times the call, and turns typed errors and driver failures into gRPC statuses with a
one-line message. Streams and long polls are timed in a histogram of their own: they last
as long as there is nothing to do, and would swamp the latency of the requests.

A client therefore never sees a stack trace: INVALID_ARGUMENT, NOT_FOUND,
FAILED_PRECONDITION and UNAVAILABLE carry Conveyor's own messages, and anything unforeseen
is logged here with its traceback and answered INTERNAL.

`add_service` registers a servicer the way the generated `add_*_to_server` functions do,
except for requests that do not decode (corrupt bytes, invalid UTF-8 in a string field):
grpc.aio would answer those UNKNOWN before any of our code ran, and here they reach
`rpc_method` as `Malformed` and are answered INVALID_ARGUMENT like any other bad input.
`outliving_the_call` runs a write and its counting to their end when the call that asked
for it is cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import TYPE_CHECKING, Any, Final, TypeVar

import grpc
from google.protobuf.message import DecodeError

from conveyor.errors import ConveyorError, InvalidTask, PermissionDenied, ServerUnavailable
from conveyor.protocol.status import FIELD_METADATA, blamed_field, status_for
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.server.security import caller as current_caller
from conveyor.server.security import enter_call, leave_call

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from conveyor.monitoring.metrics import ServerMetrics
    from conveyor.server.security import Gate

log = logging.getLogger("conveyor.server.rpc")

# What `context.read()` returns once a stream's client has half-closed (not in the stubs).
EOF: Final[object] = grpc.aio.EOF  # type: ignore[attr-defined]

Request = TypeVar("Request")
Response = TypeVar("Response")
Result = TypeVar("Result")


async def outliving_the_call(work: Awaitable[Result]) -> Result:
    """`work`'s result, with `work` run to its end even if the call awaiting it is cancelled.

    For a write and the metrics that count it: a call cancelled (deadline, client gone)
    while its statement runs may still have it commit, and the client's retry is then an
    idempotent repeat that is not counted, so the write must count itself whatever becomes
    of the call. A cancelled call waits for the work, then ends cancelled; cancelled again
    while it waits (the server stopping as well), it still waits.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # Not `await task`: a further cancellation reached the work through it, and a
        # claim's hand-back stopped between two leases, leaving the rest to expire.
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task})
        if not task.cancelled():
            # Its error, if any, is nobody's to answer: the caller is gone.
            task.exception()
        raise


def server_stopping() -> ServerUnavailable:
    """The answer to a call the server will not finish because it is stopping."""
    return ServerUnavailable("the server is stopping; retry on another")


class Malformed:
    """A request whose bytes did not decode; `rpc_method` answers it INVALID_ARGUMENT."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        """Keep what the decoder said."""
        self.reason = reason


class Refusal:
    """The status a request is answered with instead of a response."""

    __slots__ = ("code", "field", "message")

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None) -> None:
        """Keep the status, and the field it blames (InvalidTask.field) if any."""
        self.code = code
        self.message = message
        self.field = field

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """The field, for the call's trailing metadata."""
        return ((FIELD_METADATA, self.field),) if self.field else ()


def _decoder(message_type: Any) -> Callable[[bytes], Any]:
    parse = message_type.FromString

    def decode(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Malformed(str(exc) or "the bytes are not a valid message")

    return decode


def add_service(server: grpc.aio.Server, servicer: object, service: str) -> None:
    """Serve `servicer` as the conveyor.v1 service named `service` (see the module docstring)."""
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        if method.client_streaming != method.server_streaming:
            raise TypeError(f"{method.full_name}: only unary and bidirectional methods here")
        make = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_decoder(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )
    # grpcio >= 1.62 looks registered methods up without the generic handlers' string
    # matching, as the generated code does; the stubs do not know the method yet.
    register = getattr(server, "add_registered_method_handlers", None)
    if register is not None:
        register(descriptor.full_name, handlers)


def _admit(gate: Gate, name: str, request: object, context: Any) -> object | None:
    """Let the caller in (or raise); the token to hand to `leave_call`, if one was entered."""
    caller = enter_call(gate.admit(name, context.invocation_metadata)) if gate.enabled else None
    if isinstance(request, Malformed):
        if caller is not None:
            leave_call(caller)
        raise InvalidTask(f"malformed {name} request: {request.reason}")
    return caller


async def _answer(
    service: Any,
    name: str,
    request: object,
    context: Any,
    body: Callable[[], Awaitable[Response]],
    *,
    long_lived: bool,
) -> Response:
    """Run `body()`, one call's work, behind the gate; its errors become statuses."""
    outcome = await attempt(service, name, request, context, body, long_lived=long_lived)
    if isinstance(outcome, Refusal):
        await context.abort(
            outcome.code, outcome.message, trailing_metadata=outcome.trailing_metadata()
        )
    return outcome  # type: ignore[return-value]  # abort raised for a Refusal


async def attempt(
    service: Any,
    name: str,
    request: object,
    context: Any,
    body: Callable[[], Awaitable[Response]],
    *,
    long_lived: bool = False,
) -> Response | Refusal:
    """Run `body()` as RPC `name` would be: its response, or the status it ends with.

    The gate, the metrics and the error translation of a call, for a unary method and for
    each request on a stream (`enqueue_stream.py`), which answers a refusal with a message
    instead of ending the call. `long_lived`: a stream or a long poll, timed apart from
    the requests.
    """
    metrics: ServerMetrics = service.metrics
    gate: Gate = service.gate
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    caller = None
    try:
        caller = _admit(gate, name, request, context)
        return await body()
    except ConveyorError as exc:
        if isinstance(exc, PermissionDenied) and caller is not None:
            # Refused past the gate (task types, another worker's id); the gate notes its
            # own refusals.
            gate.note_denied(name, exc, current_caller())
        code, message = status_for(exc)
        if isinstance(exc, ServerUnavailable):
            log.warning("%s unavailable: %s", name, exc, extra={"event": "rpc_unavailable"})
        return Refusal(code, message, blamed_field(exc))
    except grpc.aio.AbortError:
        # Aborted inside the method (an RPC it does not serve here): count its own code.
        code = context.code() or grpc.StatusCode.UNKNOWN
        raise
    except Exception:
        code = grpc.StatusCode.INTERNAL
        log.exception("%s failed", name, extra={"event": "rpc_internal_error"})
        return Refusal(code, f"internal error in {name}; see the server log")
    except BaseException:  # cancelled: the caller went away or the server stops
        code = grpc.StatusCode.CANCELLED
        raise
    finally:
        if caller is not None:
            leave_call(caller)
        metrics.observe_rpc(name, code.name, time.perf_counter() - started, long_lived=long_lived)


def rpc_method(
    name: str, *, long_poll: bool = False
) -> Callable[
    [Callable[[Any, Request, Any], Awaitable[Response]]],
    Callable[[Any, Request, Any], Awaitable[Response]],
]:
    """Decorate a servicer method: metrics, error translation, no tracebacks on the wire.

    `long_poll`: the method waits for something to happen (LeaseTasks), so its duration is
    not latency and is timed with the streams.
    """

    def decorate(
        method: Callable[[Any, Request, Any], Awaitable[Response]],
    ) -> Callable[[Any, Request, Any], Awaitable[Response]]:
        @functools.wraps(method)
        async def wrapper(self: Any, request: Request, context: Any) -> Response:
            return await _answer(
                self,
                name,
                request,
                context,
                lambda: method(self, request, context),
                long_lived=long_poll,
            )

        return wrapper

    return decorate


def stream_method(
    name: str,
) -> Callable[[Callable[[Any, Any], Awaitable[None]]], Callable[[Any, Any, Any], Awaitable[None]]]:
    """Decorate a bidirectional servicer method, `method(self, context)`, as `rpc_method` does.

    The method reads its requests with `context.read()`, each decoded or a `Malformed`,
    and writes with `context.write()`; a raised error ends the call with its status.
    """

    def decorate(
        method: Callable[[Any, Any], Awaitable[None]],
    ) -> Callable[[Any, Any, Any], Awaitable[None]]:
        @functools.wraps(method)
        async def wrapper(self: Any, _requests: object, context: Any) -> None:
            await _answer(self, name, None, context, lambda: method(self, context), long_lived=True)

        return wrapper

    return decorate
