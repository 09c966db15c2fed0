"""A server's graceful stop, step by step: long polls, health, leadership, idempotence.

The stop order (app.py): long polls answered and health NOT_SERVING -> leadership resigned
-> gRPC stops accepting -> maintenance -> HTTP -> notifier -> database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import wait_for

from conveyor.errors import ConfigError
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.server.app import SERVICE_NAMES, ConveyorServer
from conveyor.server.config import ServerConfig

TYPE = "shutdown.job"


@contextlib.contextmanager
def channel_to(address: str) -> Iterator[grpc.Channel]:
    """A raw channel that is closed afterwards."""
    channel = grpc.insecure_channel(address)
    try:
        yield channel
    finally:
        channel.close()


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    """GET one of our own JSON endpoints: (HTTP status, document)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our own URL
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def health_of(channel: grpc.Channel, service: str = "") -> Any:
    """The health status of `service`, or the RpcError's code if the call failed."""
    try:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )
    except grpc.RpcError as error:
        return error.code()


def stop_in_background(server) -> tuple[threading.Thread, threading.Event]:
    """Run ServerThread.stop() in a thread; the event is set when it returns."""
    done = threading.Event()

    def stop() -> None:
        server.stop()
        done.set()

    thread = threading.Thread(target=stop, name="server-stop")
    thread.start()
    return thread, done


class TestLongPollOnStop:
    def test_stop_answers_a_waiting_long_poll_at_once(self, server) -> None:
        """A LeaseTasks waiting 20 s for work is answered within 3 s of server.stop(), with
        UNAVAILABLE ("the server is stopping"): an empty answer sent the worker straight
        back for another, where this moves it to another server after a backoff."""
        core = server.server
        polling = threading.Event()
        original_wait = core.notifier.wait

        async def observed_wait(since: int, timeout: float, until: Any = None) -> None:
            polling.set()
            await original_wait(since, timeout, until)

        # The instance attribute shadows the method: LeaseTasks calls this while it waits.
        core.notifier.wait = observed_wait
        with channel_to(server.address) as channel:
            workers = pb_grpc.WorkerServiceStub(channel)
            workers.RegisterWorker(
                pb.RegisterWorkerRequest(
                    worker_id="w-poll", host="h", pid=1, task_types=[TYPE], concurrency=1
                ),
                timeout=10,
            )
            returned_at: list[float] = []
            call = workers.LeaseTasks.future(
                pb.LeaseTasksRequest(
                    worker_id="w-poll",
                    task_types=[TYPE],
                    max_tasks=1,
                    wait=Duration(seconds=20),
                ),
                timeout=40,
            )
            call.add_done_callback(lambda _call: returned_at.append(time.monotonic()))
            assert polling.wait(10), "LeaseTasks never started waiting"
            assert not call.done()

            stop_started = time.monotonic()
            server.stop()
            try:
                outcome: Any = ("ok", list(call.result(timeout=30).leases))
            except grpc.RpcError as error:
                outcome = ("error", error.code(), error.details())

        assert returned_at, "the long poll never returned"
        took = returned_at[0] - stop_started
        assert took < 3.0, f"the long poll returned {took:.2f}s after stop(), not at once"
        # The stop wakes the poll before gRPC stops: it is answered, with no tasks.
        assert outcome[:2] == ("error", grpc.StatusCode.UNAVAILABLE), outcome
        assert "the server is stopping" in outcome[2], outcome


class TestHealthOnStop:
    def test_health_goes_not_serving_before_grpc_stops(self, server) -> None:
        """Health is SERVING, then NOT_SERVING (with /readyz 503) once stop begins, then gone."""
        core = server.server
        entered = threading.Event()
        gate = threading.Event()
        original_stop = core.elector.stop

        async def held_stop(**kwargs: Any) -> None:
            # Hold the stop just after health changed (the step that follows it).
            entered.set()
            await asyncio.to_thread(gate.wait, 30)
            await original_stop(**kwargs)

        core.elector.stop = held_stop
        names = ["", *SERVICE_NAMES]
        stopper: threading.Thread | None = None
        with channel_to(server.address) as channel:
            try:
                before = [health_of(channel, name) for name in names]
                ready_before = get_json(f"{server.http_url}/readyz")[0]

                stopper, stopped = stop_in_background(server)
                assert entered.wait(10), "the stop never reached the leadership step"
                during = [health_of(channel, name) for name in names]
                ready_during, readiness = get_json(f"{server.http_url}/readyz")
            finally:
                gate.set()
                if stopper is not None:
                    stopper.join(30)
            assert stopper is not None
            assert stopped.is_set()
            after = health_of(channel)

        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert before == [serving] * len(names)
        assert ready_before == 200
        assert during == [not_serving] * len(names)
        assert ready_during == 503
        assert readiness["checks"]["draining"] is True
        assert after in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), after


class TestLeadershipOnStop:
    def test_leader_resigns_when_it_stops(self, start_server, db) -> None:
        """After stop, the leader row's lease has ended (no waiting out the 10 s TTL)."""
        server = start_server(leader_ttl=timedelta(seconds=10))
        me = server.config.server_id
        wait_for(
            lambda: (
                db.fetchval(
                    "SELECT holder FROM conveyor_leader "
                    "WHERE name = 'maintenance' AND expires_at > now()"
                )
                == me
            ),
            timeout=5,
            what="the server to lead",
        )
        assert db.fetchval(
            "SELECT expires_at > now() + interval '5 seconds' FROM conveyor_leader "
            "WHERE name = 'maintenance'"
        )

        server.stop()

        row = db.fetch(
            "SELECT holder, expires_at <= now() AS ended FROM conveyor_leader "
            "WHERE name = 'maintenance'"
        )[0]
        assert row["holder"] == me
        assert row["ended"] is True
        assert server.server.elector.is_leader is False


class TestStopIsIdempotent:
    def test_stopping_a_stopped_server_thread_again_is_harmless(self, server, db) -> None:
        """ServerThread.stop() twice: the second returns quickly and the server stays stopped."""
        server.stop()
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1.0
        with channel_to(server.address) as channel:
            assert health_of(channel) == grpc.StatusCode.UNAVAILABLE
        # Its database connections are closed (a backend may take a moment to exit).
        wait_for(
            lambda: (
                db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name LIKE 'conveyor-server%'"
                )
                == 0
            ),
            timeout=5,
            what="the server's database connections to close",
        )

    @pytest.mark.parametrize("started", [True, False], ids=["after-start", "never-started"])
    def test_concurrent_and_repeated_stops_all_return(
        self, database_url: str, started: bool
    ) -> None:
        """stop() twice at once and once more afterwards: one shutdown, no errors."""
        config = ServerConfig(
            database_url=database_url,
            grpc_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            shutdown_grace=timedelta(seconds=1),
        )

        async def scenario() -> tuple[float, int]:
            server = ConveyorServer(config)
            if started:
                await server.start(startup_timeout=10)
            shutdowns = 0
            original_close = server.database.close

            async def counted_close() -> None:
                nonlocal shutdowns
                shutdowns += 1
                await original_close()

            server.database.close = counted_close  # type: ignore[method-assign]
            await asyncio.wait_for(asyncio.gather(server.stop(), server.stop()), 30)
            again = time.monotonic()
            await asyncio.wait_for(server.stop(), 5)
            await asyncio.wait_for(server.wait_stopped(), 1)
            return time.monotonic() - again, shutdowns

        repeat_took, shutdowns = asyncio.run(scenario())
        assert shutdowns == 1
        assert repeat_took < 0.5


def test_a_second_server_on_a_port_in_use_is_refused(start_server) -> None:
    """gRPC's default SO_REUSEPORT let a second server bind a port already served, and the
    kernel split the connections between the two (each on its own database)."""
    first = start_server()
    with pytest.raises(ConfigError, match=r"cannot listen on 127\.0\.0\.1:\d+ for gRPC"):
        start_server(grpc_listen=f"127.0.0.1:{first.server.grpc_port}")
