"""AsyncClient: the asyncio twin of `Client`, with the same method names as coroutines."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Self

import grpc

from conveyor.client import core
from conveyor.client.channel import CHANNEL_OPTIONS, AddressRing, RetryPolicy, parse_addresses
from conveyor.errors import ServerUnavailable
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

    from conveyor.types import Task, TaskStatus


class AsyncClient:
    """Enqueue tasks, read their status, cancel them, from asyncio code.

    Takes the same arguments as `Client` and behaves the same way; use it with
    `async with AsyncClient(...) as client:` or call `await client.close()`.
    """

    def __init__(
        self, server: str | Sequence[str] | None = None, *, retry: RetryPolicy | None = None
    ) -> None:
        """Prepare channels; connections open lazily on the first call."""
        self._ring = AddressRing(parse_addresses(server))
        self._retry = retry or RetryPolicy()
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self) -> pb_grpc.TaskServiceStub:
        address = self._ring.current
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        return pb_grpc.TaskServiceStub(channel)

    async def _call(self, method: str, request: Any) -> Any:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._retry.total_timeout.total_seconds()
        delays = self._retry.delays()
        while True:
            remaining = give_up_at - loop.time()
            timeout = min(self._retry.call_timeout.total_seconds(), max(remaining, 0.05))
            try:
                return await getattr(self._stub(), method)(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                if not core.is_transient(exc):
                    raise core.translate(exc) from None
                delay = next(delays)
                if loop.time() + delay >= give_up_at:
                    raise ServerUnavailable(
                        f"no Conveyor server answered {method} within "
                        f"{self._retry.total_timeout.total_seconds():g}s "
                        f"(tried {', '.join(self._ring.addresses)}): {exc.details()}"
                    ) from None
                self._ring.advance()
                await asyncio.sleep(delay)

    async def enqueue_task(self, task: Task) -> str:
        """Enqueue one task; return its id."""
        return (await self.enqueue_tasks([task]))[0]

    async def enqueue_tasks(self, tasks: Sequence[Task]) -> list[str]:
        """Enqueue many tasks in as few round trips as possible; return their ids in order."""
        ids: list[str] = []
        for request in core.enqueue_batches(tasks):
            ids.extend((await self._call("EnqueueTasks", request)).task_ids)
        return ids

    async def get_task_status(self, task_id: str, *, history: bool = False) -> TaskStatus:
        """The task's current status (and its event history if asked)."""
        response = await self._call("GetTask", core.get_request(task_id, history=history))
        return core.status_from_response(response)

    async def cancel_task(self, task_id: str) -> TaskStatus:
        """Cancel a queued or running task; raises TaskAlreadyFinished if it has finished."""
        request = core.cancel_request(task_id)
        return core.status_from_response(await self._call("CancelTask", request))

    async def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()

    async def __aenter__(self) -> Self:
        """Use as an async context manager; closes on exit."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the client."""
        await self.close()
