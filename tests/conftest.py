"""Shared fixtures: a real PostgreSQL, a database per test, real servers and worker processes.

PostgreSQL: `CONVEYOR_TEST_DATABASE_URL` (an admin URL to any PostgreSQL >= 15) when set,
else an embedded PostgreSQL 18 started once per test process (`make test` runs 4, through
pytest-xdist). A template database is migrated once per process; each test gets
`CREATE DATABASE ... TEMPLATE` (fast, isolated).

Servers run in-process on a background thread with their own event loop (`server`
fixture, or `start_server(**config)` for custom settings); `ServerProcess` runs one as a
real `conveyor server` process for crash and restart tests. Worker processes are real
`conveyor worker` processes (`spawn_worker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import asyncpg
import pytest
from helpers import (
    REPO_ROOT,
    AppRole,
    Db,
    Ledger,
    ServerProcess,
    conveyor_command,
    process_env,
    run_sql,
    with_database,
    with_user,
)

from conveyor.server.app import ConveyorServer
from conveyor.server.config import ServerConfig
from conveyor.storage import migrate
from conveyor.storage.embedded import EmbeddedPostgres

# Loaded here, not in faults/conftest.py: the results table is printed by the process that
# prints the summary, which under pytest-xdist runs no test and so loads no conftest below.
pytest_plugins = ("faults.results",)


@dataclass
class PostgresCluster:
    """The session's PostgreSQL: an admin URL and, when embedded, the handle to stop it."""

    admin_url: str
    embedded: EmbeddedPostgres | None
    # One per pytest-xdist worker ("gw0", "gw1"...): the workers of one run share an
    # external PostgreSQL, and each drops and rebuilds its template as it starts.
    template: str = f"conveyor_test_template_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"

    def restart(self) -> None:
        """Stop and start the cluster (embedded only)."""
        if self.embedded is None:
            pytest.skip("restarting PostgreSQL needs the embedded cluster")
        self.embedded.stop()
        self.embedded.start()


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    """The PostgreSQL every test database lives in, with a migrated template database."""
    external = os.environ.get("CONVEYOR_TEST_DATABASE_URL")
    embedded = None
    if external:
        admin_url = external
    else:
        # Unix socket paths are limited to ~100 bytes: keep the data directory short.
        data_dir = Path(tempfile.mkdtemp(prefix="cvpg-")) / "data"
        embedded = EmbeddedPostgres(data_dir)
        admin_url = embedded.start()
    cluster = PostgresCluster(admin_url=admin_url, embedded=embedded)
    template_url = with_database(admin_url, cluster.template)

    async def prepare() -> None:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{cluster.template}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{cluster.template}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(template_url)
        try:
            await migrate.migrate(conn)
        finally:
            await conn.close()

    asyncio.run(prepare())
    yield cluster
    with contextlib.suppress(Exception):
        run_sql(admin_url, f'DROP DATABASE IF EXISTS "{cluster.template}" WITH (FORCE)')
    if embedded is not None:
        embedded.stop(mode="immediate")
        shutil.rmtree(embedded.data_dir.parent, ignore_errors=True)


@pytest.fixture
def database_url(pg_cluster: PostgresCluster) -> Iterator[str]:
    """A fresh, migrated database for this test; dropped afterwards."""
    name = f"conveyor_test_{uuid.uuid4().hex[:12]}"
    run_sql(pg_cluster.admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{pg_cluster.template}"')
    yield with_database(pg_cluster.admin_url, name)
    with contextlib.suppress(Exception):
        run_sql(pg_cluster.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_database_url(pg_cluster: PostgresCluster) -> Iterator[str]:
    """A fresh database with no Conveyor schema at all."""
    name = f"conveyor_empty_{uuid.uuid4().hex[:12]}"
    run_sql(pg_cluster.admin_url, f'CREATE DATABASE "{name}"')
    yield with_database(pg_cluster.admin_url, name)
    with contextlib.suppress(Exception):
        run_sql(pg_cluster.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def app_role(pg_cluster: PostgresCluster) -> Iterator[AppRole]:
    """A role that is not a superuser and its own migrated database (see AppRole)."""
    name = f"conveyor_app_{uuid.uuid4().hex[:12]}"
    run_sql(
        pg_cluster.admin_url,
        f'CREATE ROLE "{name}" LOGIN',
        f'CREATE DATABASE "{name}" OWNER "{name}"',
    )
    role = AppRole(
        name=name,
        url=with_user(with_database(pg_cluster.admin_url, name), name),
        admin_url=with_database(pg_cluster.admin_url, name),
    )

    async def migrate_as_the_role() -> None:
        conn = await asyncpg.connect(role.url)
        try:
            await migrate.migrate(conn)
        finally:
            await conn.close()

    asyncio.run(migrate_as_the_role())
    yield role
    with contextlib.suppress(Exception):
        run_sql(
            pg_cluster.admin_url,
            f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
            f'DROP ROLE IF EXISTS "{name}"',
        )


@pytest.fixture
def db(database_url: str) -> Db:
    """Direct access to this test's database."""
    return Db(database_url)


# --- servers ------------------------------------------------------------------------------


def server_config_for_tests(database_url: str, /, **overrides: Any) -> ServerConfig:
    """Settings for test servers: ephemeral ports, quick loops, otherwise the defaults.

    An override may name another `database_url` (a server running as another role).
    """
    config = ServerConfig(
        database_url=database_url,
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        retry_backoff_base=timedelta(milliseconds=50),
        retry_backoff_cap=timedelta(milliseconds=400),
        reaper_interval=timedelta(milliseconds=200),
        shutdown_grace=timedelta(seconds=2),
        stats_interval=timedelta(milliseconds=200),
    )
    return replace(config, **overrides)


class ServerThread:
    """A ConveyorServer running on its own event loop in a background thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server: ConveyorServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="test-server")

    def _main(self) -> None:
        async def run() -> None:
            self.loop = asyncio.get_running_loop()
            self.server = ConveyorServer(self.config)
            try:
                await self.server.start(startup_timeout=10)
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                await self.server.stop()
                return
            self._ready.set()
            await self.server.wait_stopped()

        asyncio.run(run())

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def http_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.http_port}"

    def call(self, coroutine_function: Callable[[], Any]) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine_function(), self.loop).result(30)

    def stop(self) -> None:
        if self.server is not None and self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self._thread.join(30)


@pytest.fixture
def start_server(database_url: str) -> Iterator[Callable[..., ServerThread]]:
    """Start in-process servers on this test's database: `start_server(lease_ttl=...)`
    (`database_url=...` for another one)."""
    started: list[ServerThread] = []

    def start(**overrides: Any) -> ServerThread:
        server = ServerThread(server_config_for_tests(database_url, **overrides)).start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def server(start_server: Callable[..., ServerThread]) -> ServerThread:
    """One in-process server with test settings."""
    return start_server()


@pytest.fixture
def server_without_the_methods() -> Iterator[str]:
    """The address of a real gRPC server on loopback that registers none of Conveyor's
    methods: it answers every call as a Conveyor server older than the method does (grpc's
    UNIMPLEMENTED "Method not found!")."""
    import grpc  # noqa: PLC0415 - only the tests that use raw servers need it

    bare = grpc.server(ThreadPoolExecutor(max_workers=2))
    port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        bare.stop(grace=None)


@pytest.fixture
def task_stub(server: ServerThread) -> Iterator[Any]:
    """A raw TaskService stub on its own channel."""
    import grpc  # noqa: PLC0415 - only the tests that use raw stubs need it

    from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc  # noqa: PLC0415

    channel = grpc.insecure_channel(server.address)
    try:
        yield pb_grpc.TaskServiceStub(channel)
    finally:
        channel.close()


@pytest.fixture
def client(server: ServerThread) -> Iterator[Any]:
    """A sync Client connected to `server`."""
    from conveyor import Client  # noqa: PLC0415

    with Client(server.address) as connected:
        yield connected


# --- processes ----------------------------------------------------------------------------


@dataclass
class ChildProcess:
    """A child process whose output goes to a log file (printed if a test fails)."""

    argv: list[str]
    log_path: Path
    env: dict[str, str]
    cwd: Path = REPO_ROOT
    process: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None, repr=False)

    def start(self) -> ChildProcess:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None


@pytest.fixture
def processes(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., ChildProcess]]:
    """Start child processes that are stopped (SIGTERM, then SIGKILL) after the test.

    `processes(argv, name="worker-1", cwd=None, **env)` (cwd: the repository root by
    default); their combined output is attached to the test report when the test fails.
    """
    children: list[ChildProcess] = []

    def spawn(argv: list[str], *, name: str, cwd: Path | None = None, **env: str) -> ChildProcess:
        child = ChildProcess(
            argv, tmp_path / f"{name}.log", process_env(**env), cwd=cwd or REPO_ROOT
        ).start()
        children.append(child)
        return child

    yield spawn
    for child in children:
        child.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for child in children:
            sys.stderr.write(f"\n----- output of {child.log_path.name} -----\n{child.output()}")


# Files whose tests take far longer than any other's (the soak: a minute), started first so
# that under pytest-xdist no process is left running one alone at the end of the run.
LONGEST_FILES: Final = ("faults/test_soak.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the tests of LONGEST_FILES to the front; the rest keep their order."""
    items.sort(key=lambda item: not item.path.as_posix().endswith(LONGEST_FILES))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    """An empty ledger file; pass `CONVEYOR_TEST_LEDGER=str(ledger.path)` to workers."""
    return Ledger(tmp_path / "ledger.tsv")


@pytest.fixture
def spawn_worker(
    processes: Callable[..., ChildProcess], ledger: Ledger
) -> Callable[..., ChildProcess]:
    """Start a real `conveyor worker` process running tests/worker_apps.py:worker.

    `spawn_worker(server.address, concurrency=8, name="w1", app="worker")`.
    """
    counter = iter(range(1, 1000))

    def spawn(
        address: str,
        *,
        concurrency: int = 4,
        app: str = "worker",
        name: str | None = None,
        **env: str,
    ) -> ChildProcess:
        label = name or f"worker-{next(counter)}"
        return processes(
            conveyor_command(
                "worker",
                f"worker_apps:{app}",
                "--server",
                address,
                "--concurrency",
                str(concurrency),
            ),
            name=label,
            CONVEYOR_TEST_LEDGER=str(ledger.path),
            **env,
        )

    return spawn


@pytest.fixture
def server_process(
    database_url: str, processes: Callable[..., Any]
) -> Callable[..., ServerProcess]:
    """Start real `conveyor server` processes: `server_process()` -> a ready ServerProcess.

    `server_process(*extra_args, database_url=..., name=...)`; stopped after the test.
    `database_url` is requested before `processes` so that the processes are stopped
    before the test's database is dropped.
    """
    counter = iter(range(1, 1000))

    def start(
        *extra_args: str, database_url: str = database_url, name: str | None = None
    ) -> ServerProcess:
        label = name or f"server{next(counter)}"
        return ServerProcess(
            processes, database_url, extra_args=tuple(extra_args), name=label
        ).start()

    return start


@pytest.fixture
def faketime() -> str:
    """The `faketime` command, to run a process with a skewed clock (`FAKETIME_ENV`); the
    test is skipped when it is not installed.

    .ci/run installs it (Debian package `faketime`); locally: apt-get install -y faketime.
    """
    path = shutil.which("faketime")
    if path is None:
        pytest.skip("faketime is not installed (apt-get install -y faketime)")
    return path
