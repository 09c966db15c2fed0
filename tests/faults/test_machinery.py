"""The suite's own machinery, checked without any Conveyor process: the proxy and the checker.

A fault-injection suite is only as good as its faults and its invariant checker: these
tests make sure the proxy really delays, stalls, partitions and resets, and that the
checker really flags what it is meant to (a checker that never fails proves nothing).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid

import pytest
from faults.cluster import check_executions, check_history
from faults.proxy import FaultProxy
from helpers import free_port


@pytest.fixture
def echo_server():
    """A TCP echo server on 127.0.0.1; yields its address."""
    listener = socket.create_server(("127.0.0.1", 0))
    connections: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            connections.append(conn)
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
    listener.close()
    for conn in connections:
        conn.close()
    thread.join(5)


def connect(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def round_trip(sock: socket.socket, data: bytes) -> float:
    began = time.monotonic()
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        received += sock.recv(65536)
    assert received == data
    return time.monotonic() - began


class TestFaultProxy:
    def test_pass_through_delay_and_order(self, echo_server):
        with FaultProxy(echo_server) as proxy, connect(proxy) as sock:
            assert round_trip(sock, b"hello") < 0.2
            proxy.set_faults(delay=0.15, jitter=0.05)
            assert 0.2 <= round_trip(sock, b"slow") < 1.0  # two delayed chunks
            # Jittered delays never reorder a direction.
            proxy.set_faults(delay=0.02, jitter=0.02)
            payload = b"".join(f"{n:04d}".encode() for n in range(100))
            for n in range(100):
                sock.sendall(payload[n * 4 : n * 4 + 4])
            received = b""
            while len(received) < len(payload):
                received += sock.recv(65536)
            assert received == payload

    def test_stalls(self, echo_server):
        with FaultProxy(echo_server, seed=1) as proxy, connect(proxy) as sock:
            proxy.set_faults(stall_probability=1.0)
            assert round_trip(sock, b"x") >= 0.4  # each direction held 200-600 ms
            assert proxy.stats.stalls >= 2

    def test_blackhole_partition_holds_traffic_until_heal(self, echo_server):
        with FaultProxy(echo_server) as proxy, connect(proxy) as old:
            round_trip(old, b"before")
            proxy.partition("blackhole")
            old.sendall(b"held")
            old.settimeout(0.5)
            with pytest.raises(TimeoutError):
                old.recv(10)
            new = connect(proxy, timeout=0.5)  # accepted, but going nowhere
            new.sendall(b"new")
            with pytest.raises(TimeoutError):
                new.recv(10)
            proxy.heal()
            old.settimeout(5)
            new.settimeout(5)
            assert old.recv(10) == b"held"
            assert new.recv(10) == b"new"
            new.close()

    def test_reset_partition(self, echo_server):
        with FaultProxy(echo_server) as proxy, connect(proxy) as sock:
            round_trip(sock, b"before")
            proxy.partition("reset")
            with pytest.raises(ConnectionResetError):
                sock.recv(10)
            with pytest.raises(ConnectionResetError), connect(proxy) as refused:
                refused.recv(10)  # (the reset may already fail the connect)
            proxy.heal()
            with connect(proxy) as again:
                round_trip(again, b"after")

    def test_target_down_resets_the_client(self):
        # Nothing listens there (free_port: no other test process's server is given it).
        with (
            FaultProxy(f"127.0.0.1:{free_port()}") as proxy,
            pytest.raises(ConnectionResetError),
            connect(proxy) as sock,
        ):
            sock.recv(10)


def event(name: str, state: str, attempt: int) -> dict:
    return {"event": name, "state": state, "attempt": attempt}


def task(state: str, attempt: int, max_retries: int = 3) -> dict:
    return {"id": uuid.uuid4(), "state": state, "attempt": attempt, "max_retries": max_retries}


def run(attempt: int, lease: str | None = None) -> dict:
    return {"attempt": str(attempt), "lease_id": lease or str(uuid.uuid4())}


RECOVERED = [
    event("enqueued", "queued", 0),
    event("started", "running", 1),
    event("lease_expired", "scheduled", 1),
    event("started", "running", 2),
    event("succeeded", "succeeded", 2),
]


class TestInvariantChecker:
    def test_a_recovered_task_is_fine(self):
        row = task("succeeded", 2)
        assert check_history(row, RECOVERED) == []
        assert check_executions(row, RECOVERED, [run(1), run(2)]) == []

    def test_a_release_gives_the_attempt_back(self):
        history = [
            event("enqueued", "queued", 0),
            event("started", "running", 1),
            event("released", "queued", 1),
            event("started", "running", 1),
            event("succeeded", "succeeded", 1),
        ]
        row = task("succeeded", 1)
        assert check_history(row, history) == []
        assert check_executions(row, history, [run(1), run(1)]) == []

    @pytest.mark.parametrize(
        ("history", "complaint"),
        [
            ([*RECOVERED[:2], *[event("succeeded", "succeeded", 1)] * 2], "2 accepted outcomes"),
            (
                [*RECOVERED, event("failed", "failed", 2)],
                "an outcome with no attempt running",
            ),
            ([*RECOVERED[:2], event("started", "running", 2)], "started while not queued"),
            (
                [
                    *RECOVERED[:2],
                    event("cancelled", "cancelled", 1),
                    event("started", "running", 2),
                ],
                "started while not queued",
            ),
            (RECOVERED[1:], "does not start with 'enqueued'"),
        ],
        ids=["two-outcomes", "outcome-after-final", "started-twice", "run-after-cancel", "no-enq"],
    )
    def test_broken_histories_are_flagged(self, history, complaint):
        problems = check_history(task(history[-1]["state"], 2), history)
        assert any(complaint in p for p in problems), problems

    def test_two_outcomes_for_one_attempt_are_flagged(self):
        history = [
            event("enqueued", "queued", 0),
            event("started", "running", 1),
            event("failed", "scheduled", 1),
            event("started", "running", 1),
            event("succeeded", "succeeded", 1),
        ]
        problems = check_history(task("succeeded", 1), history)
        assert any("2 accepted outcomes" in p for p in problems), problems

    def test_a_rerun_without_a_cause_is_flagged(self):
        # Two executions, but the history shows one attempt that simply succeeded.
        history = [*RECOVERED[:2], event("succeeded", "succeeded", 1)]
        problems = check_executions(task("succeeded", 1), history, [run(1), run(1)])
        assert any("2 execution(s) of attempt 1" in p for p in problems), problems
        assert any("no lease expiry" in p for p in problems), problems

    def test_a_lease_executed_twice_is_flagged(self):
        lease = str(uuid.uuid4())
        problems = check_executions(task("succeeded", 2), RECOVERED, [run(1, lease), run(2, lease)])
        assert any("a lease executed twice" in p for p in problems), problems

    def test_too_many_attempts_are_flagged(self):
        problems = check_executions(task("succeeded", 2, max_retries=0), RECOVERED, [run(1)])
        assert any("exceed 1 + max_retries" in p for p in problems), problems
