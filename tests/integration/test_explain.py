"""`explain_task` / `conveyor tasks explain`: why a task is where it is, on real components."""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
from datetime import timedelta

import pytest
from helpers import (
    claimed_by_a_worker_that_vanishes,
    conveyor_command,
    process_env,
    wait_final,
    wait_for,
)

from conveyor import AsyncClient, Client, Task, TaskState, Worker
from conveyor.errors import InvalidTask, TaskNotFound
from conveyor.types import new_task_id


def text(reasons: list[str]) -> str:
    return "\n".join(reasons)


def explain_a_due_retry(start_server, db, *, due_for: timedelta) -> tuple[list[str], TaskState]:
    """Explain a retry left `scheduled`, due for `due_for`, with no
    promotion coming soon (the leader's round a minute away); (reasons, its state)."""
    server = start_server(reaper_interval=timedelta(minutes=1))
    with Client(server.address) as client:
        task_id = client.enqueue_task(Task(type="explain.due"))
        db.execute(
            "UPDATE conveyor_tasks SET state = 'scheduled', attempt = 1, "
            "available_at = now() - $2::interval WHERE id = $1::uuid",
            task_id,
            due_for,
        )
        return client.explain_task(task_id), client.get_task_status(task_id).state


def explain_an_expired_lease(start_server, db, *, max_retries: int, expired_for: timedelta) -> str:
    """Explain a running task whose worker vanished, its lease expired `expired_for` ago,
    with the reaper's round an hour long (so it waits); the reasons as one text."""
    server = start_server(reaper_interval=timedelta(hours=1))
    task_id = new_task_id()
    asyncio.run(
        claimed_by_a_worker_that_vanishes(db.url, task_id, "explain.lost", max_retries=max_retries)
    )
    db.execute(
        "UPDATE conveyor_tasks SET lease_expires_at = now() - $2::interval WHERE id = $1::uuid",
        task_id,
        expired_for,
    )
    with Client(server.address) as client:
        return text(client.explain_task(task_id))


class TestExplainQueued:
    def test_a_task_behind_others_with_no_worker_says_both(self, client: Client) -> None:
        """Position in the queue and the missing worker are both named."""
        ids = client.enqueue_tasks([Task(type="explain.q") for _ in range(3)])
        reasons = client.explain_task(ids[2])
        assert "waiting behind 2 older available task(s) of type 'explain.q'" in reasons[0]
        assert "no live worker handles type 'explain.q'" in text(reasons)
        assert "next in line" in client.explain_task(ids[0])[0]

    def test_a_live_worker_for_the_type_is_counted(self, server, client: Client) -> None:
        """With a worker registered for the type, the explanation names it, not its absence."""
        gate = threading.Event()
        worker = Worker(server.address, concurrency=1)
        worker.register_handler("explain.busy", lambda _ctx, _p: gate.wait(10) and b"")
        worker.start()
        try:
            first = client.enqueue_task(Task(type="explain.busy"))
            wait_for(lambda: client.get_task_status(first).state is TaskState.RUNNING)
            second = client.enqueue_task(Task(type="explain.busy"))
            reasons = client.explain_task(second)
            assert "1 live worker(s) handle type 'explain.busy' with 1 slot(s)" in text(reasons)
            assert "no live worker" not in text(reasons)
            running = client.explain_task(first)
            assert f"on worker {worker.worker_id}" in running[0]
            assert "last heartbeat was" in text(running)
        finally:
            gate.set()
            worker.stop()

    def test_a_worker_silent_past_the_lease_is_not_live(self, start_server, db) -> None:
        """With a lease shorter than `worker_lost_after`, a worker killed a lease ago (its
        row still active, its leases expired) was still "1 live worker" for its type."""
        server = start_server(
            lease_ttl=timedelta(seconds=4), heartbeat_interval=timedelta(seconds=1)
        )
        worker = Worker(server.address, concurrency=1)
        worker.register_handler("explain.silent", lambda _ctx, _p: b"")
        worker.start()
        worker.stop()
        # As a worker killed 6 s ago leaves it: active, silent past its 4 s lease.
        db.execute(
            "UPDATE conveyor_workers SET state = 'active', "
            "last_heartbeat_at = now() - interval '6 seconds' WHERE id = $1",
            worker.worker_id,
        )
        with Client(server.address) as client:
            reasons = text(client.explain_task(client.enqueue_task(Task(type="explain.silent"))))
        assert "no live worker handles type 'explain.silent'" in reasons

    def test_a_task_waiting_out_its_backoff_says_when_it_becomes_available(
        self, start_server
    ) -> None:
        """A failed attempt with retries left is explained as a backoff, with the error."""
        server = start_server(
            retry_backoff_base=timedelta(seconds=30), retry_backoff_cap=timedelta(seconds=60)
        )
        worker = Worker(server.address, concurrency=1)

        def fail(_ctx, _payload):
            raise ValueError("try later")

        worker.register_handler("explain.retry", fail)
        with Client(server.address) as client:
            task_id = client.enqueue_task(Task(type="explain.retry"))
            worker.start()
            try:
                wait_for(
                    lambda: (
                        client.get_task_status(task_id).attempts == 1
                        and client.get_task_status(task_id).state is TaskState.QUEUED
                    )
                )
            finally:
                worker.stop()
            reasons = client.explain_task(task_id)
        assert "waiting for its retry backoff" in reasons[0]
        assert "ValueError: try later" in reasons[0]

    def test_a_retry_due_but_not_yet_promoted_says_what_moves_it(self, start_server, db) -> None:
        """A retry whose backoff ended stays `scheduled` until a promotion moves it into the
        queue (its server's timer, the leader's next round). Left there (here: no timer,
        the leader's round a minute away), it was explained as "next in line"; it now says
        what it waits for and where to look when it waits too long."""
        reasons, state = explain_a_due_retry(start_server, db, due_for=timedelta(seconds=90))
        assert state is TaskState.QUEUED
        assert reasons[0].startswith("its retry backoff ended 9"), reasons  # 90.0s and a bit
        assert "retry_promotion_failed" in reasons[0]
        assert "next in line" not in text(reasons)

    def test_a_retry_just_due_is_not_called_overdue(self, start_server, db) -> None:
        """In the moment between a backoff's end and its promotion (a timer's few
        milliseconds), explain said "long overdue, look for a server without a leader": a
        false alarm for most retries looked at as their backoff ended. It is overdue only a
        reaper round (and a margin) past its time."""
        reasons, _state = explain_a_due_retry(start_server, db, due_for=timedelta(0))
        assert reasons[0].startswith("its retry backoff ended"), reasons
        assert "joins the queue at the next promotion" in reasons[0]
        assert "overdue" not in text(reasons)


class TestExplainFinished:
    def test_finished_tasks_are_explained_by_their_outcome(self, server, client: Client) -> None:
        """Succeeded and cancelled tasks say so, with when."""
        worker = Worker(server.address, concurrency=1)
        worker.register_handler("explain.ok", lambda _ctx, _p: b"")
        worker.start()
        try:
            done = client.enqueue_task(Task(type="explain.ok"))
            wait_final(client, done)
        finally:
            worker.stop()
        assert client.explain_task(done)[0].startswith("succeeded after 1 attempt(s)")
        cancelled = client.enqueue_task(Task(type="explain.never"))
        client.cancel_task(cancelled)
        assert client.explain_task(cancelled)[0].startswith("cancelled at")
        # In the CLI's and the dashboard's style, not ISO 8601's (a review's finding).
        assert re.search(
            r"at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC$",
            client.explain_task(done)[0],
        ), client.explain_task(done)

    def test_a_status_carries_its_explanation_when_asked(self, server, client: Client) -> None:
        """`get_task_status(explain=True)` on both clients: explain_task's sentences, read
        with the status in one call; without `explain`, none."""
        cancelled = client.enqueue_task(Task(type="explain.never"))
        client.cancel_task(cancelled)
        reasons = client.explain_task(cancelled)
        assert reasons[0].startswith("cancelled at")
        assert client.get_task_status(cancelled, explain=True).explanation == tuple(reasons)
        assert client.get_task_status(cancelled, history=True).explanation == ()

        async def read_async() -> tuple[tuple[str, ...], tuple[str, ...]]:
            async with AsyncClient(server.address) as async_client:
                asked = await async_client.get_task_status(cancelled, explain=True)
                plain = await async_client.get_task_status(cancelled)
            return asked.explanation, plain.explanation

        assert asyncio.run(read_async()) == (tuple(reasons), ())
        with pytest.raises(InvalidTask, match="explain must be True or False"):
            client.get_task_status(cancelled, explain="yes")  # type: ignore[arg-type]

    def test_unknown_and_malformed_ids_are_typed_errors(self, client: Client) -> None:
        """NOT_FOUND and INVALID_ARGUMENT come back as TaskNotFound and InvalidTask."""
        with pytest.raises(TaskNotFound):
            client.explain_task("00000000-0000-4000-8000-000000000099")
        with pytest.raises(InvalidTask):
            client.explain_task("nope")


class TestExplainCli:
    def test_cli_prints_one_line_per_reason(self, server, client: Client) -> None:
        """`conveyor tasks explain ID` prints the reasons as a list and exits 0."""
        task_id = client.enqueue_task(Task(type="explain.cli"))
        result = subprocess.run(
            conveyor_command("tasks", "explain", task_id, "--server", server.address),
            capture_output=True,
            text=True,
            env=process_env(),
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "- next in line for type 'explain.cli'"
        assert any("no live worker handles type 'explain.cli'" in line for line in lines)


class TestExplainAnExpiredLease:
    @pytest.mark.parametrize(
        ("max_retries", "fate"),
        [(2, "re-queue it"), (0, "fail it (this was its last attempt)")],
    )
    def test_the_reapers_next_step_depends_on_the_attempts_left(
        self, start_server, db, max_retries: int, fate: str
    ) -> None:
        """A running task whose lease expired is re-queued by the reaper while it has
        attempts left, and failed on its last one; the explanation said re-queued always."""
        reasons = explain_an_expired_lease(
            start_server, db, max_retries=max_retries, expired_for=timedelta(seconds=1)
        )
        assert f"the leader's reaper will {fate} at its next round" in reasons
        assert "overdue" not in reasons  # a second late, inside the reaper's round

    def test_a_lease_expired_for_longer_than_a_round_is_overdue(self, start_server, db) -> None:
        """Past a reaper round (and the margin) no reaper ran: during a leader gap it said
        "the leader's reaper will re-queue it at its next round" though no server led (a
        review: 8 s of it). Here the round is an hour, and the lease expired two ago."""
        reasons = explain_an_expired_lease(
            start_server, db, max_retries=2, expired_for=timedelta(hours=2)
        )
        assert "the leader's reaper will re-queue it at its next round: long overdue" in reasons
        assert "look for a cluster without a leader" in reasons
