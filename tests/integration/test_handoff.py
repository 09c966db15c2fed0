"""Handoff: an enqueue leases its tasks straight to the long polls waiting for them.

Real server, real PostgreSQL, raw gRPC long polls (as test_wake_rounds.py). The fallback
poll is set to a minute, so a poll's lease comes from the enqueue or a wake-up, never from
a poll that happened to run. What must hold: the task is leased by the enqueue's own
statement (no claim, `started_at` = `created_at`, a `started` event), and only when that
keeps FIFO order and pauses; a task the handoff cannot take is queued as before; a lease
whose poll went away meanwhile goes back to the queue, counted as released.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import metric_by_label, rpc_count, wait_for, writes_blocked
from long_polls import LONG_POLL, Fleet, claims

from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.server.handoff import POLL_ENDED

LONG_CALLS = "conveyor_long_rpc_duration_seconds"


@pytest.fixture
def quiet_server(start_server):
    """A server whose fallback poll never fires during a test."""
    return start_server(poll_interval=timedelta(minutes=1))


@pytest.fixture
def fleet(quiet_server):
    connected = Fleet(quiet_server.address)
    yield connected
    connected.close()


def waiting(server, polls: int) -> None:
    """Until `polls` long polls have made their first claim (empty) and wait."""
    wait_for(
        lambda: claims(server.http_url).get("empty", 0) >= polls,
        what=f"{polls} long polls to be waiting",
    )


def outcomes(http_url: str) -> dict[str, float]:
    """conveyor_task_outcomes_total by outcome (one type per test)."""
    return metric_by_label(http_url, "conveyor_task_outcomes_total", "outcome")


def enqueue_many(fleet: Fleet, task_type: str, count: int) -> list[str]:
    """One EnqueueTasks call of `count` tasks; their ids in order."""
    specs = [
        pb.TaskSpec(id=str(uuid.uuid4()), type=task_type, timeout=Duration(seconds=60))
        for _ in range(count)
    ]
    fleet.tasks.EnqueueTasks(pb.EnqueueTasksRequest(tasks=specs), timeout=10)
    return [spec.id for spec in specs]


def report_success(fleet: Fleet, worker_id: str, task_id: str, lease_id: str) -> int:
    """Report one success through ReportResults; the status code of its outcome."""
    report = pb.ReportResultRequest(
        worker_id=worker_id, task_id=task_id, lease_id=lease_id, outcome=pb.OUTCOME_SUCCEEDED
    )
    response = fleet.workers.ReportResults(
        pb.ReportResultsRequest(worker_id=worker_id, reports=[report]), timeout=10
    )
    return int(response.outcomes[0].code)


def test_a_waiting_poll_is_handed_the_new_task_without_a_claim(quiet_server, fleet, db) -> None:
    poll = fleet.poll("handoff-1", "handoff.a")
    waiting(quiet_server, 1)
    task_id = fleet.enqueue("handoff.a")
    assert poll.result(timeout=10) == [task_id]
    task = db.task(task_id)
    assert task["state"] == "running"
    assert task["worker_id"] == "handoff-1"
    assert task["attempt"] == 1
    # Leased by the enqueue's own statement: one transaction, one timestamp.
    assert task["started_at"] == task["created_at"]
    events = [(e["event"], e["state"], e["attempt"], e["worker_id"]) for e in db.events(task_id)]
    assert events == [("enqueued", "queued", 0, None), ("started", "running", 1, "handoff-1")]
    counted = claims(quiet_server.http_url)
    assert counted.get("handed_over") == 1
    assert counted.get("tasks", 0) == 0


def test_a_handed_over_lease_is_an_ordinary_lease(quiet_server, fleet, db) -> None:
    """The worker reports it as any other: fenced by the lease the poll returned."""
    poll = fleet.poll("handoff-2", "handoff.b")
    waiting(quiet_server, 1)
    task_id = fleet.enqueue("handoff.b")
    assert poll.result(timeout=10) == [task_id]
    lease_id = str(db.task(task_id)["lease_id"])
    assert report_success(fleet, "handoff-2", task_id, str(uuid.uuid4())) != 0
    assert report_success(fleet, "handoff-2", task_id, lease_id) == 0
    assert db.task(task_id)["state"] == "succeeded"


def test_an_older_queued_task_goes_first(quiet_server, fleet, db) -> None:
    """FIFO: a task already queued and available (here inserted by hand, as another server
    would, its wake-up not yet arrived) keeps the new one from skipping the queue."""
    poll = fleet.poll("handoff-3", "handoff.c", max_tasks=1)
    waiting(quiet_server, 1)
    older = str(uuid.uuid4())
    db.execute(
        "INSERT INTO conveyor_tasks (id, type, payload, timeout, max_retries)"
        " VALUES ($1, 'handoff.c', '', interval '60 seconds', 0)",
        uuid.UUID(older),
    )
    newer = fleet.enqueue("handoff.c")
    # The enqueue queued its task and woke the poll, which claimed the oldest.
    assert poll.result(timeout=10) == [older]
    assert db.task(newer)["state"] == "queued"
    assert claims(quiet_server.http_url).get("handed_over", 0) == 0


def test_a_paused_type_is_not_handed_over(quiet_server, fleet, db) -> None:
    poll = fleet.poll("handoff-4", "handoff.d")
    waiting(quiet_server, 1)
    db.execute(
        "INSERT INTO conveyor_paused_types (type, paused_by, reason)"
        " VALUES ('handoff.d', 'test', 'testing')"
    )
    before = claims(quiet_server.http_url)
    task_id = fleet.enqueue("handoff.d")
    # The enqueue wakes the poll; its claim skips the paused type and it waits again.
    wait_for(
        lambda: claims(quiet_server.http_url).get("empty", 0) > before.get("empty", 0),
        what="the woken poll's claim",
    )
    assert db.task(task_id)["state"] == "queued"
    assert not poll.done()


def test_a_poll_takes_at_most_its_max_tasks(quiet_server, fleet, db) -> None:
    """Three tasks in one call, a poll for two: the first two (oldest) are handed over,
    the third is queued for the next poll."""
    poll = fleet.poll("handoff-5", "handoff.e", max_tasks=2)
    waiting(quiet_server, 1)
    ids = enqueue_many(fleet, "handoff.e", 3)
    assert poll.result(timeout=10) == ids[:2]
    assert [db.task(task_id)["state"] for task_id in ids] == ["running", "running", "queued"]
    again = fleet.poll("handoff-5", "handoff.e", max_tasks=2)
    assert again.result(timeout=10) == ids[2:]


def test_two_waiting_polls_share_a_batch_longest_waiting_first(quiet_server, fleet) -> None:
    first = fleet.poll("handoff-6", "handoff.f", max_tasks=1)
    waiting(quiet_server, 1)
    second = fleet.poll("handoff-7", "handoff.f", max_tasks=1)
    waiting(quiet_server, 2)
    ids = enqueue_many(fleet, "handoff.f", 2)
    assert first.result(timeout=10) == ids[:1]
    assert second.result(timeout=10) == ids[1:]


def test_a_repeated_id_is_handed_over_once(quiet_server, fleet, db) -> None:
    """The same id twice in one call: one task, leased once, to one poll."""
    polls = [fleet.poll(f"handoff-r{n}", "handoff.g", max_tasks=1) for n in range(2)]
    waiting(quiet_server, 2)
    task_id = str(uuid.uuid4())
    spec = pb.TaskSpec(id=task_id, type="handoff.g", timeout=Duration(seconds=60))
    response = fleet.tasks.EnqueueTasks(pb.EnqueueTasksRequest(tasks=[spec, spec]), timeout=10)
    assert list(response.created) == [True, False]
    got = wait_for(lambda: [p.result() for p in polls if p.done()] or None, what="the lease")
    assert got == [[task_id]]
    assert db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE id = $1", uuid.UUID(task_id)) == 1
    assert [e["event"] for e in db.events(task_id)] == ["enqueued", "started"]


def test_without_handoff_the_poll_claims(start_server, db) -> None:
    """`--no-handoff`: the same task reaches the same poll through a claim."""
    server = start_server(poll_interval=timedelta(minutes=1), handoff=False)
    fleet = Fleet(server.address)
    try:
        poll = fleet.poll("handoff-8", "handoff.h")
        waiting(server, 1)
        task_id = fleet.enqueue("handoff.h")
        assert poll.result(timeout=10) == [task_id]
        counted = claims(server.http_url)
        assert counted.get("tasks") == 1
        assert counted.get("handed_over", 0) == 0
        task = db.task(task_id)
        assert task["started_at"] > task["created_at"]
    finally:
        fleet.close()


def test_a_lease_its_poll_never_took_goes_back_counted_as_released(quiet_server, fleet, db) -> None:
    """An enqueue leases its task to a waiting poll whose call is cancelled while the
    enqueue's statement runs: the desk hands the lease back (POLL_ENDED), and that counts as
    `released` in conveyor_task_outcomes_total, as a worker's own hand-back does. It was not
    counted: the task went back to the queue with no outcome to show for it. Its queue wait
    is observed once, when a lease that reaches a worker starts it, from its enqueue: it
    was measured from the hand-back."""
    gone = fleet.workers.LeaseTasks.future(
        fleet.register("handoff-gone", "handoff.gone"), timeout=LONG_POLL + 10
    )
    waiting(quiet_server, 1)
    with writes_blocked(db.url):
        enqueued = fleet.pool.submit(fleet.enqueue, "handoff.gone")
        wait_for(
            lambda: (
                db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
                >= 1
            ),
            what="the enqueue's statement, the poll's offer reserved, to wait on the lock",
        )
        gone.cancel()
        wait_for(
            lambda: rpc_count(quiet_server.http_url, "LeaseTasks", "CANCELLED", LONG_CALLS) == 1,
            what="the server to see the poll's call end",
        )
    task_id = enqueued.result(timeout=10)
    wait_for(lambda: db.task(task_id)["state"] == "queued", what="the lease to be handed back")
    events = [(e["event"], e["worker_id"], e["detail"]) for e in db.events(task_id)]
    assert events == [
        ("enqueued", None, None),
        ("started", "handoff-gone", None),
        ("released", "handoff-gone", POLL_ENDED),
    ]
    wait_for(
        lambda: outcomes(quiet_server.http_url).get("released") == 1,
        what="the hand-back to be counted as released",
    )
    # The lease that went back never started; the one that does is the task's one start,
    # and its wait runs from the enqueue, not from the hand-back.
    assert fleet.poll("handoff-next", "handoff.gone").result(timeout=10) == [task_id]
    task = db.task(task_id)
    wait = "conveyor_task_queue_wait_seconds"
    assert metric_by_label(quiet_server.http_url, f"{wait}_count", "type") == {"handoff.gone": 1}
    observed = metric_by_label(quiet_server.http_url, f"{wait}_sum", "type")["handoff.gone"]
    waited = (task["started_at"] - task["created_at"]).total_seconds()
    assert observed == pytest.approx(waited, abs=1e-5)
