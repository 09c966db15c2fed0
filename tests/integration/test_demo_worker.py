"""The demo worker of `make dev`, as getting-started.md describes it, against a real server.

"demo.sleep" sleeps the seconds its payload says; anything that is not a number of seconds
fails it at once with PermanentFailure. A negative number used to "sleep" and succeed, nan
failed inside asyncio and was retried, and inf slept until the task's timeout, attempt
after attempt.
"""

from __future__ import annotations

import pytest
from helpers import running, wait_final

from conveyor import Client, Task, TaskState
from conveyor.cli.demo_worker import build_demo_worker


@pytest.mark.parametrize("payload", [b"-5", b"nan", b"inf", b"soon"])
def test_a_sleep_that_is_no_number_of_seconds_fails_at_once(
    server, client: Client, payload: bytes
) -> None:
    worker = build_demo_worker(concurrency=1)
    worker.configure(server=server.address)
    with running(worker):
        task_id = client.enqueue_task(Task(type="demo.sleep", payload=payload, timeout=30))
        status = wait_final(client, task_id)
    assert status.state is TaskState.FAILED
    assert status.attempts == 1
    assert status.last_error == (
        "PermanentFailure: demo.sleep expects a number of seconds as its payload"
    )


def test_a_sleep_of_zero_seconds_succeeds(server, client: Client) -> None:
    worker = build_demo_worker(concurrency=1)
    worker.configure(server=server.address)
    with running(worker):
        task_id = client.enqueue_task(Task(type="demo.sleep", payload=b"0"))
        status = wait_final(client, task_id)
    assert status.state is TaskState.SUCCEEDED
    assert status.result == b"slept 0s on attempt 1"
