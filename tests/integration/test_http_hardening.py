"""What a client can hold or cost on the server's HTTP addresses, and who may read them.

Real servers (in-process, and a real `conveyor server` process), real PostgreSQL, raw
sockets where a well-behaved HTTP client would not do what is under test: connections that
send nothing or half a request, bodies that never finish, more connections than allowed.
Also: /metrics is rendered off the event loop and shared by the scrapes that come together,
and without tokens /status and /metrics answer only to names a DNS-rebinding page cannot
have, while /healthz and /readyz stay open to any name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import metric_by_label, wait_for
from prometheus_client.core import GaugeMetricFamily

from conveyor import Client, Task
from conveyor.auth import Role, new_token
from conveyor.monitoring.http import EXPENSIVE_RENDER, HttpLimits, HttpServer

QUICK = timedelta(milliseconds=500)


_opened: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    """Every socket a test opened is closed after it, passed or failed."""
    yield
    while _opened:
        _opened.pop().close()


def connect(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    _opened.append(sock)
    if data:
        sock.sendall(data)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed the connection (reading sees its end or a reset)."""
    sock.setblocking(False)
    try:
        while True:
            if sock.recv(65536) == b"":
                return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


def answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, error statuses included."""
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


def open_files(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def dropped(server: Any) -> dict[str, float]:
    return metric_by_label(server.http_url, "conveyor_http_connections_dropped_total", "reason")


def http_server(server: Any) -> Any:
    return server.server._http


def login_with_a_body_that_never_ends(port: int) -> socket.socket:
    """A connection whose request (a dashboard login) says 1000 bytes and sends 10."""
    return connect(
        port,
        b"POST /ui/login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n"
        b"token=abcd",
    )


HALF_A_HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"


class TestHeldConnections:
    def test_a_connection_without_a_whole_request_is_closed(self, start_server) -> None:
        """Nothing sent, or half a request's head: closed after the head timeout."""
        server = start_server(http_limits=HttpLimits(request_head_timeout=QUICK))
        port = server.server.http_port
        silent, half = connect(port), connect(port, HALF_A_HEAD)
        wait_for(lambda: closed_by_server(silent), timeout=10, what="the silent one closed")
        wait_for(lambda: closed_by_server(half), timeout=10, what="the half-sent one closed")
        assert dropped(server)["request_head_timeout"] == 2

    def test_a_kept_alive_connection_is_closed_once_idle(self, start_server) -> None:
        server = start_server(http_limits=HttpLimits(keepalive_timeout=QUICK))
        sock = connect(server.server.http_port)
        for _ in range(2):  # two requests on one connection: keep-alive works
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 200"), head
        # And then half of a third request: no more time than an idle connection gets.
        sock.sendall(HALF_A_HEAD)
        wait_for(lambda: closed_by_server(sock), timeout=10, what="the idle connection closed")
        # Idle connections are closed as a matter of course: not counted as dropped.
        assert dropped(server)["request_head_timeout"] == 0

    def test_a_request_whose_body_never_ends_is_cut_off(self, start_server) -> None:
        token, entry = new_token("ops", Role.ADMIN)
        server = start_server(
            tokens_toml=entry.as_toml(), http_limits=HttpLimits(answer_timeout=QUICK)
        )
        sock = login_with_a_body_that_never_ends(server.server.http_port)
        wait_for(lambda: closed_by_server(sock), timeout=10, what="the slow request cut off")
        counts = metric_by_label(
            server.http_url, "conveyor_http_connections_dropped_total", "reason", token
        )
        assert counts["answer_timeout"] == 1


class TestConnectionLimit:
    def test_a_new_connection_closes_the_longest_idle_one_or_is_refused(self, start_server) -> None:
        """Health checks get through connections that wait for nothing; only when every
        connection is busy with a request is a new one refused, with a 503."""
        _token, entry = new_token("ops", Role.ADMIN)
        server = start_server(
            tokens_toml=entry.as_toml(), http_limits=HttpLimits(max_connections=4)
        )
        port, http = server.server.http_port, http_server(server)
        idle = [connect(port, HALF_A_HEAD) for _ in range(4)]
        wait_for(lambda: http.open_connections == 4, what="4 connections open")
        assert get(f"{server.http_url}/healthz")[0] == 200
        assert closed_by_server(idle[0]), "the longest-waiting connection was not closed"
        assert not any(closed_by_server(sock) for sock in idle[1:])

        busy = []
        for count in range(1, 5):
            busy.append(login_with_a_body_that_never_ends(port))
            wait_for(lambda n=count: http.busy_connections == n, what=f"{count} busy")
        assert all(closed_by_server(sock) for sock in idle)
        # (A client that has already sent its request may see a reset instead: the server
        # answers before reading anything.)
        reply = answer(connect(port))
        assert reply.startswith(b"HTTP/1.1 503 "), reply
        assert b"Retry-After: 1" in reply
        assert "as many HTTP connections" in json.loads(reply.split(b"\r\n\r\n", 1)[1])["message"]
        for sock in busy:
            sock.close()
        wait_for(lambda: http.open_connections == 0, what="the busy connections gone")
        assert get(f"{server.http_url}/healthz")[0] == 200
        wait_for(lambda: http.open_connections == 0, what="every connection accounted for")
        assert http.busy_connections == 0

    def test_held_connections_cannot_use_up_the_servers_file_descriptors(
        self, server_process
    ) -> None:
        """The audit's attack on a real `conveyor server` with the common limit of 1024 open
        files: 1100 half-sent requests. The server keeps at most 256 of them, and gRPC,
        /readyz and the database go on working."""
        needed = 1500
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < needed:
            if hard != resource.RLIM_INFINITY and hard < needed:
                pytest.skip(f"this test needs {needed} open files, the hard limit is {hard}")
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        process = server_process()
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (1024, 1024))
        at_start = open_files(process.pid)
        try:
            held = [connect(process.http_port, HALF_A_HEAD) for _ in range(1100)]
            limit = HttpLimits().max_connections
            # Each connection past the limit closes one of the earlier ones.
            wait_for(
                lambda: closed_by_server(held[1100 - limit - 1]),
                what="the server to close the connections past its limit",
            )
            assert open_files(process.pid) <= at_start + limit + 16
            with Client(process.address) as client:
                client.enqueue_task(Task(type="fd.t", payload=b"y"))
            assert get(f"{process.http_url}/readyz")[0] == 200
        finally:
            while _opened:
                _opened.pop().close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.contextmanager
def serving(
    app: web.Application, limits: HttpLimits, on_dropped: Callable[[str], None]
) -> Iterator[tuple[HttpServer, int]]:
    """`app` behind an HttpServer on 127.0.0.1, on an event loop of its own thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="http-loop", daemon=True)
    thread.start()

    async def start() -> tuple[HttpServer, int]:
        http = HttpServer(app, "127.0.0.1", 0, limits=limits, on_dropped=on_dropped)
        return http, await http.start()

    http, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield http, port
    finally:
        asyncio.run_coroutine_threadsafe(http.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class TestRaisedAnswers:
    # Far more than the socket buffers hold: the client that does not read holds the write.
    BIG = 8 * 1024 * 1024

    @pytest.mark.parametrize("raised", [web.HTTPSeeOther, web.HTTPNotFound])
    def test_a_raised_answer_is_written_while_its_connection_counts_as_busy(
        self, raised: type[web.HTTPException]
    ) -> None:
        """The dashboard's POST/redirect/GET raises its 303, the router raises 404s.

        Such answers used to be written after the connection was counted idle again, under
        the keep-alive timer instead of the answer deadline: a new connection past the limit
        closed this one in the middle of its answer (as "evicted"). Now it stays busy until
        its answer is written, and the new connection is refused instead.
        """

        async def raising(_request: web.Request) -> web.Response:
            if raised is web.HTTPSeeOther:
                raise web.HTTPSeeOther("/elsewhere", text="x" * self.BIG)
            raise raised(text="x" * self.BIG)

        async def fine(_request: web.Request) -> web.Response:
            return web.Response(text="fine")

        app = web.Application()
        app.router.add_get("/raised", raising)
        app.router.add_get("/fine", fine)
        dropped_by: list[str] = []
        limits = HttpLimits(max_connections=1, answer_timeout=timedelta(seconds=30))
        with serving(app, limits, dropped_by.append) as (http, port):
            slow = socket.socket()
            try:
                slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                slow.settimeout(10)
                slow.connect(("127.0.0.1", port))
                slow.sendall(
                    b"GET /raised HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                )
                # The answer has begun; the rest waits for this client to read it.
                first = slow.recv(12)
                busy_meanwhile = http.busy_connections
                other = answer(
                    connect(
                        port, b"GET /fine HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                    )
                )
                whole = first + answer(slow)
            finally:
                slow.close()  # before the server stops: it would wait for the answer's end

        assert busy_meanwhile == 1
        assert other.startswith(b"HTTP/1.1 503 "), other[:100]
        head, _, body = whole.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % raised.status_code), head
        assert len(body) == self.BIG, f"the answer was cut off after {len(body)} bytes"
        assert dropped_by == ["refused"]


@pytest.mark.slow
class TestLimitsFromTheCommandLine:
    """`conveyor server --http-*`: each limit reaches the server (a real process). Each is
    checked well within its default, which would let the connection be."""

    def test_a_connection_cap_of_2(self, server_process) -> None:
        process = server_process("--http-max-connections", "2")
        held = [connect(process.http_port, HALF_A_HEAD) for _ in range(2)]
        # The third connection closes the longest-waiting one (256 would leave it be).
        assert get(f"{process.http_url}/healthz")[0] == 200
        wait_for(lambda: closed_by_server(held[0]), timeout=5, what="the first one evicted")
        assert not closed_by_server(held[1])

    def test_the_deadlines(self, server_process, tmp_path: Path) -> None:
        token, entry = new_token("ops", Role.ADMIN)
        tokens = tmp_path / "tokens.toml"
        tokens.write_text(entry.as_toml())
        process = server_process(
            "--tokens-file",
            str(tokens),
            "--http-request-head-timeout",
            "0.5",
            "--http-answer-timeout",
            "0.5",
            "--http-keepalive-timeout",
            "0.5",
        )
        silent = connect(process.http_port)
        wait_for(lambda: closed_by_server(silent), timeout=5, what="the silent one closed")
        kept = connect(process.http_port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200"), "no answer to /healthz"
        wait_for(lambda: closed_by_server(kept), timeout=5, what="the idle one closed")
        slow = login_with_a_body_that_never_ends(process.http_port)
        wait_for(lambda: closed_by_server(slow), timeout=5, what="the slow request cut off")
        counts = metric_by_label(
            process.http_url, "conveyor_http_connections_dropped_total", "reason", token
        )
        assert (counts["request_head_timeout"], counts["answer_timeout"]) == (1, 1), counts


class TestOpenFilesLimit:
    def test_the_server_raises_its_soft_limit_to_the_hard_one(self, start_server) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard < 256:
            pytest.skip(f"the hard limit ({hard}) leaves no room to lower the soft one")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard // 2, hard))
        try:
            start_server()
            assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class _Probe:
    """A collector on the server's registry: it notes each render, and can hold one up."""

    def __init__(self) -> None:
        self.renders = 0
        self.started = float("inf")  # when the latest render began (time.monotonic)
        self.on_the_event_loop: list[bool] = []
        self.release = threading.Event()
        self.release.set()

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily("probe_renders", "Renders so far.")]

    def collect(self) -> list[GaugeMetricFamily]:
        try:
            asyncio.get_running_loop()
            self.on_the_event_loop.append(True)
        except RuntimeError:
            self.on_the_event_loop.append(False)
        self.renders += 1
        self.started = time.monotonic()
        # Busy, as an expensive render is: its cost is the rendering thread's CPU time.
        deadline = self.started + 30
        while not self.release.is_set() and time.monotonic() < deadline:
            pass
        return [GaugeMetricFamily("probe_renders", "Renders so far.", value=self.renders)]


class TestMetricsRendering:
    def test_scrapes_are_rendered_off_the_loop_and_share_one_render(self, server) -> None:
        probe = _Probe()
        server.server.metrics.registry.register(probe)
        http = http_server(server)
        probe.release.clear()
        bodies: list[str] = []

        def scrape() -> None:
            bodies.append(get(f"{server.http_url}/metrics")[2])

        scrapers = [threading.Thread(target=scrape) for _ in range(8)]
        try:
            for thread in scrapers:
                thread.start()
            # All eight wait for the one render; the event loop is free meanwhile.
            wait_for(lambda: http.busy_connections == 8, what="8 scrapes in progress")
            with Client(server.address) as client:
                client.enqueue_task(Task(type="render.t"))
            # An expensive render (a second here): the scrapes that follow reuse it.
            wait_for(
                lambda: time.monotonic() - probe.started >= 10 * EXPENSIVE_RENDER,
                what="the render to have taken long",
            )
        finally:
            probe.release.set()
            for thread in scrapers:
                thread.join(30)
        assert probe.on_the_event_loop == [False]
        assert len(bodies) == 8
        assert len(set(bodies)) == 1
        assert "probe_renders 1.0" in bodies[0]
        # A scrape right after is served the same render (it took a second: reused for two).
        assert get(f"{server.http_url}/metrics")[2] == bodies[0]
        assert probe.renders == 1


class TestHostCheckWithoutTokens:
    def test_status_and_metrics_answer_only_to_names_a_rebinding_page_cannot_have(
        self, server
    ) -> None:
        port = server.server.http_port
        for path in ("/status", "/metrics"):
            status, content_type, body = get(
                f"{server.http_url}{path}", {"Host": f"attacker.example:{port}"}
            )
            assert status == 421, path
            assert content_type.startswith("application/json")
            refusal = json.loads(body)
            assert refusal["error"] == "misdirected_request"
            assert "--dashboard-allowed-host" in refusal["message"]
            # What a scraper sends for 127.0.0.1:PORT, localhost:PORT, [::1]:PORT, and
            # this machine's own name.
            for host in (
                f"127.0.0.1:{port}",
                f"localhost:{port}",
                f"[::1]:{port}",
                f"{socket.gethostname()}:{port}",
            ):
                assert get(f"{server.http_url}{path}", {"Host": host})[0] == 200, (path, host)
        for path in ("/healthz", "/readyz"):
            assert get(f"{server.http_url}{path}", {"Host": "attacker.example"})[0] == 200

    def test_a_listed_name_is_answered(self, start_server) -> None:
        server = start_server(dashboard_allowed_hosts=frozenset({"prom.internal"}))
        for path in ("/status", "/metrics"):
            assert get(f"{server.http_url}{path}", {"Host": "prom.internal:8080"})[0] == 200

    def test_with_tokens_the_token_is_what_counts(self, start_server) -> None:
        token, entry = new_token("grafana", Role.VIEWER)
        server = start_server(tokens_toml=entry.as_toml())
        for path in ("/status", "/metrics"):
            status, _, _ = get(
                f"{server.http_url}{path}",
                {"Host": "conveyor.example.com", "Authorization": f"Bearer {token}"},
            )
            assert status == 200, path

    def test_the_internal_metrics_address_answers_to_any_name(self, start_server) -> None:
        server = start_server(metrics_listen="127.0.0.1:0")
        url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        assert get(url, {"Host": "prometheus-target.example:9100"})[0] == 200
