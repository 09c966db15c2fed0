"""Faulty worker links, through a FaultProxy (faults/proxy.py) between worker and server.

The partition scenario uses the quick settings (lease 4 s). The delay-and-loss scenario
keeps the DEFAULT lease (30 s), heartbeat interval (3 s) and worker-lost-after (15 s): it
checks that a slow, lossy link does not cause false rescues with the settings users run.
"""

from __future__ import annotations

import re
import time

import pytest
from faults.cluster import LEASE_TTL, QUICK_MAINTENANCE_ARGS, WORKER_LOST_AFTER
from helpers import RERUN_AFTER_LEASE_EXPIRED, wait_final, wait_for

from conveyor import Task, TaskState

SHORT_TASKS = 50
# Seeds whose third chunk stalls: the faults are still drawn at random chunk by chunk, but
# each link surely stalls at least once. Unseeded, a link that carries few chunks (one work
# stream carries a whole batch of leases and outcomes) could draw no stall at all in a run.
STALL_EARLY_SEEDS = (45, 159)


@pytest.mark.slow
def test_partition_worker_longer_than_its_lease(cluster):
    """Cut a worker off from the server for longer than its lease, then heal.

    The partitioned worker stops its handler by itself (no heartbeat got through for a whole
    lease: "its lease was lost"), the server marks it lost and another worker runs the task;
    after the heal, nothing it might still report is accepted: one 'succeeded', the other
    worker's.
    """
    server = cluster.server()
    link = cluster.proxy(server, name="link")
    cut_off = cluster.worker(link, concurrency=1, name="cut-off")
    cluster.wait_registered(cut_off)
    client = cluster.client(server)
    task_id = cluster.enqueue_one(client, Task(type="sleep", payload=b"8"))
    cluster.wait_starts(task_id)
    other = cluster.worker(server, concurrency=1, name="other")
    cluster.wait_registered(other)
    cut_off_id = cluster.worker_id(cut_off)

    partitioned_at = time.monotonic()
    link.partition("blackhole")
    try:
        rerun = cluster.wait_starts(task_id, 2, timeout=LEASE_TTL + 5)[1]
        assert int(rerun["pid"]) == other.pid
        cluster.record_recovery(time.monotonic() - partitioned_at)
        # The worker gives up on its own once a whole lease passed without a heartbeat
        # (each failed call takes up to its 1 s deadline, so a little later than that).
        wait_for(
            lambda: f"stopping task {task_id}: its lease was lost" in cut_off.output(),
            timeout=LEASE_TTL + 5,
            what="the partitioned worker to stop its handler",
        )
        # ... and not before: the worker counts from its last successful heartbeat, which
        # may precede the partition by up to an interval, so read its own account of the
        # silence rather than timing from the partition.
        before_stop = cut_off.output().split(f"stopping task {task_id}: its lease was lost")[0]
        silences = re.findall(r"heartbeat failed .*; silent for ([0-9.]+)s", before_stop)
        assert silences, before_stop
        assert float(silences[-1]) >= LEASE_TTL, silences
        assert cluster.db.fetchval(
            "SELECT state FROM conveyor_workers WHERE id = $1", cut_off_id
        ) == ("lost")
    finally:
        link.heal()

    status = wait_final(client, task_id, timeout=15)
    assert status.state is TaskState.SUCCEEDED
    assert [e.event for e in status.history] == RERUN_AFTER_LEASE_EXPIRED
    assert status.worker_id == cluster.worker_id(other)
    # The cut-off handler was stopped: it never finished, and reported nothing accepted.
    assert [int(r["pid"]) for r in cluster.ledger.finished()] == [other.pid]
    # Healed, the cut-off worker heartbeats again and is back in service.
    wait_for(
        lambda: (
            cluster.db.fetchval("SELECT state FROM conveyor_workers WHERE id = $1", cut_off_id)
            == "active"
        ),
        timeout=WORKER_LOST_AFTER + 10,
        what="the cut-off worker to be active again",
    )
    again = cluster.enqueue(client, [Task(type="noop") for _ in range(4)])
    assert {wait_final(client, t, timeout=10).state for t in again} == {TaskState.SUCCEEDED}


@pytest.mark.slow
def test_delay_and_loss_on_worker_links(cluster):
    """300 ms +- 200 ms per chunk and 5 % stalls on every worker link, default leases.

    50 short tasks all complete, with no false rescue: no 'lease_expired' event and no
    task executed twice.
    """
    server = cluster.server(quick=QUICK_MAINTENANCE_ARGS)
    links = [
        cluster.proxy(server, name=f"link{n}", seed=seed)
        for n, seed in enumerate(STALL_EARLY_SEEDS)
    ]
    for link in links:
        link.set_faults(delay=0.3, jitter=0.2, stall_probability=0.05)
    workers = [cluster.worker(link, concurrency=8) for link in links]
    cluster.wait_registered(*workers)
    client = cluster.client(server)

    began = time.monotonic()
    ids = cluster.enqueue(
        client, [Task(type="async_noop", payload=str(n).encode()) for n in range(SHORT_TASKS)]
    )
    wait_for(
        lambda: (
            cluster.db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE state = 'succeeded'")
            == SHORT_TASKS
        ),
        timeout=90,
        interval=0.2,
        what=f"{SHORT_TASKS} tasks to succeed",
    )
    cluster.notes.append(f"all {SHORT_TASKS} done in {time.monotonic() - began:.1f}s")

    events = cluster.db.fetch(
        "SELECT event, count(*) AS n FROM conveyor_task_history GROUP BY event ORDER BY event"
    )
    assert {row["event"]: row["n"] for row in events} == {
        "enqueued": SHORT_TASKS,
        "started": SHORT_TASKS,
        "succeeded": SHORT_TASKS,
    }
    started = cluster.ledger.started()
    assert sorted(r["task_id"] for r in started) == sorted(ids)
    assert {r["attempt"] for r in started} == {"1"}
    # The faults really were there.
    assert all(link.stats.chunks > 0 for link in links)
    assert all(link.stats.stalls > 0 for link in links)
    assert cluster.db.fetchval("SELECT count(*) FROM conveyor_workers WHERE state = 'lost'") == 0
