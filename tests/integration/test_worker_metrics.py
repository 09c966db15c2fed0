"""The worker's Prometheus endpoint: real workers against a real server, scraped over HTTP.

Each test runs known work (successes, failures with retries, timeouts, cancellations) and
checks that the scraped counters and histogram counts match exactly what ran, that the
endpoint lives exactly as long as the worker, and that `conveyor worker --metrics-port`
serves the same from a real process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta

import pytest
from helpers import conveyor_command, free_port, running, wait_final, wait_for
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conveyor import Client, Task, TaskContext, TaskState, Worker
from conveyor.errors import ServerUnavailable
from conveyor.worker.metrics import OUTCOMES, MetricsServer, WorkerMetrics

OK, FAIL, SLOW = "metrics.ok", "metrics.fail", "metrics.slow"


class Scrape:
    """One parsed exposition: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; a KeyError if the series is not exported at all."""
        return self.samples[(name, frozenset(labels.items()))]


def scrape(port: int) -> Scrape:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        return Scrape(response.read().decode())


def refuses_connections(port: int) -> bool:
    try:
        scrape(port)
    except urllib.error.URLError as exc:
        return isinstance(exc.reason, ConnectionRefusedError)
    except ConnectionRefusedError:
        return True
    return False


def duration_count(metrics: Scrape, task_type: str, outcome: str) -> float:
    return metrics.value(
        "conveyor_worker_handler_duration_seconds_count", type=task_type, outcome=outcome
    )


def ok(_ctx: TaskContext, payload: bytes) -> bytes:
    return payload


async def fail(_ctx: TaskContext, payload: bytes) -> bytes:
    raise ValueError(payload.decode())


async def slow(_ctx: TaskContext, _payload: bytes) -> bytes:
    await asyncio.sleep(60)
    return b"never"


def wait_running(client: Client, task_id: str) -> None:
    wait_for(
        lambda: client.get_task_status(task_id).state is TaskState.RUNNING,
        timeout=10,
        what=f"task {task_id} to run",
    )


class TestCountsMatchWhatRan:
    def test_successes_failures_retries_and_a_timeout(
        self, server, client: Client, caplog: pytest.LogCaptureFixture
    ) -> None:
        """5 successes, 3 tasks failing twice each, 1 timeout: every number adds up."""
        caplog.set_level(logging.INFO, logger="conveyor.worker")
        worker = Worker(server.address, concurrency=3, metrics_port=0)
        worker.register_handler(OK, ok)
        worker.register_handler(FAIL, fail)
        worker.register_handler(SLOW, slow)
        with running(worker):
            port = worker.metrics_port
            assert port is not None
            assert port != 0
            ids = client.enqueue_tasks(
                [Task(type=OK, payload=b"fine") for _ in range(5)]
                + [Task(type=FAIL, payload=b"nope", max_retries=1) for _ in range(3)]
                + [Task(type=SLOW, timeout=0.3, max_retries=0)]
            )
            finals = [wait_final(client, task_id) for task_id in ids]
            assert [status.state for status in finals] == (
                [TaskState.SUCCEEDED] * 5 + [TaskState.FAILED] * 4
            )
            # The slot is given back just after the report the client has already seen.
            metrics = wait_for(
                lambda: (m := scrape(port)).value("conveyor_worker_tasks_in_flight") == 0 and m,
                timeout=10,
                what="no task in flight",
            )

            assert metrics.value("conveyor_worker_tasks_leased_total", type=OK) == 5
            assert metrics.value("conveyor_worker_tasks_leased_total", type=FAIL) == 6
            assert metrics.value("conveyor_worker_tasks_leased_total", type=SLOW) == 1
            ran = {(OK, "succeeded"): 5, (FAIL, "failed"): 6, (SLOW, "timed_out"): 1}
            # Every (type, outcome) series exists from the start; only these moved.
            for task_type in (OK, FAIL, SLOW):
                for outcome in OUTCOMES:
                    assert duration_count(metrics, task_type, outcome) == ran.get(
                        (task_type, outcome), 0
                    ), (task_type, outcome)
            timed_out_for = metrics.value(
                "conveyor_worker_handler_duration_seconds_sum", type=SLOW, outcome="timed_out"
            )
            # At least its 0.3 s timeout, less a clock's rounding: the timeout fires on the
            # event loop's clock and the duration is measured on another (0.29999999999927
            # seen once).
            assert 0.3 - 1e-3 <= timed_out_for < 3
            fast_bucket = metrics.value(
                "conveyor_worker_handler_duration_seconds_bucket",
                type=OK,
                outcome="succeeded",
                le="0.5",
            )
            assert fast_bucket == 5
            assert metrics.value("conveyor_worker_slots") == 3
            assert metrics.value("conveyor_worker_sync_handlers_running") == 0
            assert metrics.value("conveyor_worker_reports_rejected_total") == 0
            assert metrics.value("conveyor_worker_reports_failed_total") == 0
            assert metrics.value("conveyor_worker_heartbeat_failures_total") == 0
            assert 0 <= metrics.value("conveyor_worker_event_loop_lag_seconds") < 1
            assert metrics.value("conveyor_worker_server_breaker_open", address=server.address) == 0
        assert worker.running is False
        assert refuses_connections(port), "the metrics endpoint outlived the worker"
        [serving] = [r for r in caplog.records if getattr(r, "event", "") == "metrics_serving"]
        assert serving.metrics_port == port  # type: ignore[attr-defined]
        assert serving.worker_id == worker.worker_id  # type: ignore[attr-defined]
        assert f":{port}/metrics" in serving.getMessage()

    def test_a_cancelled_task_is_counted_as_cancelled(self, start_server) -> None:
        """The server tells the worker on a heartbeat; the handler is stopped, nothing reported."""
        server = start_server(heartbeat_interval=timedelta(milliseconds=200))
        worker = Worker(server.address, concurrency=1, metrics_port=0)
        worker.register_handler(SLOW, slow)
        with running(worker), Client(server.address) as client:
            port = worker.metrics_port
            assert port is not None
            task_id = client.enqueue_task(Task(type=SLOW))
            wait_running(client, task_id)
            assert scrape(port).value("conveyor_worker_tasks_in_flight") == 1
            client.cancel_task(task_id)
            wait_for(
                lambda: duration_count(scrape(port), SLOW, "cancelled") == 1,
                timeout=10,
                what="the cancelled handler to be counted",
            )
            metrics = wait_for(
                lambda: (m := scrape(port)).value("conveyor_worker_tasks_in_flight") == 0 and m,
                timeout=10,
                what="the slot to be free",
            )
            assert sum(duration_count(metrics, SLOW, outcome) for outcome in OUTCOMES) == 1
            assert metrics.value("conveyor_worker_reports_rejected_total") == 0

    def test_a_report_refused_by_fencing_is_counted(self, start_server) -> None:
        """The handler finishes after its task was cancelled, before any heartbeat says so."""
        # Heartbeats 15 s apart: the handler returns long before one can stop it.
        server = start_server(
            heartbeat_interval=timedelta(seconds=15), worker_lost_after=timedelta(seconds=75)
        )
        release = threading.Event()

        def finishes_when_released(_ctx: TaskContext, _payload: bytes) -> bytes:
            release.wait(30)
            return b"too late"

        worker = Worker(server.address, concurrency=1, metrics_port=0)
        worker.register_handler(OK, finishes_when_released)
        with running(worker), Client(server.address) as client:
            port = worker.metrics_port
            assert port is not None
            task_id = client.enqueue_task(Task(type=OK))
            wait_running(client, task_id)
            assert scrape(port).value("conveyor_worker_sync_handlers_running") == 1
            assert client.cancel_task(task_id).state is TaskState.CANCELLED
            release.set()
            metrics = wait_for(
                lambda: (
                    (m := scrape(port)).value("conveyor_worker_reports_rejected_total") == 1 and m
                ),
                timeout=10,
                what="the refused report to be counted",
            )
            assert duration_count(metrics, OK, "succeeded") == 1
            assert duration_count(metrics, OK, "cancelled") == 0
            assert metrics.value("conveyor_worker_reports_failed_total") == 0
            assert client.get_task_status(task_id).state is TaskState.CANCELLED

    def test_a_task_handed_back_at_shutdown_is_counted_as_released(self, server, client) -> None:
        """Read from the worker's registry: by then its endpoint has stopped with it."""
        worker = Worker(server.address, concurrency=1, drain_timeout=timedelta(0), metrics_port=0)
        worker.register_handler(SLOW, slow)
        with running(worker):
            task_id = client.enqueue_task(Task(type=SLOW))
            wait_running(client, task_id)
        metrics = Scrape(generate_latest(worker.metrics.registry).decode())
        assert duration_count(metrics, SLOW, "released") == 1
        assert metrics.value("conveyor_worker_tasks_in_flight") == 0
        assert client.get_task_status(task_id).state is TaskState.QUEUED


class TestLiveGauges:
    def test_event_loop_lag_shows_while_the_loop_is_blocked(self, server, client) -> None:
        """A scrape during the block already shows it: the endpoint has its own thread."""
        blocking = threading.Event()

        async def blocks_the_loop(_ctx: TaskContext, _payload: bytes) -> bytes:
            blocking.set()
            time.sleep(3)  # noqa: ASYNC251 - blocks the event loop on purpose
            return b"done"

        worker = Worker(server.address, concurrency=1, metrics_port=0)
        worker.register_handler("metrics.block", blocks_the_loop)
        with running(worker):
            port = worker.metrics_port
            assert port is not None
            task_id = client.enqueue_task(Task(type="metrics.block"))
            wait_for(blocking.is_set, timeout=10, what="the handler to block the loop")
            lag = wait_for(
                lambda: (
                    (v := scrape(port).value("conveyor_worker_event_loop_lag_seconds")) >= 1 and v
                ),
                timeout=10,
                interval=0.1,
                what="the lag gauge to show the block",
            )
            assert client.get_task_status(task_id).state is TaskState.RUNNING, (
                f"lag {lag} was seen only after the block"
            )
            assert wait_final(client, task_id).state is TaskState.SUCCEEDED

    def test_breaker_gauge_opens_and_a_start_that_ends_closes_the_endpoint(self) -> None:
        """Nothing listens at the server address: its breaker opens; a stop then ends the
        start (it returns without starting), and the endpoint goes with it."""
        address = f"127.0.0.1:{free_port()}"
        worker = Worker(address, metrics_port=0)
        worker.register_handler(OK, ok)
        failure: list[BaseException] = []

        def start() -> None:
            try:
                worker.start(timeout=timedelta(seconds=30))
            except BaseException as exc:
                failure.append(exc)

        starter = threading.Thread(target=start)
        starter.start()
        try:
            port = wait_for(lambda: worker.metrics_port, timeout=10, what="the bound port")
            wait_for(
                lambda: (
                    scrape(port).value("conveyor_worker_server_breaker_open", address=address) == 1
                ),
                timeout=20,
                interval=0.1,
                what="the breaker of the dead address to open",
            )
        finally:
            worker.stop()
            starter.join(30)
        assert not starter.is_alive()
        assert failure == []
        assert not worker.running
        assert refuses_connections(port)

    def test_a_failed_start_closes_the_endpoint(self) -> None:
        worker = Worker(f"127.0.0.1:{free_port()}", metrics_port=0)
        worker.register_handler(OK, ok)
        with pytest.raises(ServerUnavailable):
            worker.start(timeout=timedelta(seconds=1))
        assert worker.metrics_port
        assert refuses_connections(worker.metrics_port)


class TestHeldConnections:
    """A client cannot pile up threads and open files in the worker through its endpoint."""

    @pytest.fixture
    def endpoint(self, request: pytest.FixtureRequest) -> Iterator[tuple[MetricsServer, int]]:
        limits = request.param
        server = MetricsServer(WorkerMetrics().registry, "127.0.0.1", 0, **limits)
        port = server.start()
        yield server, port
        server.stop()

    @pytest.mark.parametrize("endpoint", [{"connection_deadline": 0.5}], indirect=True)
    def test_a_connection_is_closed_at_its_deadline(self, endpoint) -> None:
        _, port = endpoint
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as silent,
            socket.create_connection(("127.0.0.1", port), timeout=10) as half,
        ):
            half.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            for sock in (silent, half):
                # A read returns once the endpoint has closed the connection.
                assert sock.recv(1) == b""
        assert scrape(port).value("conveyor_worker_slots") == 0

    @pytest.mark.parametrize(
        "endpoint", [{"max_connections": 2, "connection_deadline": 60}], indirect=True
    )
    def test_past_the_limit_a_connection_is_refused(self, endpoint) -> None:
        _, port = endpoint
        with contextlib.ExitStack() as held:
            for _ in range(2):
                sock = held.enter_context(socket.create_connection(("127.0.0.1", port)))
                sock.sendall(b"GET /metrics HTTP/1.1\r\n")
            # Answered before anything is read: a client that has already sent its request
            # may see a reset instead, so this one sends nothing.
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as refused,
                refused.makefile("rb") as stream,
            ):
                reply = stream.read()
            # The server's HTTP addresses' refusal, word for word but the message.
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), reply
            assert b"\r\nRetry-After: 1\r\n" in head + b"\r\n", reply
            refusal = json.loads(body)
            assert refusal["error"] == "unavailable", refusal
            assert "metrics endpoint holds as many connections" in refusal["message"], refusal
        wait_for(lambda: _scrapes(port), what="a scrape once the held connections are gone")


def _scrapes(port: int) -> bool:
    try:
        scrape(port)
    except urllib.error.HTTPError:
        return False
    return True


class TestCli:
    @pytest.mark.slow
    @pytest.mark.parametrize("how", ["flag", "env"])
    def test_conveyor_worker_serves_metrics(self, how, server, client, processes, ledger):
        """`--metrics-port 0` (port read from the JSON log) or CONVEYOR_WORKER_METRICS_PORT."""
        args = ["--server", server.address, "--concurrency", "2"]
        env = {"CONVEYOR_TEST_LEDGER": str(ledger.path)}
        if how == "flag":
            args += ["--metrics-port", "0"]
        else:
            fixed_port = free_port()
            env["CONVEYOR_WORKER_METRICS_PORT"] = str(fixed_port)
        worker = processes(
            conveyor_command("--log-format", "json", "worker", "worker_apps:worker", *args),
            name=f"metrics-worker-{how}",
            **env,
        )

        def announced_port() -> int | None:
            for line in worker.output().splitlines(keepends=True):
                if line.endswith("\n"):  # a complete line
                    document = json.loads(line)
                    if document.get("event") == "metrics_serving":
                        return int(document["metrics_port"])
            return None

        port = wait_for(announced_port, timeout=30, what="the worker to announce its port")
        if how == "env":
            assert port == fixed_port
        ids = client.enqueue_tasks(
            [
                Task(type="noop", payload=b"x"),
                Task(type="noop", payload=b"y"),
                Task(type="always_fail", payload=b"boom", max_retries=0),
            ]
        )
        for task_id in ids:
            wait_final(client, task_id)
        metrics = wait_for(
            lambda: (m := scrape(port)).value("conveyor_worker_tasks_in_flight") == 0 and m,
            timeout=10,
            what="no task in flight",
        )
        assert metrics.value("conveyor_worker_tasks_leased_total", type="noop") == 2
        assert metrics.value("conveyor_worker_tasks_leased_total", type="always_fail") == 1
        assert duration_count(metrics, "noop", "succeeded") == 2
        assert duration_count(metrics, "always_fail", "failed") == 1
        assert duration_count(metrics, "sleep", "succeeded") == 0
        assert metrics.value("conveyor_worker_slots") == 2
        worker.stop()
        assert worker.wait(5) == 0, worker.output()
        assert refuses_connections(port)
