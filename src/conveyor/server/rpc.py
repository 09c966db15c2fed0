"""The RPC boundary, where errors become gRPC statuses.

Every servicer method runs inside `rpc_method`, which admits the caller through the
servicer's gate (authentication and role, see `security.Gate`), times the call, and turns
typed errors and driver failures into gRPC statuses with a one-line message.

A client therefore never sees a stack trace: INVALID_ARGUMENT, NOT_FOUND,
FAILED_PRECONDITION and UNAVAILABLE carry Conveyor's own messages, and anything unforeseen
is logged here with its traceback and answered INTERNAL.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from conveyor.errors import ConveyorError, ServerUnavailable
from conveyor.protocol.status import status_for
from conveyor.server.security import enter_call, leave_call

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from conveyor.monitoring.metrics import ServerMetrics
    from conveyor.server.security import Gate

log = logging.getLogger("conveyor.server.rpc")

Request = TypeVar("Request")
Response = TypeVar("Response")


def server_stopping() -> ServerUnavailable:
    """The answer to a call the server will not finish because it is stopping."""
    return ServerUnavailable("the server is stopping; retry on another")


def rpc_method(
    name: str,
) -> Callable[
    [Callable[[Any, Request, Any], Awaitable[Response]]],
    Callable[[Any, Request, Any], Awaitable[Response]],
]:
    """Decorate a servicer method: metrics, error translation, no tracebacks on the wire."""

    def decorate(
        method: Callable[[Any, Request, Any], Awaitable[Response]],
    ) -> Callable[[Any, Request, Any], Awaitable[Response]]:
        @functools.wraps(method)
        async def wrapper(self: Any, request: Request, context: Any) -> Response:
            metrics: ServerMetrics = self.metrics
            gate: Gate = self.gate
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            caller = None
            try:
                if gate.enabled:
                    caller = enter_call(gate.admit(name, context.invocation_metadata()))
                return await method(self, request, context)
            except ConveyorError as exc:
                code, message = status_for(exc)
                if isinstance(exc, ServerUnavailable):
                    log.warning("%s unavailable: %s", name, exc, extra={"event": "rpc_unavailable"})
                await context.abort(code, message)
                raise  # abort raises; this keeps type checkers content
            except grpc.aio.AbortError:
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("%s failed", name, extra={"event": "rpc_internal_error"})
                await context.abort(code, f"internal error in {name}; see the server log")
                raise
            except BaseException:  # cancelled: the caller went away or the server stops
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                if caller is not None:
                    leave_call(caller)
                metrics.observe_rpc(name, code.name, time.perf_counter() - started)

        return wrapper

    return decorate
