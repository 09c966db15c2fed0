"""A server's in-memory state levels off as workers and clients come and go.

Real in-process server and PostgreSQL, raw gRPC calls: 1,200 workers register and leave
(unregistered, vanished after a draining heartbeat, a long poll cancelled mid-wait, a Work
stream broken after its first answer), and 600 enqueue streams are cut mid-flight. After
each round every dict/set/list reachable from the server's objects, and the number of
asyncio tasks on its loop, must come back to the warmed-up level: nothing may be kept per
worker id, stream or poll once it is gone, but in the two caches capped at 10,000 workers.
(A review measured it flat, 36 tasks throughout.)
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from helpers import wait_for

from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

POOL = [f"soak-type-{i}" for i in range(300)]
CAPPED = ("worker_service._owners.entries", "worker_service._paces.entries")


def container_sizes(root: Any, depth: int = 6) -> dict[str, int]:
    """len() of every container reachable through attributes of conveyor objects."""
    sizes: dict[str, int] = {}
    seen: set[int] = set()
    kinds = (dict, set, frozenset, list, collections.deque)

    def fields(obj: Any) -> list[tuple[str, Any]]:
        found = list(getattr(obj, "__dict__", {}).items())
        found.extend(
            (slot, getattr(obj, slot))
            for cls in type(obj).__mro__
            for slot in getattr(cls, "__slots__", ()) or ()
            if isinstance(slot, str) and hasattr(obj, slot)
        )
        return found

    def walk(obj: Any, path: str, level: int) -> None:
        if id(obj) in seen or level > depth:
            return
        seen.add(id(obj))
        for key, value in fields(obj):
            where = f"{path}.{key}"
            if isinstance(value, kinds):
                sizes[where] = len(value)
            elif type(value).__module__.startswith("conveyor"):
                walk(value, where, level + 1)

    walk(root, "server", 0)
    return sizes


def state(server: Any) -> tuple[dict[str, int], int]:
    async def read() -> tuple[dict[str, int], int]:
        return container_sizes(server.server), len(asyncio.all_tasks())

    return server.call(read)


def workers_come_and_go(channel: grpc.Channel, count: int, tag: str) -> None:
    workers = pb_grpc.WorkerServiceStub(channel)
    for i in range(count):
        worker_id = f"{tag}-{i}-{uuid.uuid4().hex[:6]}"
        types = [POOL[(i * 3 + k) % len(POOL)] for k in range(3)]
        workers.RegisterWorker(
            pb.RegisterWorkerRequest(
                worker_id=worker_id, host="h", pid=1, task_types=types, concurrency=2
            ),
            timeout=10,
        )
        how = i % 4
        if how == 0:
            workers.Heartbeat(pb.HeartbeatRequest(worker_id=worker_id), timeout=10)
            workers.UnregisterWorker(pb.UnregisterWorkerRequest(worker_id=worker_id), timeout=10)
        elif how == 1:
            poll = workers.LeaseTasks.future(
                pb.LeaseTasksRequest(
                    worker_id=worker_id, task_types=types, max_tasks=2, wait=Duration(seconds=20)
                ),
                timeout=30,
            )
            time.sleep(0.01)
            poll.cancel()
        elif how == 2:

            def requests(worker_id: str = worker_id, types: list[str] = types) -> Any:
                yield pb.WorkRequest(worker_id=worker_id, task_types=types, grant=2)
                threading.Event().wait(0.2)

            call = workers.Work(requests(), timeout=30)
            next(call)  # accepted
            call.cancel()
        else:
            workers.Heartbeat(pb.HeartbeatRequest(worker_id=worker_id, draining=True), timeout=10)


def enqueue_streams_cut(channel: grpc.Channel, count: int) -> None:
    tasks = pb_grpc.TaskServiceStub(channel)
    for _ in range(count):

        def requests() -> Any:
            yield pb.EnqueueStreamRequest(
                request_id=1,
                request=pb.EnqueueTasksRequest(
                    tasks=[
                        pb.TaskSpec(
                            id=str(uuid.uuid4()), type=POOL[0], timeout=Duration(seconds=60)
                        )
                    ]
                ),
            )
            threading.Event().wait(0.3)

        call = tasks.EnqueueStream(requests(), timeout=30)
        next(call)
        call.cancel()


def test_server_state_levels_off_as_workers_and_streams_come_and_go(start_server) -> None:
    server = start_server()
    channel = grpc.insecure_channel(server.address)
    try:
        workers_come_and_go(channel, 100, "warm")
        enqueue_streams_cut(channel, 50)
        wait_for(lambda: state(server)[1] <= 40, timeout=30, what="the warm-up to settle")
        base_sizes, base_tasks = state(server)
        for round_number in range(3):
            workers_come_and_go(channel, 400, f"round{round_number}")
            enqueue_streams_cut(channel, 200)
            wait_for(
                lambda: state(server)[1] <= base_tasks,
                timeout=30,
                what=f"the server's asyncio tasks back to {base_tasks} after round {round_number}",
            )
            sizes, _ = state(server)
            grown = {
                key: (base_sizes.get(key, 0), size)
                for key, size in sizes.items()
                # the loop's timer heap (asyncpg's statement cache, poll timers) and the
                # stats sampler's chart buckets come and go with time, not with callers
                if size > base_sizes.get(key, 0) + 20
                and "_scheduled" not in key
                and "stats._buckets" not in key
                # caches of each worker's owner and lease, cleared at MAX_REMEMBERED_OWNERS
                and not key.endswith(CAPPED)
            }
            assert not grown, f"round {round_number}: grew {grown}"
    finally:
        channel.close()
