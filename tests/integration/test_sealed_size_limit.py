"""A payload or result within the documented size limit, once sealed.

docs/security.md, Limits: "Payload (and result) size: 1 MiB (--max-payload-bytes)". Sealing
adds up to SEALED_OVERHEAD bytes, which counted against the limit: a producer whose
payloads were accepted was refused once it adopted the codec, with a size it never sent,
and a handler's result at the limit failed the task. A sealed one may now exceed the limit
by the seal's own bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from helpers import wait_final

from conveyor import AesGcmCodec, Client, Task, TaskState, Worker
from conveyor.errors import InvalidTask

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import ServerThread

LIMIT = 1000
CODEC = AesGcmCodec([("k2", b"\x22" * 32)])


def test_a_payload_at_the_limit_is_refused_once_sealed(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server(max_payload_bytes=LIMIT)
    with Client(server.address) as plain:
        plain.enqueue_task(Task(type="t", payload=b"x" * LIMIT))  # accepted
    with Client(server.address, codec=CODEC) as sealed:
        try:
            sealed.enqueue_task(Task(type="t", payload=b"x" * LIMIT))
        except InvalidTask as exc:
            # The caller sent LIMIT bytes; the error speaks of LIMIT + 43 and says nothing
            # of the seal.
            pytest.fail(f"refused: {exc.message}")


def test_a_result_at_the_limit_fails_the_task_once_sealed(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server(max_payload_bytes=LIMIT)
    worker = Worker(server.address, codec=CODEC)
    worker.register_handler("full", lambda _ctx, _payload: b"r" * LIMIT)
    worker.start()
    try:
        with Client(server.address, codec=CODEC) as client:
            task_id = client.enqueue_task(Task(type="full", payload=b"", max_retries=0))
            status: Any = wait_final(client, task_id)
    finally:
        worker.stop()
    assert status.state is TaskState.SUCCEEDED, status.last_error
