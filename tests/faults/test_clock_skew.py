"""Clock skew of +-10 minutes on workers and on a server, with libfaketime.

Leases, deadlines and leader terms are judged by the database clock (`now()`), and workers
only measure durations, so skewed process clocks must change nothing: every task completes
once, with no false lease expiry, even tasks that outlive the 4 s lease many times over
heartbeats.

Processes run as `faketime -f "+10m" <argv>` (Debian package `faketime`; the scenario is
skipped when it is missing, and .ci/run installs it), with only the wall clock skewed
(`helpers.FAKETIME_ENV` says why). `faketime` forks its command and does not forward
signals, so these processes are signalled through their real PID
(`faults.cluster.real_pid`).
"""

from __future__ import annotations

import time
from datetime import datetime

import pytest
from faults.cluster import LEASE_TTL
from helpers import FAKETIME_ENV, wait_for

from conveyor import Task

SKEW = 600.0


def prefix(faketime: str, offset: str) -> list[str]:
    return [faketime, "-f", offset]


def first_log_time(output: str) -> float:
    """The wall-clock time of a process's first log line ("2026-11-29 13:58:22,227 ...")."""
    for line in output.splitlines():
        try:
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # noqa: DTZ007 - local time, as logged
        except ValueError:
            continue
    raise AssertionError(f"no timestamped log line in:\n{output[:2000]}")


@pytest.mark.slow
def test_clock_skew_on_workers_and_a_server(cluster, faketime):
    """Server A +10 min, worker "behind" -10 min (on A), worker "ahead" +10 min (on B)."""
    launched = time.time()
    skewed = cluster.server(name="A", start=False, prefix=prefix(faketime, "+10m"), **FAKETIME_ENV)
    normal = cluster.server(name="B", start=False)
    for server in (skewed, normal):
        server.launch()
    for server in (skewed, normal):
        server.wait_ready()
    behind = cluster.worker(
        skewed, concurrency=4, name="behind", prefix=prefix(faketime, "-10m"), **FAKETIME_ENV
    )
    ahead = cluster.worker(
        normal, concurrency=4, name="ahead", prefix=prefix(faketime, "+10m"), **FAKETIME_ENV
    )
    cluster.wait_registered(behind, ahead)
    # The skew is real: the skewed server logs 10 minutes ahead.
    assert abs(first_log_time(skewed.process.output()) - launched - SKEW) < 60
    assert abs(first_log_time(normal.process.output()) - launched) < 60

    clients = [cluster.client(skewed), cluster.client(normal)]
    # Each worker gets work at once: tasks longer than a lease, kept alive by heartbeats.
    long_ids = [
        cluster.enqueue_one(clients[n % 2], Task(type="sleep", payload=b"6")) for n in range(8)
    ]
    short_ids = cluster.enqueue(clients[0], [Task(type="noop") for _ in range(10)])
    ids = long_ids + short_ids
    wait_for(
        lambda: (
            cluster.db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE state = 'succeeded'")
            == len(ids)
        ),
        timeout=40,
        interval=0.2,
        what="every task to succeed",
    )

    events = cluster.db.fetch(
        "SELECT event, count(*) AS n FROM conveyor_task_history GROUP BY event ORDER BY event"
    )
    assert {row["event"]: row["n"] for row in events} == {
        "enqueued": len(ids),
        "started": len(ids),
        "succeeded": len(ids),
    }
    runs = cluster.ledger.started()
    assert sorted(r["task_id"] for r in runs) == sorted(ids)
    by_pid = {cluster.worker_by_pid(r["pid"]).log_path.stem for r in runs}
    assert by_pid == {"behind", "ahead"}, "both skewed workers ran tasks"
    # The handlers saw their own skewed clocks (the ledger's times are theirs) ...
    now = time.time()
    for row in runs:
        worker = cluster.worker_by_pid(row["pid"]).log_path.stem
        expected = -SKEW if worker == "behind" else SKEW
        assert abs(float(row["at"]) - now - expected) < 120, (worker, row["at"], now)
    # ... and the long tasks outlived their 4 s lease without a false expiry.
    durations = cluster.db.fetch(
        "SELECT extract(epoch FROM finished_at - started_at)::float8 AS s FROM conveyor_tasks"
        " WHERE id = ANY($1::uuid[])",
        long_ids,
    )
    assert min(row["s"] for row in durations) > LEASE_TTL
    assert cluster.db.fetchval("SELECT count(*) FROM conveyor_workers WHERE state = 'lost'") == 0
