"""How fast the dashboard and the operator queries answer on a large table.

Seeds a fresh embedded PostgreSQL with N tasks (default 100,000: mostly succeeded, some
failed, a backlog queued, a few running, with their history: `started` and an outcome for
those that ran, and the `enqueued` event every task reads from its own row), starts a real
Conveyor server in-process, then times each /ui page and each AdminService listing over
HTTP and gRPC: median and p95 of repeated requests, after a warm-up. Prints a table and
writes benchmarks/results/dashboard_pages.json.

    .venv/bin/python benchmarks/dashboard_pages.py [--tasks 100000] [--repeat 30]

The point is the shape, not the absolute numbers: a page must cost the same on 100,000
tasks as on 1,000, because every page is an index range scan with a LIMIT (or no query).
Run it with --tasks 1000 and --tasks 100000 and compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import asyncpg

from conveyor import AsyncClient
from conveyor.server.app import ConveyorServer
from conveyor.server.config import ServerConfig
from conveyor.storage import migrate
from conveyor.storage.embedded import EmbeddedPostgres

SEED = """
INSERT INTO conveyor_tasks (id, type, state, attempt, max_retries, timeout, created_at,
    available_at, started_at, finished_at, worker_id, lease_id, lease_expires_at, deadline_at,
    last_error, payload)
SELECT gen_random_uuid(), 'type-' || (g % 5),
    CASE WHEN g % 50 = 0 THEN 'queued' WHEN g % 97 = 0 THEN 'failed'
         WHEN g % 1000 = 1 THEN 'running' ELSE 'succeeded' END::conveyor_task_state,
    CASE WHEN g % 50 = 0 THEN 0 ELSE 1 END, 3, interval '60 seconds',
    now() - interval '1 day' + g * interval '10 milliseconds',
    now() - interval '1 day' + g * interval '10 milliseconds',
    CASE WHEN g % 50 <> 0 THEN now() - interval '1 hour' END,
    CASE WHEN g % 50 <> 0 AND (g % 1000 <> 1 OR g % 97 = 0) THEN now() - interval '59 minutes' END,
    CASE WHEN g % 50 <> 0 THEN 'worker-' || (g % 8) END,
    CASE WHEN g % 1000 = 1 AND g % 50 <> 0 AND g % 97 <> 0 THEN gen_random_uuid() END,
    CASE WHEN g % 1000 = 1 AND g % 50 <> 0 AND g % 97 <> 0 THEN now() + interval '1 hour' END,
    CASE WHEN g % 1000 = 1 AND g % 50 <> 0 AND g % 97 <> 0 THEN now() + interval '1 hour' END,
    CASE WHEN g % 97 = 0 THEN 'ValueError: boom' END,
    convert_to('{"n": ' || g || '}', 'UTF8')
FROM generate_series(1, $1) AS g;
"""
SEED_EVENTS = """
INSERT INTO conveyor_task_events (task_id, at, event, state, attempt, worker_id)
SELECT t.id, t.created_at + e.n * interval '1 second',
       (ARRAY['enqueued', 'started', 'succeeded'])[e.n + 1],
       (ARRAY['queued', 'running', 'succeeded'])[e.n + 1]::conveyor_task_state,
       least(e.n, 1), t.worker_id
FROM conveyor_tasks AS t CROSS JOIN generate_series(1, 2) AS e (n)
WHERE t.state <> 'queued';
"""


def timed_get(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - loopback
        response.read()
        assert response.status == 200, url
    return time.perf_counter() - started


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 2),
        "p95_ms": round(ordered[int(len(ordered) * 0.95) - 1] * 1000, 2),
    }


async def run(tasks: int, repeat: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as data:
        postgres = EmbeddedPostgres(Path(data) / "pg")
        url = postgres.start()
        try:
            conn = await asyncpg.connect(url)
            await migrate.migrate(conn)
            await conn.execute(SEED, tasks)
            await conn.execute(SEED_EVENTS)
            await conn.execute("ANALYZE")
            some_id = str(await conn.fetchval("SELECT id FROM conveyor_tasks LIMIT 1 OFFSET 77"))
            await conn.close()
            server = ConveyorServer(
                ServerConfig(database_url=url, grpc_listen="127.0.0.1:0", http_listen="127.0.0.1:0")
            )
            await server.start()
            try:
                return await measure(server, some_id, repeat)
            finally:
                await server.stop()
        finally:
            postgres.stop()


async def measure(server: ConveyorServer, task_id: str, repeat: int) -> dict[str, dict[str, float]]:
    base = f"http://127.0.0.1:{server.http_port}"
    pages = {
        "GET /ui (overview)": "/ui",
        "GET /ui/tasks (all states)": "/ui/tasks",
        "GET /ui/tasks?state=failed": "/ui/tasks?state=failed",
        "GET /ui/tasks?type=type-3&state=succeeded": "/ui/tasks?type=type-3&state=succeeded",
        "GET /ui/tasks/{id} (detail)": f"/ui/tasks/{task_id}",
        "GET /ui/workers": "/ui/workers",
        "GET /status": "/status",
    }
    results: dict[str, dict[str, float]] = {}
    loop = asyncio.get_running_loop()
    for name, path in pages.items():
        await loop.run_in_executor(None, timed_get, base + path)  # warm-up
        samples = [await loop.run_in_executor(None, timed_get, base + path) for _ in range(repeat)]
        results[name] = summary(samples)
    async with AsyncClient(f"127.0.0.1:{server.grpc_port}") as client:
        calls = {
            "ListTasks (50, failed)": lambda: client.list_tasks(states="failed"),
            "ListTasks (50, all)": client.list_tasks,
            "RetryTasks dry run (failed, count)": lambda: client.retry_tasks(
                states="failed", dry_run=True
            ),
            "GetStatus": client.get_status,
        }
        for name, call in calls.items():
            await call()
            samples = []
            for _ in range(repeat):
                started = time.perf_counter()
                await call()
                samples.append(time.perf_counter() - started)
            results[name] = summary(samples)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    results = asyncio.run(run(args.tasks, args.repeat))
    print(f"\nDashboard and operator queries on {args.tasks:,} tasks ({args.repeat} runs each)\n")
    print(f"{'request':45} {'median ms':>10} {'p95 ms':>10}")
    for name, numbers in results.items():
        print(f"{name:45} {numbers['median_ms']:>10} {numbers['p95_ms']:>10}")
    out = Path(__file__).parent / "results" / "dashboard_pages.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"tasks": args.tasks, "results": results}, indent=2))


if __name__ == "__main__":
    main()
