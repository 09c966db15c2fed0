"""Operator control end to end: listings, retry and cancel by ids or filter, pause and resume,
the cluster status and a task's payload, through `Client`, `AsyncClient` and raw gRPC against
a real server, real PostgreSQL and real workers.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from helpers import async_wait_for, free_port, get_json, running, wait_final, wait_for
from prometheus_client.parser import text_string_to_metric_families

import conveyor
from conveyor import (
    AsyncClient,
    BulkResult,
    Client,
    ClusterStatus,
    RetryPolicy,
    Task,
    TaskContext,
    TaskState,
    TaskStatus,
    TypeStatus,
    Worker,
)
from conveyor.errors import InvalidTask, PermanentFailure, TaskNotFound
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

# Workers learn of a cancellation from their next heartbeat: make heartbeats quick.
QUICK_HEARTBEATS = {
    "heartbeat_interval": timedelta(milliseconds=200),
    "lease_ttl": timedelta(seconds=5),
}
UNKNOWN_ID = "00000000-0000-4000-8000-00000000beef"


# --- helpers ------------------------------------------------------------------------------


class Runs:
    """What in-process handlers ran, in the order they started: (task id, attempt)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: list[tuple[str, int]] = []

    def add(self, ctx: TaskContext) -> None:
        with self._lock:
            self._runs.append((ctx.task_id, ctx.attempt))

    def all(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._runs)

    def ids(self) -> list[str]:
        return [task_id for task_id, _attempt in self.all()]


def fail_or_succeed(runs: Runs) -> Callable[[TaskContext, bytes], bytes]:
    """A handler that succeeds on payload b"ok" and fails for good on anything else."""

    def handle(ctx: TaskContext, payload: bytes) -> bytes:
        runs.add(ctx)
        if payload != b"ok":
            raise PermanentFailure("bad input")
        return b"done"

    return handle


def worker_for(address: str, handlers: dict[str, Any], concurrency: int = 4) -> Worker:
    worker = Worker(address, concurrency=concurrency)
    for task_type, handler in handlers.items():
        worker.register_handler(task_type, handler)
    return worker


def state_of(client: Client, task_id: str) -> TaskState:
    return client.get_task_status(task_id).state


def events(status: TaskStatus) -> list[str]:
    return [event.event for event in status.history]


def offline_client() -> Client:
    """A client whose server does not exist: an InvalidTask from it was raised client-side."""
    policy = RetryPolicy(
        call_timeout=timedelta(milliseconds=200), total_timeout=timedelta(milliseconds=500)
    )
    return Client(f"127.0.0.1:{free_port()}", retry=policy)


@pytest.fixture
def admin_stub(server) -> Iterator[Any]:
    """A raw AdminService stub: what arrives on the wire without the client's checks."""
    channel = grpc.insecure_channel(server.address)
    try:
        yield pb_grpc.AdminServiceStub(channel)
    finally:
        channel.close()


def invalid_argument(call: Any, request: Any) -> str:
    """Make a raw gRPC call that must fail with INVALID_ARGUMENT; return its message."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=10)
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, f"{error.code()}: {error.details()}"
    return str(error.details())


def stale_reports(server) -> float:
    """How many reports and heartbeats the server refused for a lease that was not current."""
    value = server.server.metrics.registry.get_sample_value(
        "conveyor_stale_completions_rejected_total"
    )
    assert value is not None, "the server exports no stale-completions counter"
    return float(value)


def paused_gauge(http_url: str, task_type: str) -> float | None:
    """conveyor_task_type_paused{type=task_type} as /metrics shows it (None: not exported)."""
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=10) as response:  # noqa: S310 - our own http:// URL
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "conveyor_task_type_paused" and sample.labels == {"type": task_type}:
                return float(sample.value)
    return None


def type_entry(status: ClusterStatus, task_type: str) -> TypeStatus | None:
    matches = [entry for entry in status.types if entry.type == task_type]
    assert len(matches) <= 1, f"type {task_type} listed twice: {matches}"
    return matches[0] if matches else None


def sampled_after(client: Client, moment: float) -> ClusterStatus:
    """The first status whose sample was taken after `moment` (a time.time() value)."""
    return wait_for(
        lambda: (
            (status := client.get_status()).sampled_at is not None
            and status.sampled_at.timestamp() > moment
            and status
        ),
        timeout=10,
        what="a stats sample taken after the action",
    )


def walk(client: Client, limit: int, **filters: Any) -> list[list[str]]:
    """Every page of a listing, following the page tokens: the ids of each page."""
    pages: list[list[str]] = []
    token: str | None = None
    while True:
        page = client.list_tasks(limit=limit, page_token=token, **filters)
        pages.append([task.id for task in page.tasks])
        token = page.next_page_token
        if token is None:
            return pages
        assert len(pages) < 100, "the page tokens never end"


# --- listings -----------------------------------------------------------------------------

LIST_TYPES = ("ls.a", "ls.b", "ls.ok", "ls.bad")


@dataclass
class Seeded:
    """30 tasks in four types and four states, and what each one should be."""

    ids: list[str]  # in enqueue order
    types: dict[str, str]
    states: dict[str, TaskState]

    def newest_first(
        self, *, states: Sequence[TaskState] = (), task_type: str | None = None
    ) -> list[str]:
        return [
            task_id
            for task_id in reversed(self.ids)
            if (not states or self.states[task_id] in states)
            and (task_type is None or self.types[task_id] == task_type)
        ]


@pytest.fixture
def seeded(server, client: Client) -> Seeded:
    """Interleaved types: ls.ok succeed, ls.bad fail, some ls.a and ls.b are cancelled."""
    tasks = [
        Task(type=LIST_TYPES[i % 4], payload=b"ok" if i % 4 == 2 else b"no") for i in range(30)
    ]
    ids = client.enqueue_tasks(tasks)
    types = {task_id: task.type for task_id, task in zip(ids, tasks, strict=True)}
    runs = Runs()
    handler = fail_or_succeed(runs)
    with running(worker_for(server.address, {"ls.ok": handler, "ls.bad": handler})):
        for task_id in ids:
            if types[task_id] in {"ls.ok", "ls.bad"}:
                wait_final(client, task_id)
    of_a = [task_id for task_id in ids if types[task_id] == "ls.a"]
    of_b = [task_id for task_id in ids if types[task_id] == "ls.b"]
    for task_id in of_a[:3] + of_b[:2]:
        client.cancel_task(task_id)
    states = {task_id: state_of(client, task_id) for task_id in ids}
    expected = {
        "ls.ok": TaskState.SUCCEEDED,
        "ls.bad": TaskState.FAILED,
    }
    for task_id in ids:
        if types[task_id] in expected:
            assert states[task_id] is expected[types[task_id]]
    assert [states[task_id] for task_id in of_a] == [TaskState.CANCELLED] * 3 + [
        TaskState.QUEUED
    ] * 5
    assert [states[task_id] for task_id in of_b] == [TaskState.CANCELLED] * 2 + [
        TaskState.QUEUED
    ] * 6
    return Seeded(ids=ids, types=types, states=states)


class TestListTasks:
    def test_newest_first_filtered_by_states_type_or_both(
        self, seeded: Seeded, client: Client
    ) -> None:
        """Every filter shape lists exactly its tasks, newest first, with their state."""
        page = client.list_tasks(limit=100)
        assert [task.id for task in page.tasks] == seeded.newest_first()
        assert page.next_page_token is None
        for task in page.tasks:
            assert task.type == seeded.types[task.id]
            assert task.state is seeded.states[task.id]
            if task.state is TaskState.FAILED:
                assert task.last_error is not None
                assert "bad input" in task.last_error
                assert task.attempts == 1

        queued, failed = TaskState.QUEUED, TaskState.FAILED
        cancelled, succeeded = TaskState.CANCELLED, TaskState.SUCCEEDED
        cases: list[tuple[dict[str, Any], list[TaskState], str | None]] = [
            ({"states": "queued"}, [queued], None),
            ({"states": failed}, [failed], None),
            ({"states": ["cancelled", "failed", succeeded]}, [cancelled, failed, succeeded], None),
            ({"states": [queued, cancelled]}, [queued, cancelled], None),
            ({"type": "ls.a"}, [], "ls.a"),
            ({"type": "ls.ok"}, [], "ls.ok"),
            ({"type": "ls.b", "states": "queued"}, [queued], "ls.b"),
            ({"type": "ls.a", "states": ["cancelled", "queued"]}, [cancelled, queued], "ls.a"),
            ({"type": "ls.ok", "states": ["failed", "queued"]}, [failed, queued], "ls.ok"),
            ({"type": "ls.nothing"}, [], "ls.nothing"),
        ]
        for arguments, states, task_type in cases:
            page = client.list_tasks(limit=100, **arguments)
            expected = seeded.newest_first(states=states, task_type=task_type)
            assert [task.id for task in page.tasks] == expected, arguments
            assert page.next_page_token is None, arguments
        # The filters are not vacuous: each state and type above holds tasks.
        assert len(seeded.newest_first(states=[queued], task_type="ls.b")) == 6
        assert len(seeded.newest_first(states=[cancelled], task_type="ls.a")) == 3

    def test_paging_visits_every_task_once_in_order(self, seeded: Seeded, client: Client) -> None:
        """Following next_page_token walks the whole listing once, newest first, no repeats."""
        pages = walk(client, 7)
        assert [len(page) for page in pages] == [7, 7, 7, 7, 2]
        assert list(itertools.chain.from_iterable(pages)) == seeded.newest_first()

        # A listing that ends exactly on a page boundary has no empty extra page.
        pages = walk(client, 10)
        assert [len(page) for page in pages] == [10, 10, 10]
        assert list(itertools.chain.from_iterable(pages)) == seeded.newest_first()

        pages = walk(client, 3, type="ls.a", states=["queued", "cancelled"])
        assert [len(page) for page in pages] == [3, 3, 2]
        assert list(itertools.chain.from_iterable(pages)) == seeded.newest_first(task_type="ls.a")

        pages = walk(client, 4, states=["queued", "failed"])
        wanted = seeded.newest_first(states=[TaskState.QUEUED, TaskState.FAILED])
        assert len(wanted) == 18
        assert [len(page) for page in pages] == [4, 4, 4, 4, 2]
        assert list(itertools.chain.from_iterable(pages)) == wanted

    def test_a_state_named_twice_lists_each_task_once(self, client: Client) -> None:
        """Naming a state twice in the filter does not list its tasks twice."""
        ids = client.enqueue_tasks([Task(type="ls.twice") for _ in range(3)])
        page = client.list_tasks(type="ls.twice", states=["queued", "queued"])
        assert [task.id for task in page.tasks] == ids[::-1]
        page = client.list_tasks(states=["queued", TaskState.QUEUED], limit=2)
        assert [task.id for task in page.tasks] == ids[:0:-1]

    def test_the_page_size_is_capped_at_1000(self, client: Client) -> None:
        """A limit above the cap gets 1000 tasks and a token; a small limit gets exactly that."""
        ids = client.enqueue_tasks([Task(type="ls.cap") for _ in range(1010)])
        first = client.list_tasks(type="ls.cap", limit=5000)
        assert len(first.tasks) == 1000
        assert first.next_page_token is not None
        rest = client.list_tasks(type="ls.cap", limit=5000, page_token=first.next_page_token)
        assert rest.next_page_token is None
        listed = [task.id for task in first.tasks + rest.tasks]
        assert listed == ids[::-1]

        small = client.list_tasks(type="ls.cap", limit=5)
        assert [task.id for task in small.tasks] == ids[:-6:-1]
        assert small.next_page_token is not None

    def test_a_page_token_that_is_not_a_bigint_is_invalid_task(self, client: Client) -> None:
        """Digits beyond the bigint range, or digits int() cannot read: malformed, not INTERNAL."""
        client.enqueue_tasks([Task(type="ls.token") for _ in range(3)])
        for token in ("9999999999999999999", "9223372036854775808", "\u00b2", "1\u00b3"):
            with pytest.raises(InvalidTask, match="page token"):
                client.list_tasks(page_token=token)
            with pytest.raises(InvalidTask, match="page token"):
                client.list_tasks(type="ls.token", page_token=token)
        # The largest bigint is a valid token: every task is below it.
        page = client.list_tasks(page_token=str(2**63 - 1))
        assert len(page.tasks) == 3

    def test_bad_arguments_are_invalid_task(self, client: Client, admin_stub) -> None:
        """Malformed tokens, unknown states, bad types and limits: InvalidTask, nothing else."""
        client.enqueue_tasks([Task(type="ls.bad.args") for _ in range(3)])
        for token in ("abc", "-5", "1.5", " 12", "12345678901234567890"):
            with pytest.raises(InvalidTask):
                client.list_tasks(page_token=token)
        with pytest.raises(InvalidTask):
            client.list_tasks(limit=0)

        # Checked by the client before any call: this client has no server to ask.
        with offline_client() as offline:
            with pytest.raises(InvalidTask, match="sleeping"):
                offline.list_tasks(states=["queued", "sleeping"])
            with pytest.raises(InvalidTask):
                offline.list_tasks(type="bad type!")
            with pytest.raises(InvalidTask):
                offline.list_tasks(type="x" * 129)

        # And by the server, for whatever arrives on the wire.
        invalid_argument(
            admin_stub.ListTasks, pb.ListTasksRequest(filter=pb.TaskFilter(type="bad type!"))
        )
        malformed = pb.ListTasksRequest(page_token="abc")  # noqa: S106 - a page token, not a secret
        invalid_argument(admin_stub.ListTasks, malformed)
        # A valid request on the same stub works: the failures above were the arguments.
        assert len(admin_stub.ListTasks(pb.ListTasksRequest(), timeout=10).tasks) == 3


# --- retry by ids -------------------------------------------------------------------------

RETRY_TYPE = "op.retry"


class TestRetryByIds:
    def test_a_failed_task_is_requeued_at_the_back_and_runs_a_new_series(
        self, server, client: Client
    ) -> None:
        """Retried: queued, attempts restarted, `retried` in its history, behind newer work."""
        broken = threading.Event()
        broken.set()
        runs = Runs()

        def handler(ctx: TaskContext, payload: bytes) -> bytes:
            runs.add(ctx)
            if broken.is_set():
                if ctx.attempt == 1:
                    raise RuntimeError("flaky dependency")
                raise PermanentFailure("bad input")
            return b"ok " + payload

        with running(worker_for(server.address, {RETRY_TYPE: handler}, concurrency=1)):
            failed_id = client.enqueue_task(Task(type=RETRY_TYPE, payload=b"x", max_retries=3))
            failed = wait_final(client, failed_id)
        assert failed.state is TaskState.FAILED
        assert failed.attempts == 2
        assert failed.last_error is not None
        assert "bad input" in failed.last_error
        assert runs.all() == [(failed_id, 1), (failed_id, 2)]

        # Enqueued after the failure, before the retry: it is ahead of the retried task.
        waiting_id = client.enqueue_task(Task(type=RETRY_TYPE, payload=b"y"))
        result = client.retry_tasks([failed_id], reason="input fixed")
        assert result == BulkResult(matched=1, changed=1, changed_ids=(failed_id,), skipped=())

        status = client.get_task_status(failed_id, history=True)
        assert status.state is TaskState.QUEUED
        assert status.attempts == 0
        assert status.finished_at is None
        assert status.started_at is None
        last = status.history[-1]
        assert (last.event, last.state, last.attempt, last.detail) == (
            "retried",
            TaskState.QUEUED,
            0,
            "input fixed",
        )
        queued = client.list_tasks(type=RETRY_TYPE, states="queued")
        assert [task.id for task in queued.tasks] == [failed_id, waiting_id]
        assert "waiting behind 1 older available task(s)" in client.explain_task(failed_id)[0]

        broken.clear()
        with running(worker_for(server.address, {RETRY_TYPE: handler}, concurrency=1)):
            done = wait_final(client, failed_id)
            other = wait_final(client, waiting_id)
        assert done.state is TaskState.SUCCEEDED
        assert done.result == b"ok x"
        assert done.attempts == 1
        assert other.state is TaskState.SUCCEEDED
        # One slot: the task enqueued before the retry ran first, then the retried one.
        assert runs.all()[2:] == [(waiting_id, 1), (failed_id, 1)]
        assert other.started_at is not None
        assert done.started_at is not None
        assert other.started_at < done.started_at
        assert [(event.event, event.attempt) for event in done.history] == [
            ("enqueued", 0),
            ("started", 1),
            ("failed", 1),
            ("started", 2),
            ("failed", 2),
            ("retried", 0),
            ("started", 1),
            ("succeeded", 1),
        ]

    def test_tasks_that_did_not_fail_or_were_not_cancelled_are_skipped(
        self, server, client: Client, db
    ) -> None:
        """Succeeded and queued tasks are left alone and reported with their state."""
        runs = Runs()
        handler = fail_or_succeed(runs)
        with running(worker_for(server.address, {"rs.work": handler})):
            ok_id = client.enqueue_task(Task(type="rs.work", payload=b"ok"))
            bad_id = client.enqueue_task(Task(type="rs.work", payload=b"no"))
            assert wait_final(client, ok_id).state is TaskState.SUCCEEDED
            assert wait_final(client, bad_id).state is TaskState.FAILED
        queued_id = client.enqueue_task(Task(type="rs.idle"))
        cancelled_id = client.enqueue_task(Task(type="rs.idle"))
        client.cancel_task(cancelled_id)

        result = client.retry_tasks([ok_id, queued_id, bad_id, cancelled_id, ok_id])
        assert result.matched == 4
        assert result.changed == 2
        assert result.changed_ids == (bad_id, cancelled_id)
        assert dict(result.skipped) == {ok_id: TaskState.SUCCEEDED, queued_id: TaskState.QUEUED}
        assert len(result.skipped) == 2

        ok = client.get_task_status(ok_id, history=True)
        assert ok.state is TaskState.SUCCEEDED
        assert ok.result == b"done"
        assert events(ok) == ["enqueued", "started", "succeeded"]
        assert events(client.get_task_status(queued_id, history=True)) == ["enqueued"]
        for task_id in (bad_id, cancelled_id):
            status = client.get_task_status(task_id, history=True)
            assert status.state is TaskState.QUEUED
            assert status.attempts == 0
            assert status.history[-1].event == "retried"
            assert status.history[-1].detail == "retried by an operator"
        assert db.fetchval("SELECT count(*) FROM conveyor_task_events WHERE event = 'retried'") == 2

    def test_an_unknown_id_changes_nothing(self, client: Client, db) -> None:
        """One unknown id among valid ones: TaskNotFound, and no task is touched."""
        cancelled_id = client.enqueue_task(Task(type="rs.unknown"))
        client.cancel_task(cancelled_id)
        queued_id = client.enqueue_task(Task(type="rs.unknown"))

        with pytest.raises(TaskNotFound) as caught:
            client.retry_tasks([cancelled_id, UNKNOWN_ID])
        assert UNKNOWN_ID in str(caught.value)
        with pytest.raises(TaskNotFound):
            client.retry_tasks([UNKNOWN_ID])
        with pytest.raises(TaskNotFound):
            client.cancel_tasks([queued_id, UNKNOWN_ID])
        with pytest.raises(InvalidTask):
            client.retry_tasks([cancelled_id, "not-a-uuid"])

        assert events(client.get_task_status(cancelled_id, history=True)) == [
            "enqueued",
            "cancelled",
        ]
        assert events(client.get_task_status(queued_id, history=True)) == ["enqueued"]
        assert db.fetchval("SELECT count(*) FROM conveyor_task_history") == 3

        # The same ids without the unknown one do apply: the refusals above were no accident.
        assert client.retry_tasks([cancelled_id]).changed_ids == (cancelled_id,)
        assert client.cancel_tasks([queued_id]).changed_ids == (queued_id,)

    @pytest.mark.parametrize("action", ["retry", "cancel"])
    def test_an_id_deleted_while_the_call_waits_for_its_row_is_not_found(
        self, client: Client, db, action: str
    ) -> None:
        """Retention deletes one of the ids between the call's first read (no locks) and
        its action, which waits for the row and then finds none: the call answered for
        both ids as matched, but named the deleted one neither changed nor skipped. It is
        now as unknown as if it had gone before the call, and nothing changes."""
        deleted_id, kept_id = client.enqueue_tasks([Task(type="rs.gone") for _ in range(2)])
        if action == "retry":
            client.cancel_tasks([deleted_id, kept_id])
        deleting, commit = threading.Event(), threading.Event()

        async def delete_as_retention_does() -> None:
            conn = await asyncpg.connect(db.url)
            try:
                async with conn.transaction():
                    await conn.execute(
                        "DELETE FROM conveyor_task_events WHERE task_id = $1::uuid", deleted_id
                    )
                    await conn.execute("DELETE FROM conveyor_tasks WHERE id = $1::uuid", deleted_id)
                    deleting.set()
                    await asyncio.to_thread(commit.wait, 30)
            finally:
                await conn.close()

        deleter = threading.Thread(target=asyncio.run, args=(delete_as_retention_does(),))
        deleter.start()
        try:
            assert deleting.wait(10)
            call = client.retry_tasks if action == "retry" else client.cancel_tasks
            outcome: dict[str, Any] = {}

            def act() -> None:
                try:
                    outcome["result"] = call([deleted_id, kept_id])
                except TaskNotFound as exc:
                    outcome["error"] = exc

            acting = threading.Thread(target=act)
            acting.start()
            wait_for(
                lambda: db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                ),
                what="the action to wait for the deleted task's row",
            )
        finally:
            commit.set()
            deleter.join(10)
        acting.join(10)
        assert "result" not in outcome, outcome.get("result")
        assert deleted_id in str(outcome["error"])
        kept = client.get_task_status(kept_id, history=True)
        expected = ["enqueued", "cancelled"] if action == "retry" else ["enqueued"]
        assert events(kept) == expected
        # Without the deleted id, the same call applies.
        assert call([kept_id]).changed_ids == (kept_id,)

    def test_ids_and_a_filter_together_or_neither_are_invalid(
        self, client: Client, admin_stub
    ) -> None:
        """Exactly one of ids and filter, checked by the client and again by the server."""
        task_id = client.enqueue_task(Task(type="rs.args"))
        client.cancel_task(task_id)
        for action in (client.retry_tasks, client.cancel_tasks):
            with pytest.raises(InvalidTask):
                action([task_id], type="rs.args")
            with pytest.raises(InvalidTask):
                action([task_id], states="cancelled")
            with pytest.raises(InvalidTask):
                action()
            with pytest.raises(InvalidTask):
                action([task_id], dry_run=True)
            with pytest.raises(InvalidTask):
                action(task_id)  # one string, not a list of ids

        for call in (admin_stub.RetryTasks, admin_stub.CancelTasks):
            both = pb.BulkTaskRequest(task_ids=[task_id], filter=pb.TaskFilter(type="rs.args"))
            invalid_argument(call, both)
            invalid_argument(call, pb.BulkTaskRequest())
        status = client.get_task_status(task_id, history=True)
        assert status.state is TaskState.CANCELLED
        assert events(status) == ["enqueued", "cancelled"]


# --- retry by filter ----------------------------------------------------------------------


class TestRetryByFilter:
    def test_dry_run_counts_and_the_real_run_changes_exactly_the_matches(
        self, server, client: Client, db
    ) -> None:
        """Dry runs count exactly and change nothing; real runs take only their filter's tasks."""
        runs = Runs()
        handler = fail_or_succeed(runs)
        with running(worker_for(server.address, {"rf.a": handler, "rf.b": handler})):
            a_failed = client.enqueue_tasks([Task(type="rf.a", payload=b"no") for _ in range(5)])
            a_ok = client.enqueue_tasks([Task(type="rf.a", payload=b"ok") for _ in range(2)])
            b_failed = client.enqueue_tasks([Task(type="rf.b", payload=b"no") for _ in range(4)])
            for task_id in a_failed + a_ok + b_failed:
                wait_final(client, task_id)
        a_cancelled = client.enqueue_tasks([Task(type="rf.a") for _ in range(3)])
        for task_id in a_cancelled:
            client.cancel_task(task_id)
        a_queued = client.enqueue_task(Task(type="rf.a"))

        def snapshot() -> list[tuple[Any, ...]]:
            return [
                tuple(row)
                for row in db.fetch(
                    "SELECT id, state, attempt, seq FROM conveyor_tasks ORDER BY seq"
                )
            ]

        before = snapshot()
        assert client.retry_tasks(type="rf.a", dry_run=True) == BulkResult(matched=8, changed=0)
        assert client.retry_tasks(states="failed", type="rf.a", dry_run=True).matched == 5
        assert client.retry_tasks(states="cancelled", type="rf.a", dry_run=True).matched == 3
        assert client.retry_tasks(states="failed", dry_run=True).matched == 9
        assert client.retry_tasks(states=["failed", "cancelled"], dry_run=True).matched == 12
        assert client.retry_tasks(type="rf.a", dry_run=True, limit=2).matched == 2
        assert client.retry_tasks(type="rf.a", dry_run=True, limit=50).matched == 8
        assert client.retry_tasks(type="rf.none", dry_run=True).matched == 0
        assert client.cancel_tasks(type="rf.a", dry_run=True).matched == 1
        assert snapshot() == before
        assert db.fetchval("SELECT count(*) FROM conveyor_task_events WHERE event = 'retried'") == 0

        result = client.retry_tasks(states="failed", type="rf.a", reason="deployed the fix")
        assert result == BulkResult(matched=5, changed=5)
        for task_id in a_failed:
            status = client.get_task_status(task_id, history=True)
            assert status.state is TaskState.QUEUED
            assert status.attempts == 0
            assert (status.history[-1].event, status.history[-1].detail) == (
                "retried",
                "deployed the fix",
            )
        untouched = {
            **dict.fromkeys(a_ok, TaskState.SUCCEEDED),
            **dict.fromkeys(b_failed, TaskState.FAILED),
            **dict.fromkeys(a_cancelled, TaskState.CANCELLED),
            a_queued: TaskState.QUEUED,
        }
        assert {task_id: state_of(client, task_id) for task_id in untouched} == untouched

        # A limit is respected exactly.
        assert client.retry_tasks(type="rf.b", limit=3) == BulkResult(matched=3, changed=3)
        b_states = sorted(state_of(client, task_id) for task_id in b_failed)
        assert b_states == sorted([TaskState.QUEUED] * 3 + [TaskState.FAILED])

        # Without states: failed and cancelled. The five re-queued ones are queued now.
        assert client.retry_tasks(type="rf.a") == BulkResult(matched=3, changed=3)
        assert {state_of(client, task_id) for task_id in a_cancelled} == {TaskState.QUEUED}
        assert (
            db.fetchval("SELECT count(*) FROM conveyor_task_events WHERE event = 'retried'") == 11
        )
        assert {state_of(client, task_id) for task_id in a_ok} == {TaskState.SUCCEEDED}
        # Nothing ran meanwhile: the worker was stopped before the first retry.
        assert len(runs.all()) == 11

    def test_states_a_retry_cannot_apply_to_are_refused(self, client: Client, db) -> None:
        """Retry is for failed or cancelled tasks; cancel for queued or running ones."""
        task_id = client.enqueue_task(Task(type="rf.wrong"))
        for states in (["running"], ["queued"], ["succeeded"], ["failed", "queued"]):
            with pytest.raises(InvalidTask):
                client.retry_tasks(states=states, type="rf.wrong")
            with pytest.raises(InvalidTask):
                client.retry_tasks(states=states, type="rf.wrong", dry_run=True)
        for states in (["failed"], ["cancelled"], ["succeeded"], ["queued", "failed"]):
            with pytest.raises(InvalidTask):
                client.cancel_tasks(states=states, type="rf.wrong")
        with pytest.raises(InvalidTask):
            client.retry_tasks(states="failed", limit=-1)
        with pytest.raises(InvalidTask):
            client.retry_tasks(states="failed", reason="x" * 1001)
        with pytest.raises(InvalidTask):
            client.cancel_tasks(type="rf.wrong", reason="x" * 1001)
        status = client.get_task_status(task_id, history=True)
        assert status.state is TaskState.QUEUED
        assert events(status) == ["enqueued"]
        assert db.fetchval("SELECT count(*) FROM conveyor_task_history") == 1


# --- cancel -------------------------------------------------------------------------------


class TestCancelTasks:
    def test_queued_tasks_cancelled_by_ids(self, client: Client) -> None:
        """Cancelled with a `cancelled` event and its reason; a second cancel skips them."""
        first, second, third = client.enqueue_tasks([Task(type="cx.ids") for _ in range(3)])
        result = client.cancel_tasks([first, second], reason="wrong recipient list")
        assert result == BulkResult(matched=2, changed=2, changed_ids=(first, second))
        for task_id in (first, second):
            status = client.get_task_status(task_id, history=True)
            assert status.state is TaskState.CANCELLED
            assert status.finished_at is not None
            last = status.history[-1]
            assert (last.event, last.state, last.detail) == (
                "cancelled",
                TaskState.CANCELLED,
                "wrong recipient list",
            )
        assert state_of(client, third) is TaskState.QUEUED

        again = client.cancel_tasks([first, third])
        assert again.changed_ids == (third,)
        assert again.skipped == ((first, TaskState.CANCELLED),)
        assert events(client.get_task_status(first, history=True)) == ["enqueued", "cancelled"]
        last = client.get_task_status(third, history=True).history[-1]
        assert (last.event, last.detail) == ("cancelled", "cancelled by an operator")

    def test_a_running_task_cancelled_by_id_stops_on_its_worker(self, start_server) -> None:
        """The worker learns of the cancel, the handler sees it, and the task never runs again."""
        server = start_server(**QUICK_HEARTBEATS)
        started = threading.Event()
        saw_cancel = threading.Event()
        runs = Runs()

        def handler(ctx: TaskContext, payload: bytes) -> bytes:
            runs.add(ctx)
            if payload == b"fast":
                return b"fast"
            started.set()
            if ctx.cancelled.wait(20):
                saw_cancel.set()
                return b"stopped"
            return b"never cancelled"

        worker = worker_for(server.address, {"cx.run": handler}, concurrency=1)
        with running(worker), Client(server.address) as client:
            task_id = client.enqueue_task(Task(type="cx.run", payload=b"slow"))
            wait_for(started.is_set, timeout=10, what="the handler to start")
            assert state_of(client, task_id) is TaskState.RUNNING
            result = client.cancel_tasks([task_id], reason="operator says stop")
            assert result == BulkResult(matched=1, changed=1, changed_ids=(task_id,))
            wait_for(saw_cancel.is_set, timeout=10, what="the handler to see ctx.cancelled")
            # One slot: the next task runs only once the cancelled attempt is settled.
            fast_id = client.enqueue_task(Task(type="cx.run", payload=b"fast"))
            following = wait_final(client, fast_id, timeout=15)
            status = client.get_task_status(task_id, history=True)

        assert following.state is TaskState.SUCCEEDED
        assert runs.ids() == [task_id, fast_id]
        assert status.state is TaskState.CANCELLED
        assert status.result is None
        assert [(event.event, event.detail) for event in status.history] == [
            ("enqueued", None),
            ("started", None),
            ("cancelled", "operator says stop"),
        ]
        # The worker reported nothing for the revoked lease.
        assert stale_reports(server) == 0

    def test_cancel_by_type_takes_its_queued_and_running_tasks_only(self, start_server) -> None:
        """A filter by type cancels that type's running and queued tasks, not other types."""
        server = start_server(**QUICK_HEARTBEATS)
        started = threading.Event()
        saw_cancel = threading.Event()
        runs = Runs()

        def handler(ctx: TaskContext, payload: bytes) -> bytes:
            runs.add(ctx)
            if payload == b"fast":
                return b"fast"
            started.set()
            if ctx.cancelled.wait(20):
                saw_cancel.set()
            return b"slept"

        worker = worker_for(server.address, {"cx.type": handler}, concurrency=1)
        with running(worker), Client(server.address) as client:
            running_id = client.enqueue_task(Task(type="cx.type", payload=b"slow"))
            wait_for(started.is_set, timeout=10, what="the handler to start")
            queued_ids = client.enqueue_tasks([Task(type="cx.type") for _ in range(2)])
            other_ids = client.enqueue_tasks([Task(type="cx.other") for _ in range(2)])
            assert client.cancel_tasks(type="cx.type", dry_run=True).matched == 3
            result = client.cancel_tasks(type="cx.type", reason="type retired")
            assert result == BulkResult(matched=3, changed=3)
            wait_for(saw_cancel.is_set, timeout=10, what="the handler to see ctx.cancelled")
            fast_id = client.enqueue_task(Task(type="cx.type", payload=b"fast"))
            assert wait_final(client, fast_id, timeout=15).state is TaskState.SUCCEEDED
            for task_id in (running_id, *queued_ids):
                status = client.get_task_status(task_id, history=True)
                assert status.state is TaskState.CANCELLED
                assert (status.history[-1].event, status.history[-1].detail) == (
                    "cancelled",
                    "type retired",
                )
            assert {state_of(client, task_id) for task_id in other_ids} == {TaskState.QUEUED}

        assert runs.ids() == [running_id, fast_id]
        assert stale_reports(server) == 0

    def test_bulk_cancel_by_filter_covers_every_batch(self, client: Client, db) -> None:
        """1,200 tasks (more than one batch of 500) are all cancelled; the count is exact."""
        bulk = client.enqueue_tasks([Task(type="cx.bulk") for _ in range(1200)])
        capped = client.enqueue_tasks([Task(type="cx.capped") for _ in range(800)])
        kept = client.enqueue_tasks([Task(type="cx.kept") for _ in range(5)])
        assert len(set(bulk)) == 1200

        assert client.cancel_tasks(type="cx.bulk", dry_run=True).matched == 1200
        result = client.cancel_tasks(type="cx.bulk", states="queued", reason="flood")
        assert result == BulkResult(matched=1200, changed=1200)
        counts = {
            row["state"]: row["count"]
            for row in db.fetch(
                "SELECT type || ':' || state AS state, count(*) FROM conveyor_tasks "
                "GROUP BY type, state"
            )
        }
        assert counts == {
            "cx.bulk:cancelled": 1200,
            "cx.capped:queued": 800,
            "cx.kept:queued": 5,
        }
        cancelled_events = db.fetchval(
            "SELECT count(DISTINCT task_id) FROM conveyor_task_events "
            "WHERE event = 'cancelled' AND detail = 'flood'"
        )
        assert cancelled_events == 1200
        assert client.cancel_tasks(type="cx.bulk") == BulkResult(matched=0, changed=0)

        # Retried back in bulk, they queue again in their original order (batches walk the
        # queue oldest first and each draws its new positions in order).
        assert client.retry_tasks(type="cx.bulk") == BulkResult(matched=1200, changed=1200)
        requeued = db.fetch(
            "SELECT id::text, state::text FROM conveyor_tasks WHERE type = 'cx.bulk' ORDER BY seq"
        )
        assert [row["id"] for row in requeued] == bulk
        assert {row["state"] for row in requeued} == {"queued"}

        # A limit across the batch boundary: exactly the oldest 700 of 800, then the rest.
        assert client.cancel_tasks(type="cx.capped", limit=700) == BulkResult(700, 700)
        cancelled = db.fetch(
            "SELECT id::text FROM conveyor_tasks "
            "WHERE type = 'cx.capped' AND state = 'cancelled' ORDER BY seq"
        )
        assert [row["id"] for row in cancelled] == capped[:700]
        assert client.cancel_tasks(type="cx.capped") == BulkResult(matched=100, changed=100)
        assert {state_of(client, task_id) for task_id in capped[:3] + capped[-3:]} == {
            TaskState.CANCELLED
        }
        assert {state_of(client, task_id) for task_id in kept} == {TaskState.QUEUED}


# --- pause and resume ---------------------------------------------------------------------

PAUSED, FREE = "op.pause.a", "op.pause.b"


class TestPauseResume:
    def test_a_paused_type_is_not_leased_until_resumed(self, server, client: Client) -> None:
        """Paused: queued and explained as paused, shown in status and metrics; resumed: runs."""
        runs = Runs()

        def handler(ctx: TaskContext, payload: bytes) -> bytes:
            runs.add(ctx)
            return b"done"

        assert client.pause_type(PAUSED, reason="schema migration") is True
        assert client.pause_type(PAUSED, reason="again") is False
        # Enqueued first, so they would be leased first if the pause were ignored.
        paused_ids = client.enqueue_tasks([Task(type=PAUSED) for _ in range(3)])
        free_ids = client.enqueue_tasks([Task(type=FREE) for _ in range(3)])

        worker = worker_for(server.address, {PAUSED: handler, FREE: handler}, concurrency=2)
        with running(worker):
            # The worker polled: it leased every FREE task, and no PAUSED one.
            for task_id in free_ids:
                assert wait_final(client, task_id).state is TaskState.SUCCEEDED
            for task_id in paused_ids:
                status = client.get_task_status(task_id, history=True)
                assert status.state is TaskState.QUEUED
                assert events(status) == ["enqueued"]
            assert sorted(runs.ids()) == sorted(free_ids)

            reasons = client.explain_task(paused_ids[0])
            assert f"its type {PAUSED!r} is paused (schema migration)" in reasons[0]

            status = wait_for(
                lambda: (
                    (entry := type_entry(status := client.get_status(), PAUSED)) is not None
                    and entry.queued == 3
                    and status
                ),
                timeout=10,
                what="the sampler to count the paused type's tasks",
            )
            entry = type_entry(status, PAUSED)
            assert entry is not None
            assert entry.paused is True
            assert entry.running == 0
            assert [(item.type, item.reason) for item in status.paused_types] == [
                (PAUSED, "schema migration")
            ]
            free_entry = type_entry(status, FREE)
            assert free_entry is None or free_entry.paused is False
            wait_for(
                lambda: paused_gauge(server.http_url, PAUSED) == 1,
                timeout=10,
                what=f'conveyor_task_type_paused{{type="{PAUSED}"}} to be 1',
            )

            resumed_at = time.monotonic()
            assert client.resume_type(PAUSED) is True
            for task_id in paused_ids:
                assert wait_final(client, task_id, timeout=10).state is TaskState.SUCCEEDED
            assert time.monotonic() - resumed_at < 5
            assert client.resume_type(PAUSED) is False

        assert sorted(runs.ids()) == sorted(free_ids + paused_ids)
        assert client.get_status().paused_types == ()
        wait_for(
            lambda: paused_gauge(server.http_url, PAUSED) == 0,
            timeout=10,
            what=f'conveyor_task_type_paused{{type="{PAUSED}"}} to be 0 after the resume',
        )
        assert "paused" not in " ".join(client.explain_task(paused_ids[0]))

    def test_answers_and_bad_type_names(self, client: Client, admin_stub, db) -> None:
        """Resume of a type never paused is False; bad names are InvalidTask everywhere."""
        assert client.resume_type("op.never.paused") is False
        for bad in ("bad type!", "", "x" * 129, "tab\there"):
            with pytest.raises(InvalidTask):
                client.pause_type(bad)
            with pytest.raises(InvalidTask):
                client.resume_type(bad)
            invalid_argument(admin_stub.PauseType, pb.PauseTypeRequest(type=bad))
            invalid_argument(admin_stub.ResumeType, pb.ResumeTypeRequest(type=bad))
        with pytest.raises(InvalidTask):
            client.pause_type("op.too.long.reason", reason="x" * 1001)
        assert db.fetchval("SELECT count(*) FROM conveyor_paused_types") == 0

        assert client.pause_type("op.plain") is True
        assert [(item.type, item.reason) for item in client.get_status().paused_types] == [
            ("op.plain", None)
        ]
        assert client.resume_type("op.plain") is True
        assert client.resume_type("op.plain") is False

    def test_status_shows_a_pause_at_once_as_the_other_views_do(self, start_server) -> None:
        """/status took paused types from its stats sample, so a pause showed there up to a
        sample late while `conveyor stats`, GetStatus and the dashboard showed it at once.
        With a sample an hour apart, a pause and a resume show at once all the same."""
        server = start_server(stats_interval=timedelta(hours=1))
        url = f"{server.http_url}/status"

        def paused_in_status() -> tuple[list[str], dict[str, bool]]:
            code, document = get_json(url)
            assert code == 200, document
            by_type = document["queue"]["by_type"]
            return document["paused_types"], {name: row["paused"] for name, row in by_type.items()}

        with Client(server.address) as client:
            assert paused_in_status() == ([], {})
            assert client.pause_type("op.status.pause") is True
            assert paused_in_status() == (["op.status.pause"], {"op.status.pause": True})
            assert [item.type for item in client.get_status().paused_types] == ["op.status.pause"]
            assert client.resume_type("op.status.pause") is True
            assert paused_in_status() == ([], {})


# --- status and payloads ------------------------------------------------------------------

ST_A, ST_B, ST_GATE, ST_OK, ST_BAD = "st.a", "st.b", "st.gate", "st.ok", "st.bad"


class TestStatus:
    def test_status_counts_queues_workers_and_the_last_minute(self, server, client: Client) -> None:
        """GetStatus reports identity, leadership, live queues, workers and recent outcomes."""
        status = wait_for(
            lambda: (status := client.get_status()).leader_id is not None and status,
            timeout=15,
            what="a leader to be elected",
        )
        assert status.version == conveyor.__version__
        assert status.server_id == server.config.server_id
        assert status.leader_id == server.config.server_id
        assert status.is_leader is True
        assert status.leader_term >= 1
        assert status.paused_types == ()

        client.enqueue_tasks([Task(type=ST_A) for _ in range(4)])
        client.enqueue_tasks([Task(type=ST_B) for _ in range(2)])
        gate = threading.Event()
        started = threading.Event()

        def gated(ctx: TaskContext, payload: bytes) -> bytes:
            started.set()
            gate.wait(20)
            return b"opened"

        runs = Runs()
        outcome = fail_or_succeed(runs)
        worker = worker_for(server.address, {ST_GATE: gated, ST_OK: outcome, ST_BAD: outcome})
        try:
            with running(worker):
                gate_id = client.enqueue_task(Task(type=ST_GATE))
                wait_for(started.is_set, timeout=10, what="the gated handler to start")
                status = sampled_after(client, time.time())
                live = {
                    entry.type: (entry.queued, entry.running, entry.paused)
                    for entry in status.types
                }
                assert live == {
                    ST_A: (4, 0, False),
                    ST_B: (2, 0, False),
                    ST_GATE: (0, 1, False),
                }
                entry = type_entry(status, ST_A)
                assert entry is not None
                assert entry.oldest_queued_seconds > 0
                assert status.workers == {"active": 1}

                gate.set()
                finished = [gate_id]
                finished += client.enqueue_tasks(
                    [Task(type=ST_OK, payload=b"ok") for _ in range(3)]
                )
                finished += client.enqueue_tasks(
                    [Task(type=ST_BAD, payload=b"no") for _ in range(2)]
                )
                for task_id in finished:
                    wait_final(client, task_id)
                status = sampled_after(client, time.time())
                assert status.succeeded_last_minute == 4
                assert status.failed_last_minute == 2
                assert status.started_last_minute == 6
                assert status.retried_last_minute == 0
                assert {entry.type for entry in status.types} == {ST_A, ST_B}
        finally:
            gate.set()
        status = wait_for(
            lambda: (status := client.get_status()).workers == {"stopped": 1} and status,
            timeout=10,
            what="the stopped worker to be counted",
        )
        assert status.leader_id == server.config.server_id


class TestPayload:
    def test_the_payload_only_when_asked_for(self, client: Client) -> None:
        """get_task_status(payload=True) returns the exact bytes; otherwise payload is None."""
        body = bytes(range(256)) * 4
        task_id = client.enqueue_task(Task(type="pl.task", payload=body))
        assert client.get_task_status(task_id).payload is None
        assert client.get_task_status(task_id, history=True).payload is None
        with_payload = client.get_task_status(task_id, payload=True, history=True)
        assert with_payload.payload == body
        assert events(with_payload) == ["enqueued"]

        empty_id = client.enqueue_task(Task(type="pl.task"))
        assert client.get_task_status(empty_id, payload=True).payload == b""
        assert client.get_task_status(empty_id).payload is None
        with pytest.raises(TaskNotFound):
            client.get_task_status(UNKNOWN_ID, payload=True)


# --- the async client ---------------------------------------------------------------------


class TestAsyncClient:
    async def test_list_retry_cancel_pause_and_status(self, server) -> None:
        """AsyncClient's operator methods answer as the sync client's do."""
        task_type = "async.op"
        async with AsyncClient(server.address) as client:
            ids = await client.enqueue_tasks([Task(type=task_type) for _ in range(5)])
            cancelled = await client.cancel_tasks(ids[:3], reason="async cancel")
            assert cancelled == BulkResult(matched=3, changed=3, changed_ids=tuple(ids[:3]))

            page = await client.list_tasks(type=task_type, states="cancelled", limit=2)
            assert [task.id for task in page.tasks] == [ids[2], ids[1]]
            assert page.next_page_token is not None
            rest = await client.list_tasks(
                type=task_type, states="cancelled", limit=2, page_token=page.next_page_token
            )
            assert [task.id for task in rest.tasks] == [ids[0]]
            assert rest.next_page_token is None

            dry = await client.retry_tasks(type=task_type, dry_run=True)
            assert dry == BulkResult(matched=3, changed=0)
            retried = await client.retry_tasks(
                states=["cancelled"], type=task_type, reason="async retry"
            )
            assert retried == BulkResult(matched=3, changed=3)
            queued = await client.list_tasks(type=task_type, states="queued")
            listed = [task.id for task in queued.tasks]
            # The retried tasks moved to the back of the queue: newest first, they lead.
            assert set(listed[:3]) == set(ids[:3])
            assert listed[3:] == [ids[4], ids[3]]
            status = await client.get_task_status(ids[0], history=True)
            assert (status.history[-1].event, status.history[-1].detail) == (
                "retried",
                "async retry",
            )
            with pytest.raises(InvalidTask):
                await client.retry_tasks(states="running", type=task_type)

            assert await client.pause_type(task_type, reason="async pause") is True

            async def sampled() -> ClusterStatus | None:
                status = await client.get_status()
                entry = [item for item in status.types if item.type == task_type]
                return status if entry and entry[0].queued == 5 else None

            status = await async_wait_for(sampled, timeout=10, what="the sampler to count 5")
            assert [(item.type, item.reason) for item in status.paused_types] == [
                (task_type, "async pause")
            ]
            assert status.server_id == server.config.server_id
            assert await client.resume_type(task_type) is True
            assert (await client.get_status()).paused_types == ()


# --- hostile input ------------------------------------------------------------------------


class TestHostileInput:
    """Inputs PostgreSQL or Python would choke on come back as INVALID_ARGUMENT, not INTERNAL."""

    def test_a_reason_with_nul_is_invalid(self, client: Client, admin_stub) -> None:
        task_id = client.enqueue_task(Task(type="hostile.t"))
        with pytest.raises(InvalidTask, match="NUL"):
            client.cancel_tasks([task_id], reason="a\x00b")
        with pytest.raises(InvalidTask, match="NUL"):
            client.pause_type("hostile.t", reason="\x00")
        message = invalid_argument(
            admin_stub.RetryTasks,
            pb.BulkTaskRequest(filter=pb.TaskFilter(type="hostile.t"), reason="x\x00"),
        )
        assert "NUL" in message
        assert state_of(client, task_id) is TaskState.QUEUED
        assert client.get_status().paused_types == ()

    def test_a_page_token_of_thousands_of_digits_is_invalid(self, client: Client) -> None:
        with pytest.raises(InvalidTask, match="malformed page token"):
            client.list_tasks(page_token="9" * 5000)


class TestBulkWindows:
    def test_as_of_a_dry_run_covers_only_the_tasks_counted(self, client: Client) -> None:
        """Tasks that come to match after the count are left for another run."""
        counted = client.enqueue_tasks([Task(type="win.asof") for _ in range(4)])
        dry = client.cancel_tasks(type="win.asof", dry_run=True)
        assert dry.matched == 4
        assert dry.as_of is not None
        later = client.enqueue_tasks([Task(type="win.asof") for _ in range(3)])
        result = client.cancel_tasks(type="win.asof", as_of=dry.as_of)
        assert (result.matched, result.changed) == (4, 4)
        assert {state_of(client, task_id) for task_id in counted} == {TaskState.CANCELLED}
        assert {state_of(client, task_id) for task_id in later} == {TaskState.QUEUED}

    def test_a_call_resumes_after_its_cursor_and_stops_at_its_ceiling(
        self, client: Client, admin_stub, db
    ) -> None:
        """The wire form: after_seq and through_seq bound the walk; the reply says where
        it stopped, so a repeated call resumes there instead of starting over."""
        ids = client.enqueue_tasks([Task(type="win.raw") for _ in range(6)])
        seqs = [
            db.fetchval("SELECT seq FROM conveyor_tasks WHERE id = $1::uuid", task_id)
            for task_id in ids
        ]
        request = pb.BulkTaskRequest(
            filter=pb.TaskFilter(type="win.raw"), after_seq=seqs[1], through_seq=seqs[4]
        )
        response = admin_stub.CancelTasks(request, timeout=10)
        assert (response.changed, response.complete) == (3, True)
        assert response.next_after_seq == seqs[4]
        assert [state_of(client, task_id) for task_id in ids] == [
            TaskState.QUEUED,
            TaskState.QUEUED,
            TaskState.CANCELLED,
            TaskState.CANCELLED,
            TaskState.CANCELLED,
            TaskState.QUEUED,
        ]
        # The same call again (a lost reply, retried) changes nothing more.
        assert admin_stub.CancelTasks(request, timeout=10).changed == 0

    def test_malformed_as_of_is_invalid(self, client: Client) -> None:
        with pytest.raises(InvalidTask, match="as_of"):
            client.retry_tasks(type="win.asof", as_of="yesterday")
        with pytest.raises(InvalidTask, match="as_of"):
            client.retry_tasks(["0190b5d2-0000-7000-8000-000000000001"], as_of="12")
