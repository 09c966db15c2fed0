"""Every server leases to a worker, and sweeps it, by the pace it registered with.

A server tells a registering worker its own lease length and heartbeat interval. When the
servers' settings differ, as they do in the middle of a rolling restart that changes them,
a worker told a long lease by one server used to get short leases from the others (they
expired before its first beat), and the leader swept it as lost by its own shorter
silence allowance (tests/faults/test_rolling_config.py runs that end to end). Migration
0016 keeps both with the worker's row.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.duration_pb2 import Duration
from helpers import wait_for
from long_polls import claims

from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import ServerThread

SHORT = timedelta(seconds=4)  # the server the worker did not register with
LONG = timedelta(seconds=40)  # the one it did
TYPE = "pace.t"
# The settings of the server the worker registers with: a long lease, slow beats.
PATIENT: dict[str, Any] = {
    "lease_ttl": LONG,
    "heartbeat_interval": timedelta(seconds=10),
    "worker_lost_after": timedelta(seconds=50),
}


def stubs(address: str) -> tuple[Any, Any, grpc.Channel]:
    channel = grpc.insecure_channel(address)
    return pb_grpc.WorkerServiceStub(channel), pb_grpc.TaskServiceStub(channel), channel


def enqueue(tasks: Any) -> str:
    task_id = str(uuid.uuid4())
    tasks.EnqueueTasks(
        pb.EnqueueTasksRequest(
            tasks=[pb.TaskSpec(id=task_id, type=TYPE, timeout=Duration(seconds=600))]
        ),
        timeout=10,
    )
    return task_id


def lease_left(db: Any, task_id: str) -> timedelta:
    left: timedelta = db.fetchval(
        "SELECT lease_expires_at - now() FROM conveyor_tasks WHERE id = $1", task_id
    )
    return left


def test_a_lease_is_as_long_as_the_worker_registered_with(
    start_server: Callable[..., ServerThread], db: Any
) -> None:
    short = start_server(lease_ttl=SHORT, heartbeat_interval=timedelta(seconds=1))
    long = start_server(**PATIENT)
    at_long, _, long_channel = stubs(long.address)
    at_short, tasks, short_channel = stubs(short.address)
    try:
        registered = at_long.RegisterWorker(
            pb.RegisterWorkerRequest(worker_id="w-paced", task_types=[TYPE], concurrency=4),
            timeout=10,
        )
        assert registered.lease_duration.ToTimedelta() == LONG
        # Claimed on the other server.
        claimed_id = enqueue(tasks)
        leased = at_short.LeaseTasks(
            pb.LeaseTasksRequest(worker_id="w-paced", task_types=[TYPE], max_tasks=1),
            timeout=10,
        )
        assert [lease.task_id for lease in leased.leases] == [claimed_id]
        assert lease_left(db, claimed_id) > LONG - timedelta(seconds=5)
        # Renewed there: still the long lease, not the server's short one.
        beat = at_short.Heartbeat(
            pb.HeartbeatRequest(
                worker_id="w-paced",
                leases=[pb.LeaseRef(task_id=claimed_id, lease_id=leased.leases[0].lease_id)],
            ),
            timeout=10,
        )
        assert not beat.stop
        assert lease_left(db, claimed_id) > LONG - timedelta(seconds=5)
        # Handed over by an enqueue to the worker's waiting poll on the other server.
        poll = at_short.LeaseTasks.future(
            pb.LeaseTasksRequest(
                worker_id="w-paced", task_types=[TYPE], max_tasks=1, wait=Duration(seconds=20)
            ),
            timeout=30,
        )
        wait_for(lambda: claims(short.http_url).get("empty", 0) >= 1, what="the poll to wait")
        handed_id = enqueue(tasks)
        handed = poll.result(timeout=30)
        assert [lease.task_id for lease in handed.leases] == [handed_id]
        assert lease_left(db, handed_id) > LONG - timedelta(seconds=5)
    finally:
        long_channel.close()
        short_channel.close()


def silence(db: Any, worker_id: str, seconds: int) -> None:
    db.execute(
        "UPDATE conveyor_workers SET last_heartbeat_at = now() - make_interval(secs => $2) "
        "WHERE id = $1",
        worker_id,
        seconds,
    )


def state(db: Any, worker_id: str) -> str:
    found: str = db.fetchval("SELECT state FROM conveyor_workers WHERE id = $1", worker_id)
    return found


def test_the_leader_waits_for_the_silence_the_workers_server_allows(
    start_server: Callable[..., ServerThread], db: Any
) -> None:
    # The leader allows 2 s of silence; the slow-beating worker's server, 50.
    leader = start_server(
        lease_ttl=SHORT,
        heartbeat_interval=timedelta(seconds=0.5),
        worker_lost_after=timedelta(seconds=2),
    )
    wait_for(lambda: leader.server is not None and leader.server.elector.is_leader, what="a leader")
    patient = start_server(**PATIENT)
    at_patient, _, patient_channel = stubs(patient.address)
    at_leader, _, leader_channel = stubs(leader.address)
    try:
        for stub, worker_id in ((at_patient, "w-slow-beat"), (at_leader, "w-quick-beat")):
            stub.RegisterWorker(
                pb.RegisterWorkerRequest(worker_id=worker_id, task_types=[TYPE], concurrency=1),
                timeout=10,
            )
        # Both silent for 10 s: past the leader's own 2 s, within the slow one's 50. The
        # sweep that takes the quick one (one statement for all) leaves the slow one.
        for worker_id in ("w-slow-beat", "w-quick-beat"):
            silence(db, worker_id, 10)
        wait_for(lambda: state(db, "w-quick-beat") == "lost", what="a sweep after the silence")
        assert state(db, "w-slow-beat") == "active"
        # Past its own server's allowance, it is lost too, once the leader has reached the
        # database for that long (silence counts only then): a minute, as far as the
        # leader's own account of it goes, rather than a minute of this test.
        database = leader.server.database
        assert database._unreachable_at is not None
        database._unreachable_at -= 60
        silence(db, "w-slow-beat", 51)
        wait_for(lambda: state(db, "w-slow-beat") == "lost", what="the worker to be swept")
    finally:
        patient_channel.close()
        leader_channel.close()
