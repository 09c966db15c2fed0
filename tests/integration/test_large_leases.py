"""Leases of large payloads: a claim whose leases pass the gRPC message limit still runs.

Real server, real PostgreSQL, a real worker. A claim is capped by count (the worker's free
slots, `max_lease_batch`), so a few tasks near the payload limit can add up to more than the
server may send in one message. Before the fix the write failed and the same claim repeated
for ever, with no handler run; on LeaseTasks the leases expired and each cycle spent an
attempt. What must hold: every task runs once and succeeds on its first attempt, on the
Work stream (the claim goes out in several messages) and on long polls (the reply carries
what fits, the rest goes straight back to the queue with its attempt, counted as released);
either way each task's queue wait is observed once, from its enqueue to the start that ran
it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from helpers import metric_by_label, wait_final

from conveyor import Client, Task, TaskState, Worker
from conveyor.server.worker_service import REPLY_FULL

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import ServerThread

MIB = 1024 * 1024
# Eight 3 MiB payloads: 24 MiB in one claim, over the 16 MiB a server with a payload limit of
# 4 MiB may send in one message, while any one lease fits easily.
PAYLOAD_BYTES = 3 * MIB
TASKS = 8
CONCURRENCY = 10  # room for every task: one claim takes them all


def assert_each_wait_observed_once(server: ServerThread, statuses: list[Any]) -> None:
    """One queue-wait observation per task, from its enqueue to the start that ran it."""
    counts = metric_by_label(server.http_url, "conveyor_task_queue_wait_seconds_count", "type")
    sums = metric_by_label(server.http_url, "conveyor_task_queue_wait_seconds_sum", "type")
    assert counts["large"] == TASKS, counts
    waited = sum((s.started_at - s.created_at).total_seconds() for s in statuses)
    assert sums["large"] == pytest.approx(waited, abs=1e-4), (sums, waited)


def run_large_tasks(server: ServerThread) -> list[Any]:
    """Enqueue the tasks, then start a worker (so one claim takes all); their final states."""
    with Client(server.address) as client:
        ids = client.enqueue_tasks(
            [Task(type="large", payload=bytes([n]) * PAYLOAD_BYTES) for n in range(TASKS)]
        )
        worker = Worker(server.address, concurrency=CONCURRENCY)
        worker.register_handler("large", lambda _ctx, payload: payload[:1])
        worker.start()
        try:
            # Well under a lease's 30 s: a lease lost on the way would fail the wait.
            statuses = [wait_final(client, task_id, timeout=15) for task_id in ids]
        finally:
            worker.stop()
    for n, status in enumerate(statuses):
        assert status.state is TaskState.SUCCEEDED, status
        assert status.attempts == 1, status.history
        assert status.result == bytes([n])
        assert not [event for event in status.history if event.event == "lease_expired"]
    return statuses


@pytest.fixture
def large_payload_server(start_server: Callable[..., ServerThread]) -> Callable[..., ServerThread]:
    def start(*, work_stream: bool) -> ServerThread:
        server = start_server(max_payload_bytes=4 * MIB, work_stream=work_stream)
        assert server.config.max_message_bytes < TASKS * PAYLOAD_BYTES
        return server

    return start


def test_the_work_stream_sends_a_large_claim_in_several_messages(
    large_payload_server: Callable[..., ServerThread],
) -> None:
    server = large_payload_server(work_stream=True)
    statuses = run_large_tasks(server)
    for status in statuses:
        assert [event.event for event in status.history] == ["enqueued", "started", "succeeded"]
    messages = metric_by_label(server.http_url, "conveyor_work_stream_messages_total", "kind")
    assert messages["leases"] >= 2, messages
    assert_each_wait_observed_once(server, statuses)


def test_a_long_poll_replies_with_what_fits_and_requeues_the_rest(
    large_payload_server: Callable[..., ServerThread],
) -> None:
    server = large_payload_server(work_stream=False)
    statuses = run_large_tasks(server)
    released = [
        event for status in statuses for event in status.history if event.event == "released"
    ]
    # Some leases did not fit the first reply; each went back with its attempt, and its
    # next start is attempt 1 again (checked above).
    assert released, [status.history for status in statuses]
    assert all(event.detail == REPLY_FULL and event.attempt == 1 for event in released)
    # Counted as what became of those tasks, as a worker's hand-back is (they were not).
    outcomes = metric_by_label(server.http_url, "conveyor_task_outcomes_total", "outcome")
    assert outcomes.get("released") == len(released), outcomes
    assert outcomes.get("succeeded") == TASKS, outcomes
    # A lease handed back never started: the task's wait is observed once, when it does,
    # and runs from its enqueue (it was observed for both leases, the second from the
    # hand-back).
    assert_each_wait_observed_once(server, statuses)
