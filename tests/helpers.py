"""Plain helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from conveyor.server.config import DEFAULT_DEADLINE_GRACE, DEFAULT_LEASE_TTL
from conveyor.storage import migrate, queries
from conveyor.types import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from conveyor.worker.runtime import Worker, _Runtime

TESTS_DIR = Path(__file__).parent
REPO_ROOT = TESTS_DIR.parent


# The history of a task whose first attempt lost its lease (its worker died, hung or was cut
# off) and whose second attempt, after the reaper queued it again, succeeded.
RERUN_AFTER_LEASE_EXPIRED = ["enqueued", "started", "lease_expired", "started", "succeeded"]

# The environment of a process run under `faketime` (the fixture): only its wall clock is
# skewed. libfaketime otherwise also shifts CLOCK_MONOTONIC, which for a negative offset
# yields values unrelated to the real monotonic clock; skew between machines is about wall
# clocks, and monotonic clocks are never compared across processes.
FAKETIME_ENV = {"FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll `condition` until it returns a truthy value; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


async def async_wait_for(
    condition: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.02, what: str = ""
) -> Any:
    """`wait_for` for coroutines: `condition` may be sync or return an awaitable."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(interval)


def get_json(url: str) -> tuple[int, Any]:
    """(status, decoded JSON body) of a GET, including error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def metric_samples(http_url: str, token: str | None = None) -> list[Any]:
    """Every sample of a server's /metrics (a server with tokens asks for one)."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{http_url}/metrics", headers=headers)  # noqa: S310
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        body = response.read().decode()
    return [sample for family in text_string_to_metric_families(body) for sample in family.samples]


def metric_by_label(
    http_url: str, sample: str, label: str, token: str | None = None
) -> dict[str, float]:
    """One sample of a server's /metrics, by the value of one label: {label value: value}."""
    return {
        found.labels[label]: found.value
        for found in metric_samples(http_url, token)
        if found.name == sample
    }


def rpc_count(
    http_url: str, method: str, code: str, histogram: str = "conveyor_rpc_duration_seconds"
) -> float:
    """How many calls of `method` the server answered with `code` (from its /metrics), as
    counted by `histogram` (conveyor_long_rpc_duration_seconds for streams and long polls)."""
    return sum(
        sample.value
        for sample in metric_samples(http_url)
        if sample.name == f"{histogram}_count" and sample.labels == {"method": method, "code": code}
    )


# Ports that free_port hands out: below the kernel's ephemeral range, where bind(("", 0))
# and outgoing connections take theirs, each test process (pytest-xdist's gw0, gw1...) in a
# block of its own. A port picked with bind(0) and closed again is free only until another
# process binds port 0: under xdist, a server's HTTP port was taken by another process's
# gRPC server before it could listen, and its /readyz answered in HTTP/2 frames.
FIRST_FREE_PORT: Final = 10_000


@functools.cache
def _free_port_block() -> range:
    try:
        ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        end = int(ephemeral[0])
    except (OSError, ValueError, IndexError):
        end = 32_768  # Linux's default
    processes = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    size = (end - FIRST_FREE_PORT) // max(processes, 1)
    start = FIRST_FREE_PORT + index * size
    return range(start, start + size)


@functools.cache
def _free_port_candidates() -> Iterator[int]:
    return itertools.cycle(_free_port_block())


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, which no other test process hands out (see
    FIRST_FREE_PORT); a process's own ports come round again only after its whole block."""
    block = _free_port_block()
    for _ in block:
        port = next(_free_port_candidates())
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use, or in TIME_WAIT: the next one
            return port
    raise AssertionError(f"no free port in {block}")


def signal_a_thread_other_than_main(pid: int, sig: int) -> str:
    """Send `sig` to one thread of process `pid` that is not its main thread; return its name.

    The kernel gives a process's signal to whichever of its threads it likes, mostly the
    main one: this is the other case, on purpose (Linux's tgkill, glibc 2.30+).
    """
    tids = (int(entry.name) for entry in Path(f"/proc/{pid}/task").iterdir())
    threads = sorted(tid for tid in tids if tid != pid)
    if not threads:
        raise AssertionError(f"process {pid} runs no thread besides its main one")
    tid = threads[-1]
    name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.tgkill(pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid}, {sig}) failed")
    return name


# --- PostgreSQL ---------------------------------------------------------------------------


def with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` (works for TCP and Unix-socket URLs)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def with_user(url: str, user: str) -> str:
    """`url` connecting as `user`, without a password (the test cluster trusts local users)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


def run_sql(url: str, *statements: str) -> None:
    """Run statements on `url` with a throwaway connection."""

    async def go() -> None:
        conn = await asyncpg.connect(url)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(go())


# Takes a migrated database back to schema 11, so that `migrate` has 0012 to apply: a DROP
# INDEX on conveyor_tasks, which needs the table's ACCESS EXCLUSIVE lock. Undoes 0014 (the
# ledger's compatibility column), 0013 (the marks table) and 0012 (the index it drops);
# 0015 is left applied (an enum value cannot be dropped), and is written to run again.
BACK_TO_SCHEMA_11: Final = (
    "ALTER TABLE conveyor_schema_migrations DROP COLUMN IF EXISTS oldest_compatible_schema",
    "DROP TABLE conveyor_seq_marks",
    (
        "CREATE INDEX conveyor_tasks_running_worker_idx ON conveyor_tasks (worker_id) "
        "WHERE state = 'running'"
    ),
    "DELETE FROM conveyor_schema_migrations WHERE version >= 12",
)


class Db:
    """Synchronous helpers for tests to read and seed the database directly."""

    def __init__(self, url: str) -> None:
        self.url = url

    def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async def go() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self.url)
            try:
                return list(await conn.fetch(query, *args))
            finally:
                await conn.close()

        return asyncio.run(go())

    def fetchval(self, query: str, *args: Any) -> Any:
        rows = self.fetch(query, *args)
        return rows[0][0] if rows else None

    def execute(self, query: str, *args: Any) -> None:
        async def go() -> None:
            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute(query, *args)
            finally:
                await conn.close()

        asyncio.run(go())

    def task(self, task_id: str) -> asyncpg.Record:
        rows = self.fetch("SELECT * FROM conveyor_tasks WHERE id = $1::uuid", task_id)
        assert rows, f"task {task_id} is not in the database"
        return rows[0]

    def events(self, task_id: str) -> list[asyncpg.Record]:
        return self.fetch(
            "SELECT * FROM conveyor_task_history WHERE task_id = $1::uuid ORDER BY id", task_id
        )


@dataclass
class AppRole:
    """A login role that is not a superuser, with a migrated database it owns.

    PostgreSQL applies CONNECTION LIMIT and NOLOGIN only to roles that are not superusers,
    so a test that makes the database refuse a server runs the server as this role and
    keeps the superuser (`admin_url`, same database) to look and to act meanwhile.
    """

    name: str
    url: str
    admin_url: str

    @contextlib.contextmanager
    def refused(self, refuse: str, restore: str) -> Iterator[None]:
        """`ALTER ROLE ... <refuse>` and end the role's sessions; `<restore>` afterwards.

        `refuse` is e.g. "CONNECTION LIMIT 0" (new connections fail with 53300, too many
        connections) or "NOLOGIN" (28000, the role may not log in).
        """
        run_sql(self.admin_url, f'ALTER ROLE "{self.name}" {refuse}')
        try:
            # A connection that passed its login check just before the ALTER may appear a
            # moment later: terminate until none is left.
            wait_for(
                lambda: self._terminate_sessions() == 0,
                timeout=10,
                what=f"every session of {self.name} to end",
            )
            yield
        finally:
            run_sql(self.admin_url, f'ALTER ROLE "{self.name}" {restore}')

    def _terminate_sessions(self) -> int:
        """Terminate the role's sessions; how many there were."""
        terminated = Db(self.admin_url).fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            self.name,
        )
        return len(terminated)


def conveyor_command(*args: str) -> list[str]:
    """The argv to run the `conveyor` CLI with this interpreter."""
    return [sys.executable, "-m", "conveyor", *args]


def process_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: tests/ importable, unbuffered output."""
    env = dict(os.environ)
    # The CLI fits its tables to COLUMNS when set; pytest-xdist's workers have it set (80),
    # a plain run does not. A test that wants a width says so in `extra`.
    for terminal_size in ("COLUMNS", "LINES"):
        env.pop(terminal_size, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(
    *args: str, timeout: float = 60, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run `conveyor ARGS...` to completion (in `cwd`, the repository root by default) and
    capture its output."""
    return subprocess.run(
        conveyor_command(*args),
        env=process_env(**env),
        cwd=cwd or REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> str:
    """Exit status 0; the standard output."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def server_argv(database_url: str, *extra: str) -> list[str]:
    """`conveyor server` arguments on ephemeral loopback ports, then `extra`."""
    return [
        "server",
        "--database-url",
        database_url,
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        *extra,
    ]


def assert_one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Exit status 1, nothing on stdout, exactly one `error: ...` line on stderr."""
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


@dataclass
class Ledger:
    """The handlers' independent record of real executions (see tests/worker_apps.py)."""

    path: Path

    def entries(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        rows = []
        text = self.path.read_text()
        # Read while workers append: a last line without its newline is still being
        # written (a CI run read one torn in half), and is read next time.
        for line in text[: text.rfind("\n") + 1].splitlines():
            if line.strip():
                event, task_id, attempt, lease_id, pid, at = line.split("\t")
                rows.append(
                    {
                        "event": event,
                        "task_id": task_id,
                        "attempt": attempt,
                        "lease_id": lease_id,
                        "pid": pid,
                        "at": at,
                    }
                )
        return rows

    def started(self) -> list[dict[str, str]]:
        return [row for row in self.entries() if row["event"] == "start"]

    def finished(self) -> list[dict[str, str]]:
        return [row for row in self.entries() if row["event"] == "end"]


def wait_final(client: Any, task_id: str, *, timeout: float = 30.0) -> Any:
    """Wait until a task reaches a final state; return its status (with history)."""
    return wait_for(
        lambda: (status := client.get_task_status(task_id, history=True)).state.is_final and status,
        timeout=timeout,
        what=f"task {task_id} to finish",
    )


READY_TIMEOUT = 30.0


class ServerProcess:
    """A `conveyor server` child process that can be stopped and started again.

    Every start runs a new process on the same gRPC and HTTP ports and the same database,
    so clients and workers that know `address` can reconnect to it.
    """

    def __init__(
        self,
        spawn: Callable[..., Any],
        database_url: str,
        *,
        extra_args: tuple[str, ...] = (),
        name: str = "server",
    ) -> None:
        self._spawn = spawn
        self.database_url = database_url
        self.port = free_port()
        self.http_port = free_port()
        self.extra_args = extra_args
        self.name = name
        self.generation = 0
        self.process: Any = None  # the current ChildProcess

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return int(self.process.pid)

    def argv(self) -> list[str]:
        return conveyor_command(
            "server",
            "--database-url",
            self.database_url,
            "--grpc-listen",
            self.address,
            "--http-listen",
            f"127.0.0.1:{self.http_port}",
            "--retry-backoff-base",
            "0.05",
            "--retry-backoff-cap",
            "0.4",
            *self.extra_args,
        )

    def running(self) -> bool:
        return self.process is not None and self.process.process.poll() is None

    def start(self, *, timeout: float = READY_TIMEOUT) -> ServerProcess:
        """Start a new server process on the same ports; return once it is ready."""
        assert not self.running(), "the server process is already running"
        self.generation += 1
        self.process = self._spawn(self.argv(), name=f"{self.name}-{self.generation}")
        self.wait_ready(timeout=timeout)
        return self

    def ready(self) -> bool:
        """Whether GET /readyz answers 200 (the database is reachable, schema checked)."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/readyz", timeout=2) as response:  # noqa: S310 - our own http:// URL
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, *, timeout: float = READY_TIMEOUT) -> None:
        def check() -> bool:
            if self.process is not None and self.process.process.poll() is not None:
                pytest.fail(
                    f"server process exited with {self.process.process.returncode} before "
                    f"it was ready:\n{self.process.output()}"
                )
            return self.ready()

        wait_for(check, timeout=timeout, interval=0.05, what=f"{self.http_url}/readyz to be 200")

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 30) -> int:
        """Send `sig` to the server process (by PID) and return its exit status."""
        assert self.process is not None
        self.process.signal(sig)
        return int(self.process.wait(timeout))

    def restart(self, *, timeout: float = READY_TIMEOUT) -> int:
        """SIGTERM the process, start a new one on the same ports; return the old exit status."""
        status = self.stop()
        self.start(timeout=timeout)
        return status


@contextlib.contextmanager
def worker_stub(address: str) -> Iterator[Any]:
    """A raw WorkerService stub on a channel closed afterwards."""
    # Imported here, not at the top: this module is imported (by conftest) before anything
    # imports conveyor, and grpc imported before conveyor keeps its fork handlers on
    # (test_fork_safety: 14 of 200 children of a fork beside an open stream segfaulted).
    import grpc  # noqa: PLC0415

    from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc  # noqa: PLC0415

    channel = grpc.insecure_channel(address)
    try:
        yield pb_grpc.WorkerServiceStub(channel)
    finally:
        channel.close()


def succeed_as_a_worker(address: str, task_type: str, worker_id: str = "w1") -> None:
    """Register `worker_id`, lease the one task of `task_type` and report it succeeded."""
    from google.protobuf.duration_pb2 import Duration  # noqa: PLC0415 - see worker_stub

    from conveyor.protocol.v1 import conveyor_pb2 as pb  # noqa: PLC0415

    with worker_stub(address) as workers:
        workers.RegisterWorker(
            pb.RegisterWorkerRequest(
                worker_id=worker_id, host="h", pid=1, task_types=[task_type], concurrency=1
            ),
            timeout=10,
        )
        [lease] = workers.LeaseTasks(
            pb.LeaseTasksRequest(
                worker_id=worker_id, task_types=[task_type], max_tasks=1, wait=Duration(seconds=5)
            ),
            timeout=15,
        ).leases
        workers.ReportResult(
            pb.ReportResultRequest(
                worker_id=worker_id,
                task_id=lease.task_id,
                lease_id=lease.lease_id,
                outcome=pb.OUTCOME_SUCCEEDED,
            ),
            timeout=10,
        )


@contextlib.contextmanager
def running(worker: Any) -> Iterator[Any]:
    """Start an in-process `conveyor.Worker`; stop it afterwards whatever happens."""
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


@contextlib.contextmanager
def holding(
    database_url: str, locking_sql: str, *, application_name: str = "conveyor tests"
) -> Iterator[int]:
    """Run `locking_sql` in a transaction of another session, kept open (its locks held)
    until the block ends, then rolled back. Yields that session's backend pid."""
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(
        asyncpg.connect(database_url, server_settings={"application_name": application_name})
    )
    try:
        loop.run_until_complete(conn.execute(f"BEGIN; {locking_sql}"))
        yield conn.get_server_pid()
        loop.run_until_complete(conn.execute("ROLLBACK"))
    finally:
        loop.run_until_complete(conn.close())
        loop.close()


def writes_blocked(database_url: str) -> contextlib.AbstractContextManager[int]:
    """Hold a SHARE lock on conveyor_tasks: reads go on, every insert and update of a task
    waits until the block ends."""
    return holding(database_url, "LOCK TABLE conveyor_tasks IN SHARE MODE")


async def claimed_by_a_worker_that_vanishes(
    url: str, task_id: str, task_type: str, *, max_retries: int
) -> None:
    """Enqueue a task and claim it, at statement level, as a worker never heard of again."""
    conn = await asyncpg.connect(url)
    try:
        task = queries.NewTask(task_id, task_type, b"", timedelta(minutes=1), max_retries)
        assert await queries.task_insert_many(conn, [task]) == [True]
        claimed = await queries.task_claim(
            conn,
            task_types=[task_type],
            limit=1,
            worker_id="vanished-worker",
            lease_ttl=DEFAULT_LEASE_TTL,
            deadline_grace=DEFAULT_DEADLINE_GRACE,
        )
        assert [str(row["id"]) for row in claimed.rows] == [task_id]
    finally:
        await conn.close()


async def enqueue_and_claim(
    conn: Any, task_type: str, ids: list[str], worker_id: str
) -> dict[str, str]:
    """Insert tasks with these ids at statement level and claim them all for `worker_id`,
    with the server's default lease; their lease ids by task id."""
    tasks = [
        queries.NewTask(task_id, task_type, b"", DEFAULT_TIMEOUT, DEFAULT_MAX_RETRIES)
        for task_id in ids
    ]
    assert await queries.task_insert_many(conn, tasks) == [True] * len(ids)
    claimed = await queries.task_claim(
        conn,
        task_types=[task_type],
        limit=len(ids),
        worker_id=worker_id,
        lease_ttl=DEFAULT_LEASE_TTL,
        deadline_grace=DEFAULT_DEADLINE_GRACE,
    )
    leases = {str(row["id"]): str(row["lease_id"]) for row in claimed.rows}
    assert sorted(leases) == sorted(ids)
    return leases


async def started_runtime(worker: Worker) -> _Runtime:
    """The runtime of `worker` as its `main` sets it up, without its registration or loops:
    a test drives its calls, heartbeats and attempts itself."""
    runtime = _Runtime(worker, timedelta(seconds=1))
    runtime.bind_to_running_loop()
    return runtime


def migrate_with(url: str, folder: Path | None) -> list[int]:
    """The versions `migrate` applies from `folder` (None: this release's migrations)."""

    async def go() -> list[int]:
        conn = await asyncpg.connect(url)
        try:
            return [m.version for m in await migrate.migrate(conn, migrations_dir=folder)]
        finally:
            await conn.close()

    return asyncio.run(go())


# Earlier states of this repository that the compatibility tests run against, as the
# releases before this one (there are no tagged releases yet): the newest commit of
# 2026-11-29 (schema 6: long-polling workers, no tokens) and of 2026-12-02 (schema 15: the
# Work and enqueue streams, the schema before 0016's).
OLD_LONG_POLL_RELEASE = "5d0b54e"
OLD_SCHEMA_15_RELEASE = "2852336"


def old_release(rev: str) -> Path:
    """The sources of an earlier commit of this repository, extracted once per machine.

    Skips the test where the clone's history lacks it (a shallow clone).
    """
    root = Path(tempfile.gettempdir()) / f"conveyor-release-{rev}"
    if (root / "src" / "conveyor").is_dir():
        return root
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", rev], capture_output=True, check=False
    )
    if archive.returncode != 0:
        pytest.skip(f"this clone's history lacks {rev}: {archive.stderr.decode().strip()}")
    partial = Path(tempfile.mkdtemp(prefix=f"conveyor-release-{rev}-"))
    subprocess.run(["tar", "-x", "-C", str(partial)], input=archive.stdout, check=True)
    with contextlib.suppress(OSError):  # another test process extracted it meanwhile
        partial.rename(root)
    return root
