"""Empty payloads and empty or absent results survive sealing (untested
elsewhere): b"" stays b"", None stays None, for the handler and the producer."""

from __future__ import annotations

from typing import Any

from helpers import wait_final

from conveyor import AesGcmCodec, Client, Task, TaskState, Worker
from conveyor.codec import is_sealed

CODEC = AesGcmCodec([("k2", b"\x22" * 32)])


def test_empty_payload_and_results_round_trip(server, db) -> None:
    seen: list[bytes] = []

    def empty(_ctx: object, payload: bytes) -> bytes:
        seen.append(payload)
        return b""

    def none(_ctx: object, payload: bytes) -> None:
        seen.append(payload)

    worker = Worker(server.address, codec=CODEC)
    worker.register_handler("empty", empty)
    worker.register_handler("none", none)
    worker.start()
    try:
        with Client(server.address, codec=CODEC) as client:
            first = client.enqueue_task(Task(type="empty"))
            second = client.enqueue_task(Task(type="none", payload=b""))
            statuses: list[Any] = [wait_final(client, task_id) for task_id in (first, second)]
            with_payload = client.get_task_status(first, payload=True)
    finally:
        worker.stop()
    assert seen == [b"", b""]
    assert [s.state for s in statuses] == [TaskState.SUCCEEDED] * 2
    assert statuses[0].result == b""
    assert statuses[1].result is None
    assert with_payload.payload == b""
    assert is_sealed(bytes(db.task(first)["payload"]))
    assert is_sealed(bytes(db.task(first)["result"]))
    assert db.task(second)["result"] is None
