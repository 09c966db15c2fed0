"""One table maps Conveyor errors to gRPC status codes, in both directions.

Servers raise typed errors and `abort_with` turns them into a status with the error's
message; clients and workers turn a status back into the same typed error with
`error_from_status`, so a caller catches `TaskNotFound` whether it came from local
validation or from a server two hops away.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Final

import grpc

from conveyor.errors import (
    ConfigError,
    ConveyorError,
    InvalidTask,
    LeaseLost,
    LimitExceeded,
    PermissionDenied,
    SchemaMismatch,
    ServerUnavailable,
    TaskAlreadyFinished,
    TaskNotFound,
    Unauthenticated,
)

if TYPE_CHECKING:
    from collections.abc import Callable

ERROR_STATUS: Final[dict[type[ConveyorError], grpc.StatusCode]] = {
    InvalidTask: grpc.StatusCode.INVALID_ARGUMENT,
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    TaskNotFound: grpc.StatusCode.NOT_FOUND,
    TaskAlreadyFinished: grpc.StatusCode.FAILED_PRECONDITION,
    LeaseLost: grpc.StatusCode.FAILED_PRECONDITION,
    ServerUnavailable: grpc.StatusCode.UNAVAILABLE,
    SchemaMismatch: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# FAILED_PRECONDITION is shared by two errors; a prefix in the message tells them apart
# without a second channel (trailing metadata would do, but is easy for proxies to drop).
_LEASE_LOST_PREFIX: Final = "lease lost: "
_ALREADY_FINISHED_PREFIX: Final = "already finished: "
# The field an INVALID_ARGUMENT blames (InvalidTask.field), as trailing metadata of a call
# and `field` of an enqueue stream's answer. Losing it to a proxy loses only the attribute:
# the message names the field too.
FIELD_METADATA: Final = "conveyor-field"

# Worth retrying on another server. CANCELLED is here because Conveyor's clients never
# cancel their own calls: a CANCELLED status comes from a server that is shutting down and
# dropped calls it had received but not started (grpc/grpc#41785). Every call is safe to
# repeat (enqueue is idempotent by id, reports are fenced).
TRANSIENT_CODES: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)

# RESOURCE_EXHAUSTED is also what gRPC answers for a message over its size limit, which no
# retry will fix; these two refusals are backpressure, and a later retry is what they ask.
RATE_LIMIT_PREFIX: Final = "request rate limit"
# A rate refusal ends with when the caller's next request would be admitted; the clients
# wait at least that long before asking again (and no budget is spent on a retry that is
# sure to be refused). In the message, not trailing metadata, for the reason above.
_RETRY_HINT: Final = re.compile(r"; retry in (?P<ms>\d+) ms$")
_CONCURRENCY_LIMIT: Final = "Concurrent RPC limit exceeded!"
# In "Received message larger than max (N vs. M)" (the receiver's limit) and "Sent message
# larger than max (N vs. M)" (the sender's own).
_TOO_LARGE: Final = "message larger than max"


# gRPC's wording, e.g. "SERVER: Received message larger than max (20971587 vs. 16777216)".
_TOO_LARGE_DETAILS: Final = re.compile(
    r"(?:(?P<end>CLIENT|SERVER): )?(?P<way>Received|Sent) message larger than max "
    r"\((?P<size>\d+) vs\. (?P<limit>\d+)\)"
)


def is_too_large(code: grpc.StatusCode, details: str | None) -> bool:
    """Whether a refusal is gRPC's own for a message over a size limit (either end's)."""
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE in (details or "")


def too_large_error(details: str) -> ConveyorError:
    """The error for gRPC's refusal of a message over a size limit, in Conveyor's words.

    A request too large (the server received it, or this end would not send it) is an
    InvalidTask, like a payload over the server's payload limit: the same cause, and no
    retry will help. An answer too large for this end (a page of tasks with large
    payloads) is a LimitExceeded: ask for less.
    """
    found = _TOO_LARGE_DETAILS.search(details)
    if found is None:
        return InvalidTask(
            f"the message is larger than the server or this client accepts ({details}); "
            f"send smaller payloads"
        )
    size, limit = found["size"], found["limit"]
    # The server receiving, or a client sending: a request (a worker's report included).
    about_request = (found["end"] == "SERVER") == (found["way"] == "Received")
    if found["end"] is None or about_request:
        whose = "the server's" if found["way"] == "Received" else "this client's"
        return InvalidTask(
            f"the request is {size} bytes, over {whose} message limit of {limit} bytes: a "
            f"task's payload "
            f"must fit in the server's payload limit (max_payload_bytes, 1 MiB by default); "
            f"store large data elsewhere and pass a reference in the payload",
            field="payload",
        )
    return LimitExceeded(
        f"the server's answer is {size} bytes, over this client's message limit of {limit} "
        f"bytes: ask for less (a smaller limit, or without payloads)"
    )


def rate_limit_refusal(limit: str, wait: float) -> str:
    """The message of a rate refusal: `limit` refused, a request admitted in `wait` seconds.

    The hint is rounded up, so that a caller waiting it out finds a request's worth there.
    """
    return f"{RATE_LIMIT_PREFIX} {limit} exceeded; retry in {math.ceil(wait * 1000)} ms"


def retry_hint(details: str | None) -> float:
    """Seconds a refusal asks its caller to wait before retrying; 0.0 if it names none."""
    found = _RETRY_HINT.search(details or "")
    return int(found["ms"]) / 1000 if found else 0.0


def is_backpressure(code: grpc.StatusCode, details: str | None) -> bool:
    """Whether a refusal means "not now": the server's rate or concurrency limit."""
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and (
        (details or "").startswith(RATE_LIMIT_PREFIX) or details == _CONCURRENCY_LIMIT
    )


def blamed_field(error: ConveyorError) -> str | None:
    """The field an error blames, to travel beside its status (FIELD_METADATA)."""
    return error.field if isinstance(error, InvalidTask) else None


def blamed_by(error: grpc.RpcError) -> str | None:
    """The field a failed call or answered status blames (FIELD_METADATA), if any."""
    if isinstance(error, AnsweredStatus):
        return error.field
    trailing = getattr(error, "trailing_metadata", None)
    # Pairs, whatever grpc's stubs say (a sync call's are named tuples, aio's a Metadata).
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == FIELD_METADATA and isinstance(value, str):
            return value
    return None


def status_for(error: ConveyorError) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message that carry `error` over the wire."""
    for cls in type(error).__mro__:
        code = ERROR_STATUS.get(cls)
        if code is not None:
            break
    else:
        code = grpc.StatusCode.UNKNOWN
    message = error.message
    if isinstance(error, LeaseLost):
        message = _LEASE_LOST_PREFIX + message
    elif isinstance(error, TaskAlreadyFinished):
        message = _ALREADY_FINISHED_PREFIX + message
    return code, message


def _limit_exceeded(message: str) -> LimitExceeded:
    return LimitExceeded(message, retry_in=retry_hint(message))


# Codes that carry exactly one error class each (FAILED_PRECONDITION and UNAVAILABLE need
# a closer look, below).
_ERROR_FOR_CODE: Final[dict[grpc.StatusCode, Callable[[str], ConveyorError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidTask,
    grpc.StatusCode.NOT_FOUND: TaskNotFound.from_message,  # with the id it names
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: _limit_exceeded,
}


def error_from_status(
    code: grpc.StatusCode, details: str | None, field: str | None = None
) -> ConveyorError:
    """The typed error a client raises for a non-OK status (`field`: what it blames)."""
    message = details or code.name
    if is_too_large(code, details):
        return too_large_error(message)
    simple = _ERROR_FOR_CODE.get(code)
    if simple is not None:
        error = simple(message)
        if field and isinstance(error, InvalidTask):
            error.field = field
        return error
    match code:
        case grpc.StatusCode.FAILED_PRECONDITION if message.startswith(_LEASE_LOST_PREFIX):
            return LeaseLost(message.removeprefix(_LEASE_LOST_PREFIX))
        case grpc.StatusCode.FAILED_PRECONDITION if message.startswith(_ALREADY_FINISHED_PREFIX):
            return TaskAlreadyFinished.from_message(message.removeprefix(_ALREADY_FINISHED_PREFIX))
        case grpc.StatusCode.UNAVAILABLE | grpc.StatusCode.DEADLINE_EXCEEDED:
            return ServerUnavailable(f"{code.name}: {message}")
        case _:
            return ConveyorError(f"{code.name}: {message}")


_CODES_BY_NUMBER: Final = {code.value[0]: code for code in grpc.StatusCode}


def code_from_number(number: int) -> grpc.StatusCode:
    """The status code a message carries as its number (UNKNOWN for one gRPC lacks)."""
    return _CODES_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


class AnsweredStatus(grpc.RpcError):
    """A status the server answered for one item of a batch or a stream, not for a call.

    Shaped like a failed call's error (`code()`, `details()`), so whatever handles a failed
    call handles it the same way; `field` is what a call carries in its trailing metadata.
    """

    def __init__(self, code: grpc.StatusCode, details: str, field: str | None = None) -> None:
        """Keep the status, and the field it blames if it names one."""
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details
        self.field = field

    def code(self) -> grpc.StatusCode:
        """The status code."""
        return self._code

    def details(self) -> str:
        """The server's message."""
        return self._details
