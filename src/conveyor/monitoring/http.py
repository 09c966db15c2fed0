"""The server's HTTP endpoints: /healthz, /readyz, /status (JSON), /metrics, and the /ui dashboard.

/healthz and /readyz are always open: load balancers and orchestrators probe them without
credentials, and they reveal only whether this server can serve. With authentication on,
/status and /metrics need `Authorization: Bearer <token>` of a role that may read the
cluster, refused with a JSON body (401 for no or a bad token, 403 for a role without the
permission). Without it they answer only to the names `hosts` allows (421 otherwise), as
the dashboard does, so a web page cannot read them through DNS rebinding. /metrics may
instead be served alone on an address of its own (`create_metrics_app`), typically one only
the cluster's scraper can reach, without a token or a name check. /metrics is rendered in a
thread, and one render serves every scrape that arrives while it is fresh (`SharedRender`).
Each address is served by an `HttpServer`, over TLS when given an SSL context, which bounds
what a client can hold there (`HttpLimits`): a connection must send its request within
seconds, have it answered within seconds more, and may idle between requests for a few
seconds; past a number of connections the oldest idle one is closed for a new one, or the
new one is refused with 503. This module knows nothing of the database or gRPC: the server
hands it a `StatusSource` that answers the questions, and an `authenticate` callable that
turns a token into a principal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from aiohttp import web

from conveyor.auth import Permission, bearer_token
from conveyor.errors import ConfigError, PermissionDenied, Unauthenticated
from conveyor.http_refusal import connection_refusal
from conveyor.monitoring.hosts import host_allowed

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable

    from aiohttp.typedefs import Handler

    from conveyor.auth import Principal
    from conveyor.monitoring.dashboard.views import Dashboard

    # Told of a valid token refused for its role: what was asked, the refusal, who asked.
    OnDenied = Callable[[str, PermissionDenied, Principal], None]

log = logging.getLogger("conveyor.server.http")

PROMETHEUS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
# A /metrics render at least this long is reused by the scrapes that follow it (SharedRender).
EXPENSIVE_RENDER: Final = 0.1
# How often a warning about refused connections may be logged.
REFUSAL_LOG_INTERVAL: Final = 60.0
# How long a stop lets the requests in progress finish (a scrape, a page being rendered)
# before it closes their connections.
HTTP_STOP_GRACE: Final = 2.0


class StatusSource(Protocol):
    """What the HTTP endpoints ask the server."""

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether the server can serve requests now, and the checks behind the answer."""
        ...

    async def status(self) -> dict[str, Any]:
        """The JSON document behind /status."""
        ...

    def metrics_text(self) -> bytes:
        """Prometheus text exposition (called in a thread, off the event loop: it can be slow)."""
        ...


class SharedRender:
    """The /metrics body, rendered once for every scrape that arrives while it is fresh.

    At the type-label bound a render takes most of a second of pure Python: each scrape
    rendering its own would let a client scraping in a loop keep a core busy. Scrapes that
    arrive during a render wait for it. A render that took EXPENSIVE_RENDER or more is also
    served to the scrapes that arrive for twice as long as it took: however often /metrics
    is asked for, such renders take at most a third of a core. A cheaper one (a few types:
    about a millisecond) is not kept, so a scrape right after an action sees it (a reuse of
    a second, and then of twice any render's time, made tests read counters that had not
    moved yet). A failed render is not kept. A render's time is the CPU time of the thread
    that rendered it: on a loaded machine a cheap render could take over EXPENSIVE_RENDER of
    wall time waiting for a core, and was then kept while the counters moved (a CI run read
    an unchanged group-commit histogram after 64 enqueues).
    """

    def __init__(self, render: Callable[[], bytes]) -> None:
        """Bodies come from `render`, called in a thread."""
        self._render = render
        self._body = b""
        self._fresh_until = float("-inf")
        self._running: asyncio.Future[bytes] | None = None

    async def body(self) -> bytes:
        """A body rendered at most a moment ago."""
        if time.monotonic() < self._fresh_until:
            return self._body
        if self._running is None:
            self._running = asyncio.ensure_future(self._refresh())
        # A scrape whose client hangs up must not cancel the render the others wait for.
        return await asyncio.shield(self._running)

    async def _refresh(self) -> bytes:
        try:
            body, took = await asyncio.to_thread(self._measured_render)
        finally:
            self._running = None
        self._body = body
        if took >= EXPENSIVE_RENDER:
            self._fresh_until = time.monotonic() + 2 * took
        return body

    def _measured_render(self) -> tuple[bytes, float]:
        """The body, and the CPU time its render took."""
        started = time.thread_time()
        body = self._render()
        return body, time.thread_time() - started


def _metrics_endpoint(source: StatusSource) -> Callable[[web.Request], Awaitable[web.Response]]:
    shared = SharedRender(source.metrics_text)

    async def metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=await shared.body())
        response.headers["Content-Type"] = PROMETHEUS_CONTENT_TYPE
        return response

    return metrics


def _refusal(status: int, error: str, message: str) -> web.Response:
    response = web.json_response({"error": error, "message": message}, status=status)
    if status == 401:  # noqa: PLR2004 - the one status that must name the scheme to use
        response.headers["WWW-Authenticate"] = 'Bearer realm="conveyor"'
    return response


def _bearer_protected(
    endpoint: Callable[[web.Request], Awaitable[web.Response]],
    authenticate: Callable[[str | None], Principal],
    on_denied: OnDenied | None,
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """`endpoint`, answered only for a bearer token of a role that may read the cluster."""

    async def protected(request: web.Request) -> web.Response:
        try:
            principal = authenticate(bearer_token(request.headers.get("Authorization")))
        except Unauthenticated as exc:
            return _refusal(401, "unauthenticated", exc.message)
        try:
            principal.require(Permission.READ_CLUSTER, request.path)
        except PermissionDenied as exc:
            if on_denied is not None:
                on_denied(request.path, exc, principal)
            return _refusal(403, "permission_denied", exc.message)
        return await endpoint(request)

    return protected


def _host_checked(
    endpoint: Callable[[web.Request], Awaitable[web.Response]],
    allowed_hosts: frozenset[str],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """`endpoint`, answered only under a name no rebinding page can have (see `hosts`)."""

    async def checked(request: web.Request) -> web.Response:
        if not host_allowed(request.host, allowed_hosts):
            return _refusal(
                421,
                "misdirected_request",
                f"{request.path} is not served under the name {request.host!r}. Ask for it "
                "by IP address, localhost or this machine's host name, or start the server "
                "with --dashboard-allowed-host NAME.",
            )
        return await endpoint(request)

    return checked


def create_app(
    source: StatusSource,
    dashboard: Dashboard | None = None,
    *,
    authenticate: Callable[[str | None], Principal] | None = None,
    on_denied: OnDenied | None = None,
    allowed_hosts: frozenset[str] = frozenset(),
    metrics: bool = True,
) -> web.Application:
    """The aiohttp application serving the monitoring endpoints (and /ui if given a source).

    `authenticate` (a token to its principal, raising Unauthenticated) puts /status and
    /metrics behind a bearer token, and `on_denied` hears of each valid token refused for
    its role (the server's gate counts and logs it, as for an RPC); None leaves them open
    to requests that name the server by IP address, localhost or one of `allowed_hosts`
    (lower case). `metrics` False leaves /metrics out, for a server that serves it on an
    address of its own.
    """

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        ready, checks = await source.readiness()
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def status(_request: web.Request) -> web.Response:
        return web.json_response(await source.status())

    protected: list[tuple[str, Callable[[web.Request], Awaitable[web.Response]]]] = [
        ("/status", status)
    ]
    if metrics:
        protected.append(("/metrics", _metrics_endpoint(source)))
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    for path, handler in protected:
        app.router.add_get(
            path,
            _host_checked(handler, allowed_hosts)
            if authenticate is None
            else _bearer_protected(handler, authenticate, on_denied),
        )
    if dashboard is not None:
        dashboard.register(app)
    return app


def create_metrics_app(source: StatusSource) -> web.Application:
    """An application serving /metrics alone, without authentication (an internal address)."""
    app = web.Application()
    app.router.add_get("/metrics", _metrics_endpoint(source))
    return app


@dataclass(frozen=True, kw_only=True, slots=True)
class HttpLimits:
    """What one client may hold on an HTTP address, so that none can hold it all.

    Every connection costs the whole server process a file descriptor, and gRPC and the
    database pool need them too: connections that send nothing, or half a request, must
    not be kept (aiohttp alone would keep them for an hour), nor may they be numberless.
    """

    # Open connections per address. Past it, a new connection closes the one that has
    # waited longest for a request; with none waiting, it is refused (503).
    max_connections: int = 256
    # From accepting a connection (or finishing its TLS handshake) to its request's head
    # (request line and headers) being read.
    request_head_timeout: timedelta = timedelta(seconds=10)
    # From a request's head to its answer being written: reading its body, the endpoint's
    # work, sending the answer to the client.
    answer_timeout: timedelta = timedelta(seconds=30)
    # How long a kept-alive connection may wait for its next request's head.
    keepalive_timeout: timedelta = timedelta(seconds=15)

    def __post_init__(self) -> None:
        """Reject values that would serve nothing or hold connections forever."""
        if self.max_connections < 1:
            raise ConfigError(
                f"HTTP max_connections must be at least 1, got {self.max_connections}"
            )
        for name in ("request_head_timeout", "answer_timeout", "keepalive_timeout"):
            value: timedelta = getattr(self, name)
            if value <= timedelta(0):
                raise ConfigError(f"HTTP {name} must be positive, got {value}")


# The answer to a connection past the limit, written before anything is read from it.
_REFUSAL: Final = connection_refusal(
    "this server holds as many HTTP connections as it may; try again later"
)


class _Connection(asyncio.Protocol):
    """One accepted connection: aiohttp's request handler, under its address's deadlines.

    It passes every event on to aiohttp's handler (made only once the connection is
    admitted), and tells its `_Connections` when it opens and closes; the request
    middleware tells it when a request's head has been read and when its answer is
    written.
    """

    def __init__(self, connections: _Connections) -> None:
        """Nothing happens until the event loop reports the connection made."""
        self._connections = connections
        self._handler: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection (aiohttp takes over), or refuse it with a 503."""
        # A stream server's (uvloop's transports do not derive from asyncio's classes).
        self.transport = cast("asyncio.Transport", transport)
        if not self._connections.admit(self):
            self.transport.write(_REFUSAL)
            self.transport.close()
            self.transport = None
            return
        self._handler = self._connections.new_handler()
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        """Bytes from the client, for aiohttp's parser."""
        if self._handler is not None:
            self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        """The client will send nothing more."""
        return self._handler.eof_received() if self._handler is not None else None

    def pause_writing(self) -> None:
        """The client reads more slowly than the answer is written."""
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        """The client has caught up."""
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        """Closed by either side: forget it and let aiohttp clean up."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._connections.forget(self)
        self.transport = None
        if self._handler is not None:
            self._handler.connection_lost(exc)

    def wait(self, seconds: float, reason: str) -> None:
        """Close the connection (counted as `reason`) unless the next step comes in time."""
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = asyncio.get_running_loop().call_later(seconds, self.drop, reason)

    def drop(self, reason: str) -> None:
        """Close the connection now, whatever it still has to send, counted as `reason`."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self.transport is not None:
            self._connections.dropped(self, reason)
            # abort, not close: close would wait for a client that reads nothing to read
            # what is left of the answer.
            self.transport.abort()


class _Connections:
    """The connections open on one address, and the limits they are held to."""

    def __init__(
        self,
        limits: HttpLimits,
        new_handler: Callable[[], asyncio.Protocol],
        on_dropped: Callable[[str], None] | None,
        address: str,
    ) -> None:
        """Connections are served by handlers from `new_handler` (aiohttp's server)."""
        self.limits = limits
        self.new_handler = new_handler
        self._on_dropped = on_dropped
        # For the log: HOST:PORT, the port as bound once listening.
        self.address = address
        self._open: set[_Connection] = set()
        # Open connections waiting for a request's head, the longest-waiting first.
        self._waiting: OrderedDict[_Connection, None] = OrderedDict()
        self._refused_unlogged = 0
        self._refusal_logged_at = float("-inf")

    def __len__(self) -> int:
        """How many connections are open."""
        return len(self._open)

    @property
    def busy(self) -> int:
        """How many open connections have a request in progress."""
        return len(self._open) - len(self._waiting)

    def connection(self) -> _Connection:
        """The protocol factory given to the event loop's server."""
        return _Connection(self)

    def admit(self, connection: _Connection) -> bool:
        """Whether a new connection may be served; closes an idle one to make room."""
        if len(self._open) >= self.limits.max_connections:
            if not self._waiting:
                self._refused()
                return False
            next(iter(self._waiting)).drop("evicted")
        self._open.add(connection)
        self._waiting[connection] = None
        connection.wait(self.limits.request_head_timeout.total_seconds(), "request_head_timeout")
        return True

    def request_started(self, connection: _Connection) -> None:
        """A request's head has been read: it must be answered within the answer timeout."""
        self._waiting.pop(connection, None)
        connection.wait(self.limits.answer_timeout.total_seconds(), "answer_timeout")

    def request_answered(self, connection: _Connection) -> None:
        """The answer is written: the connection may wait for another request, a while."""
        if connection in self._open:
            self._waiting[connection] = None
            # Idle keep-alive connections are closed as a matter of course, not counted.
            connection.wait(self.limits.keepalive_timeout.total_seconds(), "")

    def forget(self, connection: _Connection) -> None:
        """The connection is closed (or about to be)."""
        self._open.discard(connection)
        self._waiting.pop(connection, None)

    def dropped(self, connection: _Connection, reason: str) -> None:
        """Count a connection closed by a limit."""
        self.forget(connection)
        if reason and self._on_dropped is not None:
            self._on_dropped(reason)

    def close_all(self) -> None:
        """Close every connection still open (the server is stopping)."""
        for connection in list(self._open):
            connection.drop("")

    def _refused(self) -> None:
        if self._on_dropped is not None:
            self._on_dropped("refused")
        self._refused_unlogged += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= REFUSAL_LOG_INTERVAL:
            log.warning(
                "refused %d HTTP connection(s) on %s: %d are open, each busy with a request "
                "(HttpLimits.max_connections)",
                self._refused_unlogged,
                self.address,
                len(self._open),
                extra={"event": "http_connections_refused"},
            )
            self._refused_unlogged = 0
            self._refusal_logged_at = now


def _answer_of(raised: web.HTTPException) -> web.Response:
    """The response a raised HTTP exception stands for (aiohttp deprecates returning one)."""
    return web.Response(
        status=raised.status, reason=raised.reason, headers=raised.headers, body=raised.body
    )


@web.middleware
async def _within_deadlines(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time a request from its head to its answer, written here so the writing is timed too."""
    transport = request.transport
    connection = transport.get_protocol() if transport is not None else None
    if not isinstance(connection, _Connection):  # the application served some other way
        return await handler(request)
    connections = connection._connections  # noqa: SLF001 - the two classes work as one
    connections.request_started(connection)
    try:
        try:
            response = await handler(request)
        except web.HTTPException as raised:
            # The dashboard's redirects and the router's 404s are raised: left to aiohttp,
            # they were written after `request_answered` below, while the connection counted
            # as idle (evictable, under the keep-alive timer). Written here like the others.
            response = _answer_of(raised)
        except ConnectionError:
            if request.transport is not None:
                raise
            # The connection is gone (the client left, or a limit cut it off while its body
            # was read): there is no one to answer, and nothing worth a traceback.
            return web.Response(status=400)
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away (or was cut off): aiohttp notes it at debug level
        return response
    finally:
        connections.request_answered(connection)


class HttpServer:
    """Runs an aiohttp application on one address until stopped, within `HttpLimits`."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        limits: HttpLimits | None = None,
        on_dropped: Callable[[str], None] | None = None,
        stop_grace: float = HTTP_STOP_GRACE,
    ) -> None:
        """Nothing listens until `start`; with `ssl_context` the address speaks HTTPS.

        `stop_grace`: how long `stop` lets the requests in progress finish before it
        closes their connections.

        `on_dropped` is told of each connection a limit closed or refused, by reason:
        `request_head_timeout`, `answer_timeout`, `evicted` (closed for a new one while it
        waited for a request) or `refused` (the 503 past the limit).
        """
        self.limits = limits if limits is not None else HttpLimits()
        app.middlewares.append(_within_deadlines)
        # aiohttp's own idle timer agrees with ours (by default it waits an hour).
        self._runner = web.AppRunner(
            app,
            access_log=None,
            keepalive_timeout=self.limits.keepalive_timeout.total_seconds(),
            # aiohttp waits 60 s by default: a client that announced a body and stalled
            # (or one whose unread body aiohttp lingers over) held a stopping server until
            # the answer timeout cut it off, 30 s, past a typical termination grace period.
            shutdown_timeout=stop_grace,
        )
        self._host = host
        self._port = port
        self._ssl_context = ssl_context
        self._on_dropped = on_dropped
        self._listener: asyncio.Server | None = None
        self._connections: _Connections | None = None
        self.port: int | None = None

    @property
    def open_connections(self) -> int:
        """How many connections are open now."""
        return len(self._connections) if self._connections is not None else 0

    @property
    def busy_connections(self) -> int:
        """How many of them have a request in progress (read, not yet fully answered)."""
        return self._connections.busy if self._connections is not None else 0

    async def start(self) -> int:
        """Listen; return the bound port (useful with port 0)."""
        await self._runner.setup()
        handlers = self._runner.server
        assert handlers is not None  # noqa: S101 - set up just above
        self._connections = _Connections(
            self.limits, handlers, self._on_dropped, f"{self._host}:{self._port}"
        )
        # aiohttp's server is itself the protocol factory its sites hand the event loop;
        # serving it through our own lets every connection be counted and timed.
        self._listener = await asyncio.get_running_loop().create_server(
            self._connections.connection,
            self._host,
            self._port,
            ssl=self._ssl_context,
            # A TLS handshake must finish as soon as a request's head must arrive.
            ssl_handshake_timeout=self.limits.request_head_timeout.total_seconds()
            if self._ssl_context is not None
            else None,
        )
        self.port = int(self._listener.sockets[0].getsockname()[1])
        self._connections.address = f"{self._host}:{self.port}"
        return self.port

    async def stop(self) -> None:
        """Stop listening and close every connection (safe to call twice)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        try:
            await self._runner.cleanup()
        finally:
            if self._connections is not None:
                self._connections.close_all()
