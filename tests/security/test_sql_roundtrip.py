"""SQL is parameterised: hostile text and bytes round-trip through every statement unchanged.

Issue 6, "Hostile input, tested". If any statement spliced a value into its SQL text, a
quote, a backslash, a `$1`, a `--` or a `'; DROP TABLE conveyor_tasks; --` would change
what it does: it would fail (INTERNAL), store something else, or drop a table. Here such
values go through the whole life of a task over the wire, against one real server per
module, and each must come back exactly as sent, from the API and from the database:

- type names made of every character a type may have (`[A-Za-z0-9_.:-]`, so `--` and `::`
  too), through enqueue, get, lease, ListTasks and bulk actions filtered by type, and
  PauseType / GetStatus;
- payloads and results full of quotes, backslashes, SQL, NUL bytes and invalid UTF-8;
- error messages, heartbeat progress, trace context, worker ids, hosts and versions, and
  operator reasons (retry, cancel, pause) full of the same, and of unicode (worker ids,
  hosts and versions without control or format characters, which the server refuses).

Text columns cannot hold NUL: the server writes it as the four characters `\\x00` in
errors and progress, and refuses it elsewhere (`test_nul_in_text_is_cleaned_or_refused`).
After everything, every table is still there.
"""

from __future__ import annotations

import string
import uuid
from dataclasses import dataclass, field, replace
from itertools import count
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import wait_for
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conveyor.protocol.v1 import conveyor_pb2 as pb
from tests.security.conftest import LiveDb, Stubs

SQL_INJECTION = "'; DROP TABLE conveyor_tasks; --"
FRAGMENTS = [
    SQL_INJECTION,
    "' OR '1'='1",
    '"; DROP TABLE conveyor_task_events; --',
    "$1",
    "$2::text",
    "%s",
    "%(x)s",
    "{0}",
    "\\",
    "\\\\'",
    "E'\\x00'",
    "''",
    "`",
    "/* */",
    "-- ",
    ";",
    "\\x00",
    "é漢字🙂",
    "\u202e\u200b",
]
TABLES = [
    "conveyor_tasks",
    "conveyor_task_events",
    "conveyor_workers",
    "conveyor_paused_types",
    "conveyor_leader",
    "conveyor_leader_terms",
    "conveyor_schema_migrations",
]
TYPE_CHARACTERS = string.ascii_letters + string.digits + "_.:-"
EVERY_TYPE_CHARACTER = TYPE_CHARACTERS + "--::"

ROUNDTRIP = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Text without NUL (PostgreSQL text cannot hold it; see the test at the end).
hostile_text = st.one_of(
    st.sampled_from(FRAGMENTS),
    st.lists(st.sampled_from(FRAGMENTS), min_size=2, max_size=5).map("".join),
    st.text(
        alphabet=st.one_of(
            st.sampled_from("'\"\\$%;-/*`{}()"),
            st.characters(exclude_characters="\x00", exclude_categories=["Cs"]),
        ),
        min_size=1,
        max_size=60,
    ),
)
# Operator reasons are stored stripped: send them without surrounding whitespace.
reasons = hostile_text.filter(lambda text: text.strip() == text != "")
hostile_bytes = st.one_of(
    st.sampled_from([fragment.encode() for fragment in FRAGMENTS]),
    st.sampled_from([b"\x00", b"\x00\x00'\x00", b"\xff\xfe\x00", b"\\x00", b"\\\\x00\\"]),
    st.binary(min_size=0, max_size=64),
).map(lambda data: data + b"\x00" + SQL_INJECTION.encode())
type_names = st.one_of(
    st.sampled_from([EVERY_TYPE_CHARACTER, "--", "::", "a--b", "x::text", "-.-:_"]),
    st.text(alphabet=TYPE_CHARACTERS, min_size=1, max_size=119),
)
# A worker's id, host and version may hold no control or format character (the server
# refuses them: they forge log lines and rewrite terminals); every other one round-trips.
UNPRINTABLE = ["Cs", "Cc", "Cf", "Zl", "Zp"]
printable_text = st.one_of(
    st.sampled_from([f for f in FRAGMENTS if f.isprintable()]),
    st.text(
        alphabet=st.one_of(
            st.sampled_from("'\"\\$%;-/*`{}()"),
            st.characters(exclude_categories=UNPRINTABLE),
        ),
        min_size=1,
        max_size=60,
    ),
)
worker_ids = printable_text.filter(lambda text: len(text) <= 200)
trace_contexts = st.dictionaries(
    hostile_text.filter(lambda key: len(key) <= 64),
    hostile_text.filter(lambda value: len(value) <= 512),
    max_size=3,
)
serial = count()


def unique_type(base: str) -> str:
    """`base` made unique for this example, still of type characters and at most 128."""
    return f"{base[:119]}.{next(serial):08d}"


def task_row(db: LiveDb, task_id: str) -> Any:
    return db.fetch(
        "SELECT type, payload, result, last_error, progress, worker_id, state::text AS state,"
        " trace_context::text AS trace FROM conveyor_tasks WHERE id = $1::uuid",
        task_id,
    )[0]


def history(stubs: Stubs, task_id: str) -> list[pb.TaskEvent]:
    task = stubs.tasks.GetTask(
        pb.GetTaskRequest(task_id=task_id, include_history=True), timeout=10
    ).task
    return list(task.history)


def lease_one(stubs: Stubs, worker_id: str, task_type: str) -> pb.Lease:
    """Lease the one queued task of `task_type` (waiting out a retry's backoff if any)."""
    request = pb.LeaseTasksRequest(worker_id=worker_id, task_types=[task_type], max_tasks=2)
    leases = wait_for(
        lambda: list(stubs.workers.LeaseTasks(request, timeout=10).leases),
        timeout=10,
        what=f"a task of {task_type!r} to lease",
    )
    assert len(leases) == 1
    return leases[0]


def assert_tables_exist(db: LiveDb) -> None:
    present = db.fetch(
        "SELECT name FROM unnest($1::text[]) AS name WHERE to_regclass(name) IS NOT NULL",
        TABLES,
    )
    assert sorted(row["name"] for row in present) == sorted(TABLES)


@dataclass(frozen=True)
class Values:
    """One example's hostile values, and the ids of its two tasks."""

    task_type: str
    payload: bytes
    result: bytes
    error: str
    progress: str
    reason: str
    worker_id: str
    trace: dict[str, str]
    host: str
    version: str
    task_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    other_id: str = field(default_factory=lambda: str(uuid.uuid4()))


values = st.builds(
    Values,
    task_type=type_names,
    payload=hostile_bytes,
    result=hostile_bytes,
    error=hostile_text,
    progress=hostile_text,
    reason=reasons,
    worker_id=worker_ids,
    trace=trace_contexts,
    host=printable_text,
    version=printable_text.filter(lambda text: len(text) <= 64),
)


def register_and_list(stubs: Stubs, v: Values) -> None:
    stubs.workers.RegisterWorker(
        pb.RegisterWorkerRequest(
            worker_id=v.worker_id,
            host=v.host,
            version=v.version,
            task_types=[v.task_type],
            concurrency=1,
            pid=1,
        ),
        timeout=10,
    )
    listed = stubs.admin.ListWorkers(pb.ListWorkersRequest(limit=10_000), timeout=10)
    (worker,) = [info for info in listed.workers if info.id == v.worker_id]
    assert (worker.host, worker.version, list(worker.task_types)) == (
        v.host or "unknown",
        v.version or "unknown",
        [v.task_type],
    )


def enqueue_and_get(stubs: Stubs, db: LiveDb, v: Values) -> None:
    spec = pb.TaskSpec(
        id=v.task_id,
        type=v.task_type,
        payload=v.payload,
        timeout=Duration(seconds=600),
        trace_context=v.trace,
    )
    answer = stubs.tasks.EnqueueTasks(pb.EnqueueTasksRequest(tasks=[spec]), timeout=10)
    assert list(answer.created) == [True]
    got = stubs.tasks.GetTask(
        pb.GetTaskRequest(task_id=v.task_id, include_payload=True), timeout=10
    ).task
    assert (got.type, got.payload) == (v.task_type, v.payload)
    row = task_row(db, v.task_id)
    assert (row["type"], row["payload"]) == (v.task_type, v.payload)


def lease_heartbeat_and_fail(stubs: Stubs, db: LiveDb, v: Values) -> None:
    lease = lease_one(stubs, v.worker_id, v.task_type)
    assert (lease.task_id, lease.type, lease.payload) == (v.task_id, v.task_type, v.payload)
    assert dict(lease.trace_context) == v.trace
    ref = pb.LeaseRef(
        task_id=v.task_id, lease_id=lease.lease_id, progress=v.progress, has_progress=True
    )
    beat = stubs.workers.Heartbeat(
        pb.HeartbeatRequest(worker_id=v.worker_id, leases=[ref]), timeout=10
    )
    assert list(beat.stop) == []
    got = stubs.tasks.GetTask(pb.GetTaskRequest(task_id=v.task_id), timeout=10).task
    assert (got.progress, got.worker_id) == (v.progress, v.worker_id)
    failed = stubs.workers.ReportResult(
        pb.ReportResultRequest(
            worker_id=v.worker_id,
            task_id=v.task_id,
            lease_id=lease.lease_id,
            outcome=pb.OUTCOME_FAILED,
            error=v.error,
            non_retryable=True,
        ),
        timeout=10,
    )
    assert failed.state == pb.TASK_STATE_FAILED
    got = stubs.tasks.GetTask(pb.GetTaskRequest(task_id=v.task_id), timeout=10).task
    assert got.last_error == v.error
    assert task_row(db, v.task_id)["last_error"] == v.error
    event = history(stubs, v.task_id)[-1]
    assert (event.event, event.detail, event.worker_id) == ("failed", v.error, v.worker_id)


def retry_and_succeed(stubs: Stubs, db: LiveDb, v: Values) -> None:
    retried = stubs.admin.RetryTasks(
        pb.BulkTaskRequest(task_ids=[v.task_id], reason=v.reason), timeout=10
    )
    assert list(retried.changed_ids) == [v.task_id]
    event = history(stubs, v.task_id)[-1]
    assert (event.event, event.detail) == ("retried", v.reason)
    lease = lease_one(stubs, v.worker_id, v.task_type)
    report = pb.ReportResultRequest(
        worker_id=v.worker_id,
        task_id=v.task_id,
        lease_id=lease.lease_id,
        outcome=pb.OUTCOME_SUCCEEDED,
        result=v.result,
        has_result=True,
    )
    done = stubs.workers.ReportResults(
        pb.ReportResultsRequest(worker_id=v.worker_id, reports=[report]), timeout=10
    )
    assert [outcome.code for outcome in done.outcomes] == [0]
    got = stubs.tasks.GetTask(pb.GetTaskRequest(task_id=v.task_id), timeout=10).task
    assert (got.state, got.result, got.has_result) == (pb.TASK_STATE_SUCCEEDED, v.result, True)
    row = task_row(db, v.task_id)
    assert (row["result"], row["state"], row["worker_id"]) == (v.result, "succeeded", v.worker_id)


def filter_by_type(stubs: Stubs, v: Values) -> None:
    """The type as a filter: listing, a bulk cancel, pause and resume."""
    stubs.tasks.EnqueueTasks(
        pb.EnqueueTasksRequest(
            tasks=[pb.TaskSpec(id=v.other_id, type=v.task_type, timeout=Duration(seconds=60))]
        ),
        timeout=10,
    )
    page = stubs.admin.ListTasks(
        pb.ListTasksRequest(filter=pb.TaskFilter(type=v.task_type)), timeout=10
    )
    assert [(task.id, task.type) for task in page.tasks] == [
        (v.other_id, v.task_type),
        (v.task_id, v.task_type),
    ]
    cancelled = stubs.admin.CancelTasks(
        pb.BulkTaskRequest(filter=pb.TaskFilter(type=v.task_type), reason=v.reason), timeout=10
    )
    assert (cancelled.changed, cancelled.complete) == (1, True)
    event = history(stubs, v.other_id)[-1]
    assert (event.event, event.detail) == ("cancelled", v.reason)
    paused = stubs.admin.PauseType(
        pb.PauseTypeRequest(type=v.task_type, reason=v.reason), timeout=10
    )
    assert paused.changed
    status = stubs.admin.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert [(item.type, item.reason) for item in status.paused_types] == [(v.task_type, v.reason)]
    assert stubs.admin.ResumeType(pb.ResumeTypeRequest(type=v.task_type), timeout=10).changed


def test_hostile_values_round_trip(stubs: Stubs, security_db: LiveDb) -> None:
    enqueued: list[str] = []

    @ROUNDTRIP
    @given(base=values)
    @example(
        base=Values(
            task_type=EVERY_TYPE_CHARACTER,
            payload=SQL_INJECTION.encode() + b"\x00$1\\",
            result=b"\x00'; DROP TABLE conveyor_task_events; --",
            error=SQL_INJECTION,
            progress="$1 $2 '\\''",
            reason=SQL_INJECTION,
            worker_id="w'; DROP TABLE conveyor_workers; --",
            trace={"traceparent": SQL_INJECTION, "'\"\\": "$1"},
            host="h'--",
            version="v$1",
        )
    )
    def roundtrip(base: Values) -> None:
        v = replace(base, task_type=unique_type(base.task_type))
        register_and_list(stubs, v)
        enqueue_and_get(stubs, security_db, v)
        enqueued.append(v.task_id)
        lease_heartbeat_and_fail(stubs, security_db, v)
        retry_and_succeed(stubs, security_db, v)
        filter_by_type(stubs, v)
        enqueued.append(v.other_id)

    roundtrip()
    assert_tables_exist(security_db)
    # Nothing was lost or added on the way: the tasks are exactly those enqueued.
    stored = security_db.fetch(
        "SELECT id::text AS id FROM conveyor_tasks WHERE id = ANY($1::uuid[])", enqueued
    )
    assert sorted(row["id"] for row in stored) == sorted(enqueued)


def test_nul_in_text_is_cleaned_or_refused(stubs: Stubs, security_db: LiveDb) -> None:
    task_type = unique_type("nul")
    worker_id = f"nul-{uuid.uuid4().hex[:8]}"
    task_id = str(uuid.uuid4())
    refused = [
        (
            stubs.tasks.EnqueueTasks,
            pb.EnqueueTasksRequest(
                tasks=[pb.TaskSpec(id=task_id, type="a\x00", timeout=Duration(seconds=60))]
            ),
        ),
        (
            stubs.tasks.EnqueueTasks,
            pb.EnqueueTasksRequest(
                tasks=[
                    pb.TaskSpec(
                        id=task_id,
                        type=task_type,
                        timeout=Duration(seconds=60),
                        trace_context={"k": "v\x00"},
                    )
                ]
            ),
        ),
        (
            stubs.workers.RegisterWorker,
            pb.RegisterWorkerRequest(worker_id="w\x00", task_types=[task_type], concurrency=1),
        ),
        (stubs.admin.PauseType, pb.PauseTypeRequest(type=task_type, reason="r\x00")),
        (stubs.admin.ListTasks, pb.ListTasksRequest(filter=pb.TaskFilter(type="\x00"))),
    ]
    for method, request in refused:
        with pytest.raises(grpc.RpcError) as refusal:
            method(request, timeout=10)
        assert refusal.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request

    stubs.tasks.EnqueueTasks(
        pb.EnqueueTasksRequest(
            tasks=[pb.TaskSpec(id=task_id, type=task_type, timeout=Duration(seconds=60))]
        ),
        timeout=10,
    )
    lease = lease_one(stubs, worker_id, task_type)
    stubs.workers.Heartbeat(
        pb.HeartbeatRequest(
            worker_id=worker_id,
            leases=[
                pb.LeaseRef(
                    task_id=task_id, lease_id=lease.lease_id, progress="p\x00'", has_progress=True
                )
            ],
        ),
        timeout=10,
    )
    stubs.workers.ReportResult(
        pb.ReportResultRequest(
            worker_id=worker_id,
            task_id=task_id,
            lease_id=lease.lease_id,
            outcome=pb.OUTCOME_FAILED,
            error="e\x00'; --",
            non_retryable=True,
        ),
        timeout=10,
    )
    row = task_row(security_db, task_id)
    assert (row["progress"], row["last_error"]) == ("p\\x00'", "e\\x00'; --")
    assert_tables_exist(security_db)
