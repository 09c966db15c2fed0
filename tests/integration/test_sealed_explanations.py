"""What the explanation of a task shows of its sealed error.

docs/security.md: the dashboard shows a worker's sealed error as "(encrypted by the
worker)", and a client with the key opens errors. The explanation (Client.explain_task,
`conveyor tasks explain`, the dashboard's task page) embedded the raw sealed text, base64
of up to 8,000 characters; it now says "(encrypted by the worker)" as the dashboard does.
"""

from __future__ import annotations

import urllib.request
from typing import TYPE_CHECKING

from helpers import wait_final

from conveyor import AesGcmCodec, Client, Task, TaskState, Worker

if TYPE_CHECKING:
    from conftest import ServerThread

KEY = ("k2", b"\x22" * 32)


def _failed_sealed_task(server: ServerThread) -> tuple[str, list[str]]:
    codec = AesGcmCodec([KEY])
    worker = Worker(server.address, codec=codec)

    def fail(_ctx: object, _payload: bytes) -> bytes:
        raise ValueError("card declined")

    worker.register_handler("fail", fail)
    worker.start()
    try:
        with Client(server.address, codec=codec) as client:
            task_id = client.enqueue_task(Task(type="fail", payload=b"x", max_retries=0))
            status = wait_final(client, task_id)
            assert status.state is TaskState.FAILED
            assert status.last_error == "ValueError: card declined"  # opened by the client
            reasons = client.explain_task(task_id)
    finally:
        worker.stop()
    return task_id, reasons


def test_an_explanation_says_the_error_is_sealed(server: ServerThread) -> None:
    _task_id, reasons = _failed_sealed_task(server)
    assert not any("cvy-sealed:" in reason for reason in reasons), reasons
    assert any("(encrypted by the worker)" in reason for reason in reasons), reasons


def test_dashboard_explanation_does_not_show_the_sealed_blob(server: ServerThread) -> None:
    task_id, _reasons = _failed_sealed_task(server)
    with urllib.request.urlopen(f"{server.http_url}/ui/tasks/{task_id}") as page:  # noqa: S310
        html = page.read().decode()
    assert "cvy-sealed:" not in html
