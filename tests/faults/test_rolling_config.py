"""One server restarted with a new configuration while the others keep the old one, as a
rolling restart does for a configuration change.

The deployment runs the quick settings of the fault suite (lease 4 s, heartbeats every
0.5 s, a worker lost after 2 s of silence). The operator raises the heartbeat interval
(operations.md: "Raise it when there are thousands of workers") and restarts the servers
one at a time; the first one restarted already suggests the new interval to the workers
that register with it, while the old leader still judges every worker by its own
`--worker-lost-after`. Before migration 0016 it swept the worker as lost, and both tasks,
with no retries allowed, failed (`lease_expired`) while their handler ran.
"""

from __future__ import annotations

import signal

import pytest
from faults.cluster import Cluster
from helpers import wait_for

from conveyor import Task
from conveyor.types import new_task_id


@pytest.mark.slow
def test_worker_registered_on_a_reconfigured_server_is_not_swept_by_the_old_leader(
    database_url, processes, ledger, db
) -> None:
    cluster = Cluster(processes, database_url, ledger, db, scenario="config")
    try:
        servers = cluster.start_servers(3)
        old_leader = cluster.leader()
        # Restart a follower with the new settings (heartbeat 2 s, lost after 10 s: both
        # valid with the 4 s lease, and what the new release of the config says).
        follower = next(s for s in servers if s is not old_leader)
        follower.stop(signal.SIGTERM)
        follower.extra_args = (
            *follower.extra_args,
            "--heartbeat-interval",
            "2",
            "--worker-lost-after",
            "10",
        )
        follower.start()
        assert cluster.leader() is old_leader
        # A worker (re)started now registers with the reconfigured server (given it
        # first and alone here, so the registration is certain; with every address it
        # happens to any worker whose ring starts there).
        worker = cluster.worker(follower, concurrency=2)
        cluster.wait_registered(worker)
        worker_id = cluster.worker_id(worker)

        client = cluster.client(*servers)
        ids = [
            cluster.enqueue_one(
                client, Task(type="sleep", payload=b"5", max_retries=0, id=new_task_id())
            )
            for _ in range(2)
        ]
        wait_for(
            lambda: all(cluster.state(t) not in ("queued", "running") for t in ids),
            timeout=30,
            what="the tasks to finish",
        )
        states = {t: cluster.state(t) for t in ids}
        histories = {t: cluster.events(t) for t in ids}
        errors = {t: db.task(t)["last_error"] for t in ids}
        lost = db.fetchval(
            "SELECT count(*) FROM conveyor_workers WHERE id = $1 AND state = 'lost'", worker_id
        )
        runs = len(ledger.started())
    finally:
        cluster.stop_everything()
    assert set(states.values()) == {"succeeded"}, (
        f"states {states}, histories {histories}, errors {errors}, "
        f"worker now lost: {bool(lost)}, executions {runs}"
    )
