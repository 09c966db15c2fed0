"""Writing one message on a grpc.aio stream call, from the client's end or the worker's.

grpc.aio reports a write that did not go in three ways: an AioRpcError or an
InvalidStateError once the call is over, and a CancelledError when the call was cancelled
locally (a deadline ended it, or its owner replaced it). That CancelledError is not the
writing task being cancelled, and must not be taken for it, nor pass for one: the enqueue
stream and the Work stream both turn it into "the stream ended" for their callers.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import grpc

WriteFailure = Literal["cancelled", "ended"]


async def write_message(call: Any, message: Any) -> WriteFailure | None:
    """Write `message` on `call`; None once written, else why it did not go.

    "cancelled": the call was cancelled locally; "ended": the call is over (its reader
    says how). A cancellation of the writing task itself is raised as such.
    """
    try:
        await call.write(message)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # this task is being cancelled, not the write
        return "cancelled"
    except (grpc.aio.AioRpcError, grpc.aio.BaseError, asyncio.InvalidStateError):
        return "ended"
    return None
