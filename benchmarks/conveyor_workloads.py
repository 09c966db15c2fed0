"""Conveyor's workloads for benchmarks/run.py, behind the same contract as the peers.

    .venv/bin/python benchmarks/conveyor_workloads.py --workload w1 --pg-url URL \
        [--redis-url URL] [--tasks N] [--rate R] [--seconds S]

Starts a real `conveyor server --migrate` process on the (fresh, empty) database and, when
the workload needs them, real `conveyor worker apps:worker` processes (benchmarks/apps.py,
a no-op handler). The producer is an AsyncClient in this process. Prints one JSON object on
its last stdout line, as benchmarks/peers/<system>.py do:

- w1: 20,000 no-op tasks enqueued in bulk (batches of 1,000) with no worker running, then
  the workers start; `tasks_per_second` = tasks / (last finished_at - first started_at),
  both read from the database.
- w2: one enqueue at a time at a fixed rate (open loop: each call is sent at its scheduled
  time whether or not the previous one has returned) for S seconds while the workers run;
  `start_ms` and `finish_ms` are the p50/p95/p99 of started_at - created_at and
  finished_at - created_at, all database timestamps, so every clock is PostgreSQL's.
- w3-single: sequential `enqueue_task` calls for S seconds; w3-concurrent: 32 coroutines
  calling `enqueue_task` on one client for S seconds; w3-bulk: `enqueue_tasks` of 1,000
  tasks in a loop for S seconds. `tasks_per_second` = tasks acknowledged / elapsed.

Extra keys (process RSS in MiB, the achieved rate) are informational; run.py keeps them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import asyncpg

from conveyor import AsyncClient, Task

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from apps import NOOP_TYPE  # noqa: E402 - benchmarks/ is not a package

CONVEYOR = Path(sys.executable).parent / "conveyor"
WORKLOADS = ("w1", "w2", "w3-single", "w3-concurrent", "w3-bulk")
BULK_BATCH = 1000
PRODUCERS = 32
# Workers sized for the machine: one process per core, each with this many slots.
DEFAULT_WORKER_PROCESSES = max(1, os.cpu_count() or 1)
DEFAULT_CONCURRENCY = 64
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float | None:
    """Resident set size of one process, from /proc (None if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def is_ready(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
        return bool(response.status == 200)
    return False


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99 with linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}

    def at(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {name: round(at(q), 2) for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}


class Cluster:
    """A `conveyor server` process and, on demand, `conveyor worker` processes."""

    def __init__(self, pg_url: str, logs: Path, server_args: list[str] | None = None) -> None:
        self.pg_url = pg_url
        # Extra `conveyor server` flags, to measure one lever at a time (--no-group-commit).
        self.server_args = server_args or []
        self.logs = logs
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.server: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._files: list[IO[bytes]] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        self._files.append(log)
        return subprocess.Popen(
            argv, cwd=BENCH_DIR, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    async def start_server(self) -> None:
        self.server = self._spawn(
            "server",
            [
                str(CONVEYOR),
                "server",
                "--database-url",
                self.pg_url,
                "--migrate",
                "--no-dashboard",
                "--grpc-listen",
                self.address,
                "--http-listen",
                f"127.0.0.1:{self.http_port}",
                *self.server_args,
            ],
        )
        deadline = time.monotonic() + START_TIMEOUT
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"conveyor server exited:\n{self.tail('server')}")
            if await asyncio.to_thread(is_ready, url):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"conveyor server not ready in {START_TIMEOUT}s:\n{self.tail('server')}")

    async def start_workers(self, client: AsyncClient, processes: int, concurrency: int) -> None:
        for index in range(processes):
            self.workers.append(
                self._spawn(
                    f"worker-{index}",
                    [
                        str(CONVEYOR),
                        "worker",
                        "apps:worker",
                        "--server",
                        self.address,
                        "--concurrency",
                        str(concurrency),
                    ],
                )
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for index, process in enumerate(self.workers):
                if process.poll() is not None:
                    raise RuntimeError(f"worker {index} exited:\n{self.tail(f'worker-{index}')}")
            running = [w for w in await client.list_workers() if w.state == "active"]
            if len(running) >= processes:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"workers not registered in {START_TIMEOUT}s:\n{self.tail('worker-0')}")

    def rss(self) -> dict[str, float | None]:
        """Server RSS and the largest worker RSS, in MiB."""
        worker_rss = [rss_mib(w.pid) for w in self.workers]
        known = [value for value in worker_rss if value is not None]
        return {
            "server_rss_mib": rss_mib(self.server.pid) if self.server else None,
            "worker_rss_mib": max(known) if known else None,
        }

    def stop(self) -> None:
        # Workers first, while the server can still take their handed-back leases.
        for group in (self.workers, [self.server] if self.server else []):
            for process in group:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in group:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for log in self._files:
            log.close()


async def wait_finished(conn: asyncpg.Connection, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = await conn.fetchval(
            "SELECT count(*) FROM conveyor_tasks WHERE finished_at IS NOT NULL"
        )
        if done >= expected:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"only {done} of {expected} tasks finished within {timeout:.0f}s")


async def w1(
    cluster: Cluster, conn: asyncpg.Connection, args: argparse.Namespace
) -> dict[str, Any]:
    async with AsyncClient(cluster.address) as client:
        for start in range(0, args.tasks, BULK_BATCH):
            count = min(BULK_BATCH, args.tasks - start)
            await client.enqueue_tasks([Task(type=NOOP_TYPE) for _ in range(count)])
        await cluster.start_workers(client, args.worker_processes, args.concurrency)
        samples: list[dict[str, float | None]] = []
        deadline = time.monotonic() + args.timeout
        while True:
            samples.append(cluster.rss())
            done = await conn.fetchval(
                "SELECT count(*) FROM conveyor_tasks WHERE finished_at IS NOT NULL"
            )
            if done >= args.tasks:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done} of {args.tasks} tasks finished in time")
            await asyncio.sleep(0.2)
    row = await conn.fetchrow(
        "SELECT min(started_at) AS first, max(finished_at) AS last,"
        " count(*) FILTER (WHERE state = 'succeeded') AS ok FROM conveyor_tasks"
    )
    elapsed = (row["last"] - row["first"]).total_seconds()

    def peak(key: str) -> float | None:
        values = [s[key] for s in samples if s[key] is not None]
        return max(values) if values else None

    return {
        "tasks_per_second": round(args.tasks / elapsed, 1),
        "succeeded": row["ok"],
        "drain_seconds": round(elapsed, 3),
        "load_server_rss_mib": peak("server_rss_mib"),
        "load_worker_rss_mib": peak("worker_rss_mib"),
    }


async def w2(
    cluster: Cluster, conn: asyncpg.Connection, args: argparse.Namespace
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    async with AsyncClient(cluster.address) as client:
        await cluster.start_workers(client, args.worker_processes, args.concurrency)
        warm = await client.enqueue_tasks([Task(type=NOOP_TYPE) for _ in range(50)])
        await wait_finished(conn, len(warm), 30)
        await asyncio.sleep(1.0)
        idle = cluster.rss()
        total = int(args.rate * args.seconds)
        calls: list[asyncio.Task[str]] = []
        started = loop.time()
        for index in range(total):
            delay = started + index / args.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            calls.append(asyncio.create_task(client.enqueue_task(Task(type=NOOP_TYPE))))
        ids = await asyncio.gather(*calls)
        sent_for = loop.time() - started
        await wait_finished(conn, len(warm) + total, args.seconds + 60)
    rows = await conn.fetch(
        "SELECT extract(epoch FROM started_at - created_at) * 1000 AS start_ms,"
        " extract(epoch FROM finished_at - created_at) * 1000 AS finish_ms"
        " FROM conveyor_tasks WHERE id = ANY($1::uuid[])",
        ids,
    )
    return {
        "start_ms": percentiles([float(r["start_ms"]) for r in rows]),
        "finish_ms": percentiles([float(r["finish_ms"]) for r in rows]),
        "tasks": len(rows),
        "achieved_rate": round(total / sent_for, 1),
        "idle_server_rss_mib": idle["server_rss_mib"],
        "idle_worker_rss_mib": idle["worker_rss_mib"],
    }


async def w3(
    cluster: Cluster, conn: asyncpg.Connection, args: argparse.Namespace
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    async with AsyncClient(cluster.address) as client:
        await client.enqueue_task(Task(type=NOOP_TYPE))  # opens the channel
        before = await conn.fetchval("SELECT count(*) FROM conveyor_tasks")
        started = loop.time()
        deadline = started + args.seconds

        async def single() -> int:
            count = 0
            while loop.time() < deadline:
                await client.enqueue_task(Task(type=NOOP_TYPE))
                count += 1
            return count

        async def bulk() -> int:
            count = 0
            while loop.time() < deadline:
                await client.enqueue_tasks([Task(type=NOOP_TYPE) for _ in range(BULK_BATCH)])
                count += BULK_BATCH
            return count

        if args.workload == "w3-single":
            done = await single()
        elif args.workload == "w3-concurrent":
            done = sum(await asyncio.gather(*(single() for _ in range(PRODUCERS))))
        else:
            done = await bulk()
        elapsed = loop.time() - started
    stored = await conn.fetchval("SELECT count(*) FROM conveyor_tasks") - before
    if stored != done:
        raise RuntimeError(f"{done} enqueues acknowledged but {stored} tasks stored")
    return {"tasks_per_second": round(done / elapsed, 1), "tasks": done}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as logs:
        cluster = Cluster(args.pg_url, Path(logs), args.server_arg)
        try:
            await cluster.start_server()
            conn = await asyncpg.connect(args.pg_url)
            try:
                if args.workload == "w1":
                    return await w1(cluster, conn, args)
                if args.workload == "w2":
                    return await w2(cluster, conn, args)
                return await w3(cluster, conn, args)
            finally:
                await conn.close()
        except Exception:
            for name in ("server", "worker-0", "worker-1"):
                text = cluster.tail(name, 15)
                if text:
                    print(f"--- {name} log ---\n{text}", file=sys.stderr)
            raise
        finally:
            cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=WORKLOADS, required=True)
    parser.add_argument("--pg-url", required=True)
    parser.add_argument("--redis-url", default=None, help="Accepted for the contract; unused.")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--worker-processes", type=int, default=DEFAULT_WORKER_PROCESSES)
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("--timeout", type=float, default=600.0, help="Bound on a W1 drain.")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="A `conveyor server` flag, e.g. --server-arg=--no-group-commit (repeatable).",
    )
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
