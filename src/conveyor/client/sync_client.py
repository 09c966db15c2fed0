"""Client: the blocking producer API (enqueue, status, cancel) over a gRPC channel."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Self

import grpc

from conveyor.client import core
from conveyor.client.channel import (
    CHANNEL_OPTIONS,
    AddressRing,
    RetryLoop,
    RetryPolicy,
    parse_addresses,
)
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

    from conveyor.breaker import BreakerPolicy
    from conveyor.types import Task, TaskStatus, WorkerInfo


class Client:
    """Enqueue tasks, read their status, cancel them.

    Args:
        server: "host:port", "host1:port,host2:port", or a list. Defaults to the
            CONVEYOR_SERVER environment variable, then localhost:50051.
        retry: Deadlines and retry schedule for transient failures.
        breaker: When a server's circuit opens, and for how long.

    Every call has a deadline; transient failures are retried on the next server with
    backoff until `retry.total_timeout`, then raise ServerUnavailable (CircuitOpen when
    every server's breaker is open and no probe is due within the budget). Retrying is
    safe: an enqueue carries its task ids, so a repeat returns the existing tasks.
    """

    def __init__(
        self,
        server: str | Sequence[str] | None = None,
        *,
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
    ) -> None:
        """Prepare channels; connections open lazily on the first call."""
        self._ring = AddressRing(parse_addresses(server), breaker)
        self._retry = retry or RetryPolicy()
        self._channels: dict[str, grpc.Channel] = {}

    def _stub(self, address: str, service: str = "TaskService") -> Any:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        return getattr(pb_grpc, f"{service}Stub")(channel)

    def _call(self, method: str, request: Any, service: str = "TaskService") -> Any:
        attempts = RetryLoop(self._ring, self._retry, method, clock=time.monotonic)
        while True:
            address, pause = attempts.step()
            if address is None:
                time.sleep(pause)
                continue
            try:
                response = getattr(self._stub(address, service), method)(
                    request, timeout=attempts.call_timeout()
                )
            except grpc.RpcError as exc:
                attempts.failed(address, exc)
                continue
            attempts.succeeded(address)
            return response

    def enqueue_task(self, task: Task) -> str:
        """Enqueue one task; return its id."""
        return self.enqueue_tasks([task])[0]

    def enqueue_tasks(self, tasks: Sequence[Task]) -> list[str]:
        """Enqueue many tasks in as few round trips as possible; return their ids in order."""
        ids: list[str] = []
        for request in core.enqueue_batches(tasks):
            ids.extend(self._call("EnqueueTasks", request).task_ids)
        return ids

    def get_task_status(self, task_id: str, *, history: bool = False) -> TaskStatus:
        """The task's current status (and its event history if asked)."""
        response = self._call("GetTask", core.get_request(task_id, history=history))
        return core.status_from_response(response)

    def cancel_task(self, task_id: str) -> TaskStatus:
        """Cancel a queued or running task; raises TaskAlreadyFinished if it has finished."""
        return core.status_from_response(self._call("CancelTask", core.cancel_request(task_id)))

    def list_workers(self, *, include_stopped: bool = False, limit: int = 500) -> list[WorkerInfo]:
        """Registered workers, newest first (stopped ones only if asked)."""
        request = core.list_workers_request(include_stopped=include_stopped, limit=limit)
        response = self._call("ListWorkers", request, service="AdminService")
        return core.workers_from_response(response)

    def explain_task(self, task_id: str) -> list[str]:
        """Why the task is where it is, in plain sentences, most important first."""
        response = self._call("ExplainTask", core.explain_request(task_id), service="AdminService")
        return list(response.reasons)

    def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> Self:
        """Use as a context manager; closes on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the client."""
        self.close()
