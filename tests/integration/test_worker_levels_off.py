"""A long-running worker levels off: one real `conveyor worker` process runs 12,500 tasks of
40 types, with failures and retries, permanent failures, async and sync timeouts and
cancellations, against a real `conveyor server` process; the worker's and the server's
memory, fds, threads and (for the worker) event-loop tasks and per-attempt bookkeeping
stay flat from the second round of 2,500 on. (A review measured 20,000 tasks: worker RSS
52.2 -> 53.4 MB, 17 fds, 25 threads, 7 loop tasks; server RSS 71.1 -> 72.9 MB.)"""

from __future__ import annotations

import json
import random
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from helpers import conveyor_command, wait_for

from conveyor import Client, Task, TaskState

pytestmark = pytest.mark.slow

TYPES = 40

APP = textwrap.dedent(
    """
    import asyncio, gc, json, os, sys, threading, time
    from datetime import timedelta
    from conveyor import Worker
    from conveyor.errors import PermanentFailure

    worker = Worker(concurrency=16, drain_timeout=timedelta(seconds=2))

    def behave(payload):
        kind, _, arg = payload.decode().partition(":")
        if kind == "fail":
            raise RuntimeError("failing on purpose")
        if kind == "perm":
            raise PermanentFailure("never")
        return kind, arg

    def sync_handler(ctx, payload):
        kind, arg = behave(payload)
        if kind == "slow":
            ctx.cancelled.wait(float(arg))
        if kind == "cancelme":
            ctx.cancelled.wait(30)
        return b"ok"

    async def async_handler(ctx, payload):
        kind, arg = behave(payload)
        if kind == "slow":
            await asyncio.sleep(float(arg))
        if kind == "cancelme":
            await asyncio.sleep(30)
        return b"ok"

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    async def probe(ctx, payload):
        gc.collect()
        runtime = worker._runtime
        return json.dumps({
            "rss_kb": rss(),
            "fds": len(os.listdir("/proc/self/fd")),
            "threads": len(os.listdir("/proc/self/task")),
            "loop_tasks": len(asyncio.all_tasks()),
            "attempts": len(runtime.attempts),
            "hand_backs": len(runtime.hand_backs),
            "gc_objects": len(gc.get_objects()),
        }).encode()

    for n in range(%(types)d):
        worker.register_handler(f"soak{n}", async_handler if n %% 2 == 0 else sync_handler)
    worker.register_handler("probe", probe)
    """
) % {"types": TYPES}


def proc(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return {
        "rss_kb": rss,
        "fds": sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir()),
        "threads": sum(1 for _ in Path(f"/proc/{pid}/task").iterdir()),
    }


def server_connections(db) -> int:
    """The server's PostgreSQL connections (its pools and its LISTEN), one file each."""
    return db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name LIKE 'conveyor-server %'"
    )


def unfinished(db) -> int:
    return db.fetchval(
        "SELECT count(*) FROM conveyor_tasks WHERE state IN ('queued','scheduled','running')"
    )


def probe(client: Client) -> dict[str, int]:
    task_id = client.enqueue_task(Task(type="probe", timeout=30))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = client.get_task_status(task_id)
        if status.state == TaskState.SUCCEEDED:
            return json.loads(status.result)
        time.sleep(0.05)
    raise AssertionError("probe did not run")


def one_round(client: Client, db, rng: random.Random, count: int) -> None:
    tasks = []
    cancel = []
    for _ in range(count):
        t = f"soak{rng.randrange(TYPES)}"
        roll = rng.random()
        if roll < 0.80:
            tasks.append(Task(type=t, payload=b"ok"))
        elif roll < 0.90:
            tasks.append(Task(type=t, payload=b"fail", max_retries=1))
        elif roll < 0.95:
            tasks.append(Task(type=t, payload=b"perm"))
        elif roll < 0.96:
            tasks.append(Task(type=t, payload=b"slow:1.5", timeout=1, max_retries=1))
        elif roll < 0.965:
            tid = str(uuid.uuid4())
            tasks.append(Task(type=t, payload=b"cancelme", id=tid, timeout=60))
            cancel.append(tid)
        else:
            tasks.append(Task(type=t, payload=b"slow:0.01"))
    for start in range(0, len(tasks), 500):
        client.enqueue_tasks(tasks[start : start + 500])
    # Cancel the long ones once each has started (or right away if still queued).
    for tid in cancel:
        wait_for(
            lambda tid=tid: client.get_task_status(tid).state != TaskState.QUEUED,
            timeout=120,
            what="a cancelme task to start",
        )
        client.cancel_task(tid)
    wait_for(lambda: unfinished(db) == 0, timeout=300, what="the round to drain")


def test_a_worker_process_levels_off_over_many_tasks(server_process, processes, db, tmp_path):
    server = server_process()
    (tmp_path / "soak_app.py").write_text(APP)
    worker = processes(
        conveyor_command("worker", "soak_app:worker", "--server", server.address),
        name="soak-worker",
        cwd=tmp_path,
    )
    rng = random.Random(7)
    samples = []
    with Client(server.address) as client:
        wait_for(
            lambda: db.fetchval("SELECT count(*) FROM conveyor_workers WHERE state='active'") == 1,
            timeout=30,
            what="the worker",
        )
        for r in range(5):
            one_round(client, db, rng, 2500)
            # The cancelled handlers stop at their next heartbeat: until then the worker
            # still holds their attempts.
            settled_probe = wait_for(
                lambda: (found := probe(client))["attempts"] == 1 and found,
                timeout=30,
                what="the worker to hold only the probe's attempt",
            )
            sample = {
                "round": r + 1,
                **settled_probe,
                "server": proc(server.pid),
                "worker": proc(worker.pid),
                "server_database_connections": server_connections(db),
            }
            samples.append(sample)
    settled, last = samples[1], samples[-1]
    shown = json.dumps(samples)
    for key in ("fds", "loop_tasks", "attempts", "hand_backs"):
        assert last[key] <= settled[key], (key, shown)
    # The handler pool starts its threads as it needs them, up to concurrency (16).
    assert last["threads"] <= 16 + 10, shown
    assert last["gc_objects"] <= settled["gc_objects"] + 200, shown
    assert last["rss_kb"] - settled["rss_kb"] < 8_000, shown
    # Its pools open connections as load asks (up to 23) and keep them: a loaded CI machine
    # once saw one more after round 2. What else it holds open must not grow.
    assert (
        last["server"]["fds"] - last["server_database_connections"]
        <= settled["server"]["fds"] - settled["server_database_connections"] + 3
    ), shown
    # gRPC's EventEngine pool adds a thread when all of its are busy for a while (its
    # "lifeguard" does) and retires idle ones later: a loaded CI machine saw 23 -> 25. A
    # thread kept per task or per call would be thousands more over three rounds.
    assert last["server"]["threads"] <= settled["server"]["threads"] + 4, shown
    assert last["server"]["rss_kb"] - settled["server"]["rss_kb"] < 15_000, shown
