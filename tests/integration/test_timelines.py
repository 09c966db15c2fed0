"""Drive tasks down every path of the state machine with real servers and
real workers, and check each task's timeline against the state machine and the task row.

The checker (`check_timeline`) walks the history view row by row: one row per state change,
documented event names, states and attempts as the state machine says, timestamps that
never go backwards, worker ids on the rows that concern an attempt, actors on operator
actions, and the timeline as GetTask (get_task_status(history=True)) sends it equal to the
database's.
"""

from __future__ import annotations

import itertools
import signal
import uuid
from datetime import timedelta
from typing import Any

import pytest
from helpers import wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker

LIVE = {"queued", "scheduled"}


def view_rows(db: Any, task_id: str) -> list[Any]:
    return db.fetch(
        "SELECT * FROM conveyor_task_history WHERE task_id = $1 ORDER BY id", uuid.UUID(task_id)
    )


def check_timeline(  # noqa: C901, PLR0912, PLR0915 - one walk of the state machine
    db: Any, client: Client, task_id: str, *, actor: str | None = None
) -> list[str]:
    """Assert the history of `task_id` is consistent; return its event names."""
    rows = view_rows(db, task_id)
    task = db.task(task_id)
    assert rows, "no history at all"
    first = rows[0]
    assert (first["event"], first["state"], first["attempt"]) == ("enqueued", "queued", 0)
    assert first["at"] == task["created_at"]
    state, attempt, worker = "queued", 0, None
    for before, row in itertools.pairwise(rows):
        assert row["at"] >= before["at"], f"time goes backwards: {before} -> {row}"
    for row in rows[1:]:
        event = row["event"]
        where = f"{event} after state {state} attempt {attempt}: {dict(row)}"
        if event == "started":
            assert state == "queued", where
            assert row["state"] == "running", where
            assert row["attempt"] == attempt + 1, where
            assert row["worker_id"], where
            assert row["actor"] is None, where
            state, attempt, worker = "running", row["attempt"], row["worker_id"]
        elif event == "succeeded":
            assert state == "running", where
            assert row["state"] == "succeeded", where
            assert (row["attempt"], row["worker_id"]) == (attempt, worker), where
            state = "succeeded"
        elif event in ("failed", "timed_out", "lease_expired"):
            assert state == "running", where
            assert row["state"] in ("scheduled", "failed"), where
            assert (row["attempt"], row["worker_id"]) == (attempt, worker), where
            assert row["detail"], where
            assert row["actor"] is None, where
            state = "queued" if row["state"] == "scheduled" else "failed"
        elif event == "released":
            assert state == "running", where
            assert (row["attempt"], row["worker_id"]) == (attempt, worker), where
            if row["state"] == "queued":
                attempt -= 1
            state = row["state"]
        elif event == "cancelled":
            assert state in ("queued", "running"), where
            assert row["state"] == "cancelled", where
            assert row["attempt"] == attempt, where
            if actor is not None:
                assert row["actor"] == actor, where
            assert row["actor"], where
            state = "cancelled"
        elif event == "retried":
            assert state in ("failed", "cancelled"), where
            assert (row["state"], row["attempt"]) == ("queued", 0), where
            if actor is not None:
                assert row["actor"] == actor, where
            assert row["actor"], where
            state, attempt = "queued", 0
        else:
            pytest.fail(f"undocumented event {where}")
    task_state = "queued" if task["state"] == "scheduled" else task["state"]
    assert task_state == state, (task_state, state, [dict(r) for r in rows])
    assert task["attempt"] == attempt
    if state in ("succeeded", "failed", "cancelled"):
        assert task["finished_at"] == rows[-1]["at"], (task["finished_at"], rows[-1]["at"])
    # The API's timeline is the database's.
    status = client.get_task_status(task_id, history=True)
    assert status.history_omitted == 0
    api = [
        (e.at, e.event, e.state.value, e.attempt, e.worker_id, e.detail, e.actor)
        for e in status.history
    ]
    stored = [
        (
            r["at"],
            r["event"],
            TaskState(r["state"]).value,
            r["attempt"],
            r["worker_id"],
            r["detail"],
            r["actor"],
        )
        for r in rows
    ]
    assert api == stored
    assert status.state.value == task_state
    assert status.attempts == attempt
    return [row["event"] for row in rows]


@pytest.fixture
def fast_server(start_server: Any) -> Any:
    return start_server(
        lease_ttl=timedelta(seconds=2),
        heartbeat_interval=timedelta(milliseconds=500),
        worker_lost_after=timedelta(seconds=2),
        deadline_grace=timedelta(milliseconds=500),
    )


def make_worker(address: str, **kwargs: Any) -> Worker:
    import worker_apps  # noqa: PLC0415

    worker = worker_apps.build(concurrency=kwargs.pop("concurrency", 4))
    worker.configure(server=address, **kwargs)
    return worker


def test_every_worker_path_writes_a_consistent_timeline(fast_server: Any, db: Any) -> None:
    with Client(fast_server.address) as client:
        worker = make_worker(fast_server.address, drain_timeout=0.5)
        worker.start()
        try:
            ok = client.enqueue_task(Task(type="noop", payload=b"x"))
            retried = client.enqueue_task(Task(type="fail_once", payload=b"p"))
            permanent = client.enqueue_task(Task(type="permanent_fail"))
            exhausted = client.enqueue_task(Task(type="always_fail", max_retries=1))
            async_timeout = client.enqueue_task(
                Task(type="sleep", payload=b"30", timeout=1, max_retries=0)
            )
            sync_timeout = client.enqueue_task(
                Task(type="sync_sleep", payload=b"30", timeout=1, max_retries=1)
            )
            ids = [ok, retried, permanent, exhausted, async_timeout, sync_timeout]
            finals = {task_id: wait_final(client, task_id, timeout=40) for task_id in ids}
        finally:
            worker.stop()
        expected = {
            ok: ["enqueued", "started", "succeeded"],
            retried: ["enqueued", "started", "failed", "started", "succeeded"],
            permanent: ["enqueued", "started", "failed"],
            exhausted: ["enqueued", "started", "failed", "started", "failed"],
            async_timeout: ["enqueued", "started", "timed_out"],
            sync_timeout: ["enqueued", "started", "timed_out", "started", "timed_out"],
        }
        for task_id, events in expected.items():
            assert check_timeline(db, client, task_id) == events, finals[task_id]


def test_cancel_in_every_state_and_operator_retry(fast_server: Any, db: Any) -> None:
    with Client(fast_server.address) as client:
        queued = client.enqueue_task(Task(type="noop"))
        client.cancel_task(queued)
        worker = make_worker(fast_server.address)
        worker.start()
        try:
            running = client.enqueue_task(Task(type="sleep", payload=b"30"))
            wait_for(lambda: db.task(running)["state"] == "running", timeout=15, what="running")
            client.cancel_task(running)
            client.cancel_task(running)  # a no-op, nothing written
            # A long backoff: the failure leaves it scheduled long enough to cancel.
            scheduled = client.enqueue_task(Task(type="always_fail", max_retries=5))
            wait_for(
                lambda: (
                    db.task(scheduled)["state"] in ("scheduled", "queued")
                    and db.task(scheduled)["attempt"] >= 1
                ),
                timeout=15,
                what="a retry scheduled",
            )
            client.cancel_task(scheduled)
            permanent = client.enqueue_task(Task(type="permanent_fail"))
            wait_final(client, permanent)
            client.retry_tasks([queued, running, permanent], reason="again")
            # The retried `running` sleeps its 30 s again: its wait needs more than that.
            for task_id in (queued, running):
                wait_final(client, task_id, timeout=60)
            wait_for(
                lambda: (
                    db.task(permanent)["state"] == "failed"
                    and db.task(permanent)["attempt"] == 1
                    and len(view_rows(db, permanent)) == 6
                ),
                timeout=15,
                what="the retried permanent failure to fail again",
            )
        finally:
            worker.stop()
        assert check_timeline(db, client, queued) == [
            "enqueued",
            "cancelled",
            "retried",
            "started",
            "succeeded",
        ]
        events = check_timeline(db, client, running)
        assert events == ["enqueued", "started", "cancelled", "retried", "started", "succeeded"], (
            events
        )
        events = check_timeline(db, client, scheduled)
        assert events[-1] == "cancelled"
        assert events.count("cancelled") == 1
        assert check_timeline(db, client, permanent) == [
            "enqueued",
            "started",
            "failed",
            "retried",
            "started",
            "failed",
        ]


def test_bulk_cancel_and_retry_by_filter_and_pause(fast_server: Any, db: Any) -> None:
    with Client(fast_server.address) as client:
        assert client.pause_type("noop", reason="hold")
        ids = client.enqueue_tasks([Task(type="noop") for _ in range(5)])
        result = client.cancel_tasks(states=[TaskState.QUEUED], type="noop", reason="bulk")
        assert result.changed == 5
        result = client.retry_tasks(states=[TaskState.CANCELLED], type="noop", reason="bulk back")
        assert result.changed == 5
        assert client.resume_type("noop")
        worker = make_worker(fast_server.address)
        worker.start()
        try:
            for task_id in ids:
                wait_final(client, task_id)
        finally:
            worker.stop()
        for task_id in ids:
            assert check_timeline(db, client, task_id) == [
                "enqueued",
                "cancelled",
                "retried",
                "started",
                "succeeded",
            ]


def test_hand_back_on_worker_stop_and_lease_expiry(
    fast_server: Any, db: Any, spawn_worker: Any
) -> None:
    with Client(fast_server.address) as client:
        worker = make_worker(fast_server.address, drain_timeout=0.2)
        worker.start()
        handed = client.enqueue_task(Task(type="sleep", payload=b"3"))
        try:
            wait_for(lambda: db.task(handed)["state"] == "running", timeout=15, what="running")
        finally:
            worker.stop()
        assert db.task(handed)["state"] == "queued"
        # A worker process that is SIGKILLed mid-attempt: its lease expires.
        victim = spawn_worker(fast_server.address, concurrency=1)
        wait_for(lambda: db.task(handed)["state"] == "running", timeout=20, what="running again")
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        wait_for(
            lambda: (
                db.task(handed)["state"] in ("queued", "scheduled")
                and db.task(handed)["attempt"] == 1
            ),
            timeout=20,
            what="the lease to be reaped",
        )
        survivor = make_worker(fast_server.address)
        survivor.start()
        try:
            wait_final(client, handed, timeout=30)
        finally:
            survivor.stop()
        events = check_timeline(db, client, handed)
        assert events == [
            "enqueued",
            "started",
            "released",
            "started",
            "lease_expired",
            "started",
            "succeeded",
        ], events


def test_a_frozen_worker_swept_as_lost_then_thawed(
    fast_server: Any, db: Any, spawn_worker: Any
) -> None:
    """Worker lost (sweeper), then its stale outcome arrives: one lease_expired row, and
    the late report writes nothing."""
    with Client(fast_server.address) as client:
        frozen = spawn_worker(fast_server.address, concurrency=1)
        task_id = client.enqueue_task(Task(type="sleep", payload=b"1.5", timeout=30))
        wait_for(lambda: db.task(task_id)["state"] == "running", timeout=20, what="running")
        frozen.signal(signal.SIGSTOP)
        try:
            wait_for(
                lambda: (
                    db.fetchval(
                        "SELECT state FROM conveyor_workers WHERE id = $1",
                        db.task(task_id)["worker_id"],
                    )
                    == "lost"
                    and db.task(task_id)["state"] in ("queued", "scheduled")
                ),
                timeout=30,
                what="the sweeper and the reaper",
            )
        finally:
            frozen.signal(signal.SIGCONT)
        status = wait_final(client, task_id, timeout=40)
        assert status.state is TaskState.SUCCEEDED
        events = check_timeline(db, client, task_id)
        assert events == ["enqueued", "started", "lease_expired", "started", "succeeded"], events
