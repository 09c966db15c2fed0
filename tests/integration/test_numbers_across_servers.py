"""After a known workload on two servers sharing one database, /metrics, /status and the
dashboard agree with the database, and nothing is counted twice."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import urllib.request
from collections import Counter
from datetime import timedelta

from helpers import metric_samples, running, wait_final, wait_for

from conveyor import Client, Task, TaskContext, TaskState, Worker
from conveyor.errors import PermanentFailure

OK, FLAKY, BAD, SLOW, IDLE = "num.ok", "num.flaky", "num.bad", "num.slow", "num.idle"


def ok(_ctx: TaskContext, payload: bytes) -> bytes:
    return payload


def flaky(_ctx: TaskContext, _payload: bytes) -> bytes:
    raise ValueError("flaky")


def bad(_ctx: TaskContext, _payload: bytes) -> bytes:
    raise PermanentFailure("bad")


async def slow(_ctx: TaskContext, _payload: bytes) -> bytes:
    await asyncio.sleep(30)
    return b""


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
        return json.loads(response.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
        return response.read().decode()


def samples(server, name: str) -> dict[frozenset, float]:
    return {
        frozenset(s.labels.items()): s.value
        for s in metric_samples(server.http_url)
        if s.name == name
    }


def summed(servers, name: str) -> Counter:
    total: Counter = Counter()
    for server in servers:
        for labels, value in samples(server, name).items():
            total[labels] += value
    return total


def assert_each_view_agrees(server) -> None:
    """/status, the cluster gauges and the dashboard's cards of one server."""
    status = get_json(f"{server.http_url}/status")
    assert status["queue"]["queued"] == 2
    assert status["queue"]["running"] == 0
    assert status["queue"]["by_type"][IDLE]["queued"] == 2
    assert status["workers"] == {"stopped": 2}, status["workers"]
    minute = status["last_minute"]
    assert minute["succeeded"] == 6, minute
    assert minute["failed"] == 5, minute
    assert minute["retried"] == 2, minute
    assert minute["started"] == 13, minute
    tasks = samples(server, "conveyor_tasks")
    assert tasks[frozenset({"state": "queued", "type": IDLE}.items())] == 2
    assert sum(v for k, v in tasks.items() if dict(k)["state"] == "queued") == 2
    assert sum(v for k, v in tasks.items() if dict(k)["state"] == "running") == 0
    workers_gauge = samples(server, "conveyor_workers")
    assert workers_gauge[frozenset({"state": "stopped"}.items())] == 2
    assert workers_gauge[frozenset({"state": "active"}.items())] == 0
    body = get_text(f"{server.http_url}/ui")
    assert re.search(r'id="queued">2<', body)
    assert re.search(r'id="running">0<', body)
    assert re.search(r'id="active-workers">0<', body)


def test_two_servers_count_a_known_workload_once(start_server, db) -> None:
    a = start_server(heartbeat_interval=timedelta(milliseconds=300))
    b = start_server(heartbeat_interval=timedelta(milliseconds=300))
    servers = (a, b)
    workers = []
    for server in servers:
        worker = Worker(server.address, concurrency=4)
        worker.register_handler(OK, ok)
        worker.register_handler(FLAKY, flaky)
        worker.register_handler(BAD, bad)
        worker.register_handler(SLOW, slow)
        workers.append(worker)
    with Client(a.address) as ca, Client(b.address) as cb, running(workers[0]), running(workers[1]):
        ids = []
        for c in (ca, cb):
            ids += c.enqueue_tasks([Task(type=OK) for _ in range(3)])
            ids += c.enqueue_tasks([Task(type=FLAKY, max_retries=1)])
            ids += c.enqueue_tasks([Task(type=BAD, max_retries=3)])
        ids += ca.enqueue_tasks([Task(type=SLOW, timeout=0.3, max_retries=0)])
        idle = cb.enqueue_tasks([Task(type=IDLE) for _ in range(4)])
        for task_id in ids:
            wait_final(ca, task_id)
        ca.cancel_task(idle[0])
        cb.cancel_task(idle[1])

    # Database truth.
    states = Counter(
        {
            row["state"]: row["n"]
            for row in db.fetch("SELECT state::text, count(*) AS n FROM conveyor_tasks GROUP BY 1")
        }
    )
    assert states == Counter({"succeeded": 6, "failed": 5, "cancelled": 2, "queued": 2})

    def gauges_settled() -> bool:
        return all(
            get_json(f"{s.http_url}/status")["queue"]["queued"] == 2
            and get_json(f"{s.http_url}/status")["workers"].get("stopped") == 2
            and get_json(f"{s.http_url}/status")["last_minute"]["failed"] == 5
            for s in servers
        )

    wait_for(gauges_settled, what="both servers to sample the final queue")

    outcomes = summed(servers, "conveyor_task_outcomes_total")
    by_outcome: Counter = Counter()
    for labels, value in outcomes.items():
        by_outcome[dict(labels)["outcome"]] += value
    assert by_outcome == Counter({"succeeded": 6, "failed": 5, "retried": 2, "cancelled": 2}), (
        by_outcome
    )
    enqueued = sum(summed(servers, "conveyor_tasks_enqueued_total").values())
    assert enqueued == 15
    cut = summed(servers, "conveyor_attempts_cut_short_total")
    assert sum(cut.values()) == 1
    waits = sum(summed(servers, "conveyor_task_queue_wait_seconds_count").values())
    assert waits == 13
    durations: Counter = Counter()
    for labels, value in summed(servers, "conveyor_task_duration_seconds_count").items():
        durations[dict(labels)["outcome"]] += value
    assert durations == Counter({"succeeded": 6, "failed": 5, "retried": 2}), durations
    ops = summed(servers, "conveyor_operator_actions_total")
    assert sum(ops.values()) == 0
    # Exactly one leader, and every view names the same one.
    leaders = [s for s in servers if samples(s, "conveyor_leader")[frozenset()] == 1]
    assert len(leaders) == 1
    for server in servers:
        status = get_json(f"{server.http_url}/status")
        assert status["is_leader"] is (server is leaders[0])
        assert status["leader"]["server_id"] == leaders[0].config.server_id

    for server in servers:
        assert_each_view_agrees(server)


def test_a_killed_worker_is_counted_once_across_two_servers(start_server, spawn_worker, db) -> None:
    quick = {
        "heartbeat_interval": timedelta(milliseconds=300),
        "worker_lost_after": timedelta(seconds=1.5),
        "lease_ttl": timedelta(seconds=3),
    }
    a = start_server(**quick)
    b = start_server(**quick)
    servers = (a, b)
    child = spawn_worker(b.address, concurrency=1)
    with Client(b.address) as client:
        task_id = client.enqueue_task(Task(type="sleep", payload=b"60", max_retries=1))
        wait_for(
            lambda: client.get_task_status(task_id).state is TaskState.RUNNING,
            timeout=30,
            what="the task to run",
        )
        child.signal(signal.SIGKILL)
        child.wait()
        wait_for(
            lambda: client.get_task_status(task_id).state is TaskState.QUEUED,
            timeout=30,
            what="the task to be queued again",
        )
    assert db.fetchval("SELECT count(*) FROM conveyor_workers WHERE state = 'lost'") == 1

    def settled() -> bool:
        return all(
            (s := get_json(f"{server.http_url}/status"))["workers"] == {"lost": 1}
            and s["last_minute"]["retried"] == 1
            and s["queue"]["queued"] == 1
            for server in servers
        )

    wait_for(settled, what="both servers to sample the lost worker")
    outcomes = summed(servers, "conveyor_task_outcomes_total")
    assert sum(outcomes.values()) == 1
    assert outcomes[frozenset({"type": "sleep", "outcome": "retried"}.items())] == 1
    cut = summed(servers, "conveyor_attempts_cut_short_total")
    assert cut == Counter({frozenset({"type": "sleep", "reason": "lease_expired"}.items()): 1})
    for server in servers:
        gauge = samples(server, "conveyor_workers")
        assert gauge[frozenset({"state": "lost"}.items())] == 1
        assert gauge[frozenset({"state": "active"}.items())] == 0
        body = get_text(f"{server.http_url}/ui")
        assert re.search(r'id="active-workers">0<', body)
        page = get_text(f"{server.http_url}/ui/workers")
        assert "worker-lost" in page
