"""The Work stream: leases as the worker grants room, outcomes answered on the same stream.

Real server, real PostgreSQL, a raw bidirectional gRPC stream driven from the test (as
test_handoff.py drives raw long polls). What must hold: never more leases than granted;
every batch of outcomes answered with its number and one fenced outcome per report; the
stream ends OK when the worker half-closes or the server stops, leasing nothing after; bad
input ends it with INVALID_ARGUMENT; a server with streams off answers UNIMPLEMENTED, and a
real worker then long-polls and still finishes its tasks.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import metric_by_label, wait_for
from work_streams import ENDED, RawStream

from conveyor import Client, Task, TaskState, Worker
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.server.handoff import POLL_ENDED
from conveyor.server.work_stream import STREAM_ENDED


def stubs_on(server: Any, options: list[tuple[str, Any]] | None = None) -> Iterator[Any]:
    """The task and worker stubs on one channel to `server`, closed after the test."""
    channel = grpc.insecure_channel(server.address, options=options)
    yield pb_grpc.TaskServiceStub(channel), pb_grpc.WorkerServiceStub(channel)
    channel.close()


@pytest.fixture
def stubs(server):
    yield from stubs_on(server)


def register(workers: pb_grpc.WorkerServiceStub, task_type: str) -> str:
    worker_id = f"stream-test-{uuid.uuid4().hex[:8]}"
    workers.RegisterWorker(
        pb.RegisterWorkerRequest(
            worker_id=worker_id, host="h", pid=1, task_types=[task_type], concurrency=4
        ),
        timeout=10,
    )
    return worker_id


def enqueue(tasks: pb_grpc.TaskServiceStub, task_type: str, count: int) -> list[str]:
    specs = [
        pb.TaskSpec(id=str(uuid.uuid4()), type=task_type, timeout=Duration(seconds=60))
        for _ in range(count)
    ]
    tasks.EnqueueTasks(pb.EnqueueTasksRequest(tasks=specs), timeout=10)
    return [spec.id for spec in specs]


def opened(workers: pb_grpc.WorkerServiceStub, worker_id: str, task_type: str, grant: int):
    """A stream past its empty first answer (the server accepted it)."""
    stream = RawStream(workers)
    stream.send(worker_id=worker_id, task_types=[task_type], grant=grant)
    accepted = stream.take()
    assert isinstance(accepted, pb.WorkResponse), accepted
    assert accepted == pb.WorkResponse()
    return stream


def leases_until(stream: RawStream, count: int) -> list[pb.Lease]:
    leases: list[pb.Lease] = []
    while len(leases) < count:
        response = stream.take()
        assert isinstance(response, pb.WorkResponse), response
        assert not response.reports_id
        leases.extend(response.leases)
    return leases


def success(worker_id: str, lease: pb.Lease, lease_id: str | None = None) -> Any:
    return pb.ReportResultRequest(
        worker_id=worker_id,
        task_id=lease.task_id,
        lease_id=lease_id or lease.lease_id,
        outcome=pb.OUTCOME_SUCCEEDED,
        result=b"done",
        has_result=True,
    )


class TestLeasing:
    def test_leases_never_exceed_the_room_granted(self, stubs, db):
        tasks, workers = stubs
        worker_id = register(workers, "ws.grant")
        ids = enqueue(tasks, "ws.grant", 5)
        stream = opened(workers, worker_id, "ws.grant", grant=2)
        try:
            first = leases_until(stream, 2)
            assert [lease.task_id for lease in first] == ids[:2]  # FIFO
            assert stream.nothing_within(0.5)  # three more queued, no room for them
            assert [db.task(task_id)["state"] for task_id in ids[2:]] == ["queued"] * 3
            stream.send(grant=3)
            rest = leases_until(stream, 3)
            assert [lease.task_id for lease in rest] == ids[2:]
            assert all(lease.lease_id and lease.type == "ws.grant" for lease in first + rest)
        finally:
            stream.close()

    def test_a_task_enqueued_later_reaches_the_waiting_stream(self, stubs, db):
        tasks, workers = stubs
        worker_id = register(workers, "ws.later")
        stream = opened(workers, worker_id, "ws.later", grant=1)
        try:
            assert stream.nothing_within(0.3)
            (task_id,) = enqueue(tasks, "ws.later", 1)
            (lease,) = leases_until(stream, 1)
            assert lease.task_id == task_id
            row = db.task(task_id)
            assert row["state"] == "running"
            assert row["worker_id"] == worker_id
        finally:
            stream.close()


# A lease message larger than the test channel's HTTP/2 window: with BDP probing off the
# window stays at its initial 64 KiB, so the server's write of this lease stays in flight
# until the test reads (and the server's default payload limit, 1 MiB, allows it).
HELD_PAYLOAD = b"x" * (900 * 1024)


@pytest.fixture
def narrow_stubs(server):
    yield from stubs_on(server, [("grpc.http2.bdp_probe", 0)])


def held_in_a_write(
    server: Any, stubs: Any, task_type: str, grant: int
) -> tuple[RawStream, str, str]:
    """A stream whose server is writing it a large lease the test does not read yet.

    Returns the stream, its worker and the large task. The claim is counted in the same
    turn of the server's event loop that puts the stream's remaining room on offer and
    schedules the write, so any enqueue the server takes after the count finds that offer.
    """
    tasks, workers = stubs
    worker_id = register(workers, task_type)
    large = pb.TaskSpec(
        id=str(uuid.uuid4()), type=task_type, payload=HELD_PAYLOAD, timeout=Duration(seconds=60)
    )
    tasks.EnqueueTasks(pb.EnqueueTasksRequest(tasks=[large]), timeout=10)
    stream = RawStream(workers, reading=False)
    stream.send(worker_id=worker_id, task_types=[task_type], grant=grant)
    wait_for(lambda: claims(server.http_url).get("tasks") == 1, what="the large task's claim")
    return stream, worker_id, large.id


def claims(http_url: str) -> dict[str, float]:
    return metric_by_label(http_url, "conveyor_lease_claims_total", "result")


class TestOfferingWhileWriting:
    """While a lease message is written, the stream's remaining room waits at the handoff
    desk as a long poll's does: a task enqueued meanwhile is leased by its own insert, not
    queued for a claim after the write (a fifth of the tasks at 1,000/s were)."""

    @pytest.fixture
    def server(self, start_server):
        # The held write never finishes: a stop waits out all of its grace.
        return start_server(shutdown_grace=timedelta(milliseconds=500))

    def test_a_task_enqueued_during_a_write_is_handed_over_within_the_room(
        self, server, narrow_stubs, db
    ):
        stream, worker_id, large = held_in_a_write(server, narrow_stubs, "ws.writing", grant=2)
        try:
            handed, queued = enqueue(narrow_stubs[0], "ws.writing", 2)
            # One task of room was left: the first task is leased in its insert, the second
            # is queued.
            assert db.task(handed)["state"] == "running"
            assert db.task(handed)["worker_id"] == worker_id
            assert db.task(queued)["state"] == "queued"
            stream.start_reading()
            assert stream.take() == pb.WorkResponse()  # the stream accepted
            assert [lease.task_id for lease in leases_until(stream, 2)] == [large, handed]
            assert stream.nothing_within(0.3)
            assert db.task(queued)["state"] == "queued"
            assert claims(server.http_url).get("handed_over") == 1
        finally:
            stream.close()

    def test_a_stream_ending_during_the_write_hands_back_what_its_offer_got(
        self, server, narrow_stubs, db
    ):
        stream, worker_id, large = held_in_a_write(server, narrow_stubs, "ws.gone", grant=2)
        try:
            (handed,) = enqueue(narrow_stubs[0], "ws.gone", 1)
            assert db.task(handed)["worker_id"] == worker_id
        finally:
            stream.close()
        for task_id in (large, handed):
            wait_for(lambda t=task_id: db.task(t)["state"] == "queued", what="the hand-back")
        assert_handed_back(db, worker_id, large, handed)

    def test_a_server_stopping_during_the_write_hands_back_what_its_offer_got(
        self, server, narrow_stubs, db
    ):
        """The stop cancels the held stream when its grace runs out, and gRPC's stop returns
        before the stream has unwound: the server must wait for that before it waits for
        the hand-backs and closes its pool. It did not, and the handed-over lease was left
        to expire in about half the runs."""
        stream, worker_id, large = held_in_a_write(server, narrow_stubs, "ws.stop", grant=2)
        try:
            (handed,) = enqueue(narrow_stubs[0], "ws.stop", 1)
            assert db.task(handed)["worker_id"] == worker_id
            server.stop()
        finally:
            stream.close()
        assert_handed_back(db, worker_id, large, handed)


def assert_handed_back(db: Any, worker_id: str, large: str, handed: str) -> None:
    """Neither lease reached the worker: both tasks are queued again, each with why, and
    no attempt is spent."""
    for task_id, reason in ((large, STREAM_ENDED), (handed, POLL_ENDED)):
        assert db.task(task_id)["state"] == "queued"
        assert db.task(task_id)["attempt"] == 0
        events = [(e["event"], e["worker_id"], e["detail"]) for e in db.events(task_id)]
        assert events == [
            ("enqueued", None, None),
            ("started", worker_id, None),
            ("released", worker_id, reason),
        ]


class TestReports:
    def test_each_batch_is_answered_with_its_number_and_fenced(self, stubs, db):
        tasks, workers = stubs
        worker_id = register(workers, "ws.report")
        ids = enqueue(tasks, "ws.report", 2)
        stream = opened(workers, worker_id, "ws.report", grant=2)
        try:
            first, second = leases_until(stream, 2)
            stale = str(uuid.uuid4())
            stream.send(
                reports=[success(worker_id, first), success(worker_id, second, lease_id=stale)],
                reports_id=7,
            )
            answer = stream.take()
            assert answer.reports_id == 7
            assert not answer.leases
            applied, refused = answer.outcomes
            assert applied.code == grpc.StatusCode.OK.value[0]
            assert applied.state == pb.TASK_STATE_SUCCEEDED
            assert refused.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
            assert "no longer current" in refused.message
            assert db.task(ids[0])["state"] == "succeeded"
            assert bytes(db.task(ids[0])["result"]) == b"done"
            assert db.task(ids[1])["state"] == "running"  # the stale report changed nothing
        finally:
            stream.close()

    def test_a_report_may_carry_room_for_the_next_lease(self, stubs):
        tasks, workers = stubs
        worker_id = register(workers, "ws.carry")
        ids = enqueue(tasks, "ws.carry", 2)
        stream = opened(workers, worker_id, "ws.carry", grant=1)
        try:
            (first,) = leases_until(stream, 1)
            stream.send(reports=[success(worker_id, first)], reports_id=1, grant=1)
            responses = [stream.take(), stream.take()]  # the answer and the next lease
            answers = [r for r in responses if r.reports_id]
            leases = [lease for r in responses for lease in r.leases]
            assert [a.reports_id for a in answers] == [1]
            assert [lease.task_id for lease in leases] == [ids[1]]
        finally:
            stream.close()


class TestEnding:
    def test_half_close_ends_the_stream_ok_and_leases_nothing_after(self, stubs, db):
        tasks, workers = stubs
        worker_id = register(workers, "ws.leave")
        stream = opened(workers, worker_id, "ws.leave", grant=4)
        stream.half_close()
        assert stream.take() is ENDED
        (task_id,) = enqueue(tasks, "ws.leave", 1)
        # The granted room went with the stream: nothing leases the task.
        wait_for(lambda: db.task(task_id)["state"] == "queued", what="the task queued")
        assert db.task(task_id)["worker_id"] is None

    @pytest.mark.slow
    def test_leaving_while_leases_are_written_still_answers_every_batch(self, stubs):
        """A stream ended OK has answered every batch it received, even when the worker
        leaves while a lease message is being written: the write that the ending cancels
        must finish before the answers' writes, or grpc refuses them (it lost one answer
        in about 600 such streams). Timing decides each round, so it runs many."""
        tasks, workers = stubs
        unanswered = 0
        for _ in range(150):
            task_type = f"ws.race-{uuid.uuid4().hex[:6]}"
            worker_id = register(workers, task_type)
            enqueue(tasks, task_type, 40)
            stream = RawStream(workers)
            stream.send(worker_id=worker_id, task_types=[task_type], grant=20)
            forged = success(worker_id, pb.Lease(task_id=str(uuid.uuid4())), str(uuid.uuid4()))
            stream.send(reports=[forged], reports_id=5, grant=20)
            stream.half_close()
            answered = False
            while (response := stream.take()) is not ENDED:
                assert isinstance(response, pb.WorkResponse), response
                answered = answered or response.reports_id == 5
            unanswered += not answered
        assert unanswered == 0, f"{unanswered} streams ended OK with their batch unanswered"

    def test_a_stopping_server_ends_its_streams_ok(self, start_server):
        stopping = start_server()
        channel = grpc.insecure_channel(stopping.address)
        try:
            workers = pb_grpc.WorkerServiceStub(channel)
            worker_id = register(workers, "ws.stop")
            stream = opened(workers, worker_id, "ws.stop", grant=1)
            stopping.stop()
            assert stream.take() is ENDED
        finally:
            channel.close()


class TestRefusals:
    @pytest.mark.parametrize(
        ("first", "message"),
        [
            ({"task_types": ["ws.bad"], "grant": 1}, "worker_id"),
            ({"worker_id": "w", "grant": 1}, "at least one task type"),
        ],
        ids=["no worker id", "no task types"],
    )
    def test_a_bad_first_message_is_invalid_argument(self, stubs, first, message):
        _, workers = stubs
        stream = RawStream(workers)
        stream.send(**first)
        error = stream.take()
        assert isinstance(error, grpc.RpcError), error
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in error.details()

    def test_a_message_for_another_worker_is_invalid_argument(self, stubs):
        _, workers = stubs
        worker_id = register(workers, "ws.other")
        stream = opened(workers, worker_id, "ws.other", grant=1)
        stream.send(worker_id="someone-else", grant=1)
        error = stream.take()
        assert isinstance(error, grpc.RpcError), error
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "one worker" in error.details()

    def test_reports_without_a_number_are_invalid_argument(self, stubs):
        tasks, workers = stubs
        worker_id = register(workers, "ws.unnumbered")
        enqueue(tasks, "ws.unnumbered", 1)
        stream = opened(workers, worker_id, "ws.unnumbered", grant=1)
        (lease,) = leases_until(stream, 1)
        stream.send(reports=[success(worker_id, lease)])
        error = stream.take()
        assert isinstance(error, grpc.RpcError), error
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reports_id" in error.details()

    def test_an_absurd_grant_is_invalid_argument(self, stubs):
        _, workers = stubs
        worker_id = register(workers, "ws.greedy")
        stream = opened(workers, worker_id, "ws.greedy", grant=1)
        stream.send(grant=2**31)
        error = stream.take()
        assert isinstance(error, grpc.RpcError), error
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "granted" in error.details()


def stream_messages(http_url: str) -> dict[str, float]:
    return metric_by_label(http_url, "conveyor_work_stream_messages_total", "kind")


class TestARealWorker:
    def test_room_rides_on_the_reports(self, server):
        """One task at a time: a lease, a report carrying the freed room, an answer; no
        grant messages beyond the opening one."""
        worker = Worker(server.address, concurrency=4)
        worker.register_handler("ws.real", lambda _ctx, payload: payload)
        worker.start()
        try:
            with Client(server.address) as client:
                for n in range(20):
                    task_id = client.enqueue_task(Task(type="ws.real", payload=b"%d" % n))
                    wait_for(
                        lambda task_id=task_id: (
                            client.get_task_status(task_id).state is TaskState.SUCCEEDED
                        ),
                        what=f"task {n} to succeed",
                    )
            wait_for(
                lambda: stream_messages(server.http_url).get("answer", 0) >= 20,
                what="the last answer to be counted",
            )
            counted = stream_messages(server.http_url)
        finally:
            worker.stop()
        assert counted["leases"] == 20, counted
        assert counted["reports"] == 20, counted
        assert counted["answer"] == 20, counted
        assert counted["grant"] <= 2, counted  # the opening, and at most one race


class TestServersWithoutTheStream:
    def test_streams_off_answers_unimplemented(self, start_server):
        server = start_server(work_stream=False)
        channel = grpc.insecure_channel(server.address)
        try:
            workers = pb_grpc.WorkerServiceStub(channel)
            stream = RawStream(workers)
            stream.send(worker_id="w", task_types=["ws.off"], grant=1)
            error = stream.take()
            assert isinstance(error, grpc.RpcError), error
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED
            # Counted under its own code, not as a stream that served and ended OK (after
            # the status has gone out: wait for it).
            assert server.server is not None
            refused = server.server.metrics.long_rpc_duration.labels("Work", "UNIMPLEMENTED")
            wait_for(lambda: refused._sum.get() > 0, what="the refusal to be counted")
            served = server.server.metrics.long_rpc_duration.labels("Work", "OK")
            assert served._sum.get() == 0
        finally:
            channel.close()

    def test_a_worker_long_polls_a_server_without_it(self, start_server):
        server = start_server(work_stream=False)
        worker = Worker(server.address, concurrency=2)
        worker.register_handler("ws.fallback", lambda _ctx, payload: payload[::-1])
        worker.start()
        try:
            with Client(server.address) as client:
                ids = client.enqueue_tasks(
                    [Task(type="ws.fallback", payload=f"t{n}".encode()) for n in range(10)]
                )
                wait_for(
                    lambda: all(
                        client.get_task_status(task_id).state is TaskState.SUCCEEDED
                        for task_id in ids
                    ),
                    what="every task to succeed by long polls",
                )
                assert client.get_task_status(ids[3]).result == b"3t"
        finally:
            worker.stop()
