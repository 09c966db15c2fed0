"""A task's history has no end of its own; what is read and shown of it has, and a loop of
hand-backs ends.

A worker that leases a task and hands it back adds two events a cycle, and a release does
not spend an attempt: the MAX_RELEASES-th release since the last operator retry fails the
task with a clear error. GetTask (so `conveyor tasks show` and `conveyor status --history`)
sends the first event and the latest ones, within a count and a byte budget, saying how
many it left out; a task's dashboard page shows the first event and a page of the latest,
with a link to the page before, and its timeline draws a handed-back attempt on one row.
Real server, real PostgreSQL, raw worker calls and the real CLI.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import assert_ok, metric_samples, run_cli, worker_stub

from conveyor import Client, Task, TaskState
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.server.control import HISTORY_PAGE
from conveyor.server.task_service import HISTORY_BYTES, HISTORY_EVENTS
from conveyor.server.worker_service import MAX_RELEASES

TYPE = "bounded.history"
WORKER = "w-release"


def release_over_and_over(address: str, cycles: int, reason: str = "") -> None:
    """Lease the one queued task of TYPE and hand it back, `cycles` times."""
    with worker_stub(address) as stub:
        stub.RegisterWorker(
            pb.RegisterWorkerRequest(
                worker_id=WORKER, host="h", pid=1, task_types=[TYPE], concurrency=1, version="1"
            )
        )
        for _ in range(cycles):
            (lease,) = stub.LeaseTasks(
                pb.LeaseTasksRequest(
                    worker_id=WORKER, task_types=[TYPE], max_tasks=1, wait=Duration(seconds=5)
                )
            ).leases
            stub.ReportResult(
                pb.ReportResultRequest(
                    worker_id=WORKER,
                    task_id=lease.task_id,
                    lease_id=lease.lease_id,
                    outcome=pb.OUTCOME_RELEASED,
                    error=reason,
                )
            )


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - the test server
        return response.read().decode()


def history_rows(page: str) -> list[str]:
    """The events of a task page's history table, in order."""
    return re.findall(r'<tr data-event="([a-z_]+)">', page)


def test_a_long_history_is_sent_and_shown_bounded(server, client: Client) -> None:
    cycles = HISTORY_EVENTS // 2 + 50
    task_id = client.enqueue_task(Task(type=TYPE, payload=b"x", max_retries=0))
    release_over_and_over(server.address, cycles)
    events = 1 + 2 * cycles

    status = client.get_task_status(task_id, history=True)
    assert len(status.history) == 1 + HISTORY_EVENTS
    assert status.history_omitted == events - len(status.history)
    assert status.history[0].event == "enqueued"
    assert [event.event for event in status.history[-2:]] == ["started", "released"]
    assert status.attempts == 0  # a release spends no attempt

    page = get(f"{server.http_url}/ui/tasks/{task_id}")
    latest = history_rows(page)
    assert len(latest) == 1 + HISTORY_PAGE
    assert latest[0] == "enqueued"
    omitted = events - len(latest)
    assert f"{omitted} earlier events not shown" in page
    # Every lease of the same attempt, handed back and started again, on one row.
    assert page.count('class="row-label"') == 2  # the queue, attempt 1
    assert f"attempt 1 · {WORKER} · {HISTORY_PAGE // 2} starts" in page
    older = re.search(r'href="(/ui/tasks/[0-9a-f-]+\?before=\d+)">Show older events', page)
    assert older is not None
    before = get(f"{server.http_url}{older.group(1)}")
    assert len(history_rows(before)) == 1 + HISTORY_PAGE
    assert f"{omitted - HISTORY_PAGE} earlier events not shown" in before
    assert 'id="latest-events"' in before
    # "²" and "٣" pass str.isdigit(): the first was a 500 (int() refuses it), the second
    # was read as 3, another page than the one asked for.
    for bad in ("x", "-1", "0", "99999999999999999999", "%C2%B2", "%D9%A3"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            get(f"{server.http_url}/ui/tasks/{task_id}?before={bad}")
        assert refused.value.code == 400, bad

    cli = {"CONVEYOR_SERVER": server.address}
    shown = json.loads(assert_ok(run_cli("status", task_id, "--history", "--json", **cli)))
    assert len(shown["history"]) == 1 + HISTORY_EVENTS
    assert shown["history_omitted"] == status.history_omitted
    table = assert_ok(run_cli("tasks", "show", task_id, **cli))
    assert f"{status.history_omitted} events between the first and the next not shown" in table


def test_events_with_long_details_are_bounded_by_bytes(server, client: Client) -> None:
    """Release reasons of up to 8,000 characters, four bytes each: the budget, not the count,
    bounds the reply, which stays well inside a gRPC message."""
    task_id = client.enqueue_task(Task(type=TYPE, payload=b"x", max_retries=0))
    release_over_and_over(server.address, 40, reason="\N{GRINNING FACE}" * 8000)
    status = client.get_task_status(task_id, history=True)
    text = sum(len((event.detail or "").encode()) for event in status.history)
    assert text <= HISTORY_BYTES
    assert status.history_omitted == 1 + 2 * 40 - len(status.history)
    assert status.history_omitted > 0
    assert status.history[-1].event == "released"


def outcomes(http_url: str) -> dict[str, float]:
    """conveyor_task_outcomes_total of TYPE, by outcome, those counted (all start at 0)."""
    return {
        sample.labels["outcome"]: sample.value
        for sample in metric_samples(http_url)
        if sample.name == "conveyor_task_outcomes_total"
        and sample.labels["type"] == TYPE
        and sample.value
    }


def test_a_task_handed_back_over_and_over_fails_at_the_limit(server, client: Client) -> None:
    """Releases spend no attempt, so nothing else would end the loop: the MAX_RELEASES-th
    fails the task, saying why, on the attempt it was on (not one less: a failed task with
    0 attempts says it never ran); an operator's retry starts the count again."""
    task_id = client.enqueue_task(Task(type=TYPE, payload=b"x", max_retries=0))
    release_over_and_over(server.address, MAX_RELEASES - 1, reason="draining")
    assert client.get_task_status(task_id).state is TaskState.QUEUED
    release_over_and_over(server.address, 1, reason="draining")

    status = client.get_task_status(task_id, history=True)
    assert status.state is TaskState.FAILED
    assert status.finished_at is not None
    assert status.attempts == 1
    assert status.last_error == (
        f"handed back {MAX_RELEASES} times without finishing (the limit): the worker or the "
        "server could not run it; the last time: draining"
    )
    last = status.history[-1]
    assert (last.event, last.state, last.attempt) == ("released", TaskState.FAILED, 1)
    assert last.detail == status.last_error
    # The history's releases all name the attempt their `started` event named.
    assert {event.attempt for event in status.history if event.event != "enqueued"} == {1}
    assert outcomes(server.http_url) == {"released": MAX_RELEASES - 1, "failed": 1}
    explained = client.explain_task(task_id)
    assert f"last error: {status.last_error}" in explained
    assert explained[0].startswith("failed for good after 1 attempt(s)")

    assert client.retry_tasks([task_id]).changed == 1
    release_over_and_over(server.address, 1)
    assert client.get_task_status(task_id).state is TaskState.QUEUED
