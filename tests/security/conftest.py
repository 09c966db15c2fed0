"""Fixtures for the hostile-input tests: one real server and its database per module.

Hypothesis runs hundreds of examples per test, far too many for a server per example, so
each module gets one in-process server (tests/conftest.py's `ServerThread`, default
settings: no tokens file, every caller allowed) on a database of its own, and the tests
talk to it through raw gRPC stubs, which send whatever they are given, where the client
library would refuse to.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import run_sql, with_database

from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from tests.conftest import PostgresCluster, ServerThread, server_config_for_tests

# Codes the server documents for requests it refuses (the error table of
# docs/getting-started.md, protocol/status.py; auth adds UNAUTHENTICATED and PERMISSION_DENIED).
# UNAVAILABLE is documented too, but only for a server that is stopping or has lost its
# database, which never happens to these tests' server: here it would be a bug.
DOCUMENTED_CODES = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# Large enough for requests beyond the server's own receive limit (16 MiB), so that the
# server, not this channel, is what refuses them.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
CALL_TIMEOUT = 20.0


@dataclass
class Stubs:
    """Raw stubs of every service on one channel to the module's server."""

    channel: grpc.Channel
    tasks: pb_grpc.TaskServiceStub
    workers: pb_grpc.WorkerServiceStub
    admin: pb_grpc.AdminServiceStub
    health: health_pb2_grpc.HealthStub

    def call(self, method: Any, request: Any) -> tuple[grpc.StatusCode, Any, str]:
        """(code, response or None, details) of one call; never raises an RpcError."""
        try:
            response = method(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            return exc.code(), None, exc.details() or ""
        return grpc.StatusCode.OK, response, ""

    def raw(self, method: str, body: bytes) -> tuple[grpc.StatusCode, bytes | None, str]:
        """Send `body` as the request of `method` (/package.Service/Method), unparsed."""
        call = self.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        return self.call(call, body)

    def assert_serving(self) -> None:
        """The server still answers its health check with SERVING."""
        answer = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def assert_documented(code: grpc.StatusCode, details: str, what: object) -> None:
    """`code` is one the API documents for a refused request (never INTERNAL or UNKNOWN)."""
    assert code in DOCUMENTED_CODES, f"{code.name} ({details!r}) for {what!r}"


@pytest.fixture(scope="module")
def security_database(pg_cluster: PostgresCluster) -> Iterator[str]:
    """A fresh migrated database shared by every test of the module."""
    name = f"conveyor_security_{uuid.uuid4().hex[:12]}"
    run_sql(pg_cluster.admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{pg_cluster.template}"')
    yield with_database(pg_cluster.admin_url, name)
    with contextlib.suppress(Exception):
        run_sql(pg_cluster.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def security_server(security_database: str) -> Iterator[ServerThread]:
    """The module's one server.

    `max_lease_wait` is lowered from 30 s so that a hostile long poll (any `wait`, the
    server clamps it) costs at most a fifth of a second; everything else is the default.
    """
    config = server_config_for_tests(security_database, max_lease_wait=timedelta(milliseconds=200))
    server = ServerThread(config).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stubs(security_server: ServerThread) -> Iterator[Stubs]:
    """Raw stubs on one channel to the module's server."""
    channel = grpc.insecure_channel(security_server.address, options=CHANNEL_OPTIONS)
    try:
        yield Stubs(
            channel=channel,
            tasks=pb_grpc.TaskServiceStub(channel),
            workers=pb_grpc.WorkerServiceStub(channel),
            admin=pb_grpc.AdminServiceStub(channel),
            health=health_pb2_grpc.HealthStub(channel),
        )
    finally:
        channel.close()


class LiveDb:
    """Direct access to a database over one connection kept open (on a loop of its own).

    helpers.Db connects for every query, some 40 ms; the tests here query after most
    examples.
    """

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._conn: asyncpg.Connection[Any] = self._run(asyncpg.connect(url))

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return list(self._run(self._conn.fetch(query, *args)))

    def execute(self, query: str, *args: Any) -> None:
        self._run(self._conn.execute(query, *args))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self._conn.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="module")
def security_db(security_database: str) -> Iterator[LiveDb]:
    """Direct access to the module's database."""
    db = LiveDb(security_database)
    yield db
    db.close()
