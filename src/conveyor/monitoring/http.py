"""The server's HTTP endpoints: /healthz, /readyz, /status (JSON), /metrics, and the /ui dashboard.

/healthz and /readyz are always open: load balancers and orchestrators probe them without
credentials, and they reveal only whether this server can serve. With authentication on,
/status and /metrics need `Authorization: Bearer <token>` of a role that may read the
cluster, refused with a JSON body (401 for no or a bad token, 403 for a role without the
permission). Without it they answer only to the names `hosts` allows (421 otherwise), as
the dashboard does, so a web page cannot read them through DNS rebinding. /metrics may
instead be served alone on an address of its own (`create_metrics_app`), typically one only
the cluster's scraper can reach, without a token or a name check. Each address is served
by an `HttpServer`, over TLS when given an SSL context. This module knows nothing of the
database or gRPC: the server hands it a `StatusSource` that answers the questions, and an
`authenticate` callable that turns a token into a principal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Protocol

from aiohttp import web

from conveyor.auth import Permission, bearer_token
from conveyor.errors import Unauthenticated
from conveyor.monitoring.hosts import host_allowed

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable

    from conveyor.auth import Principal
    from conveyor.monitoring.dashboard.views import Dashboard

PROMETHEUS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


class StatusSource(Protocol):
    """What the HTTP endpoints ask the server."""

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether the server can serve requests now, and the checks behind the answer."""
        ...

    async def status(self) -> dict[str, Any]:
        """The JSON document behind /status."""
        ...

    def metrics_text(self) -> bytes:
        """Prometheus text exposition."""
        ...


def _metrics_endpoint(source: StatusSource) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=source.metrics_text())
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
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """`endpoint`, answered only for a bearer token of a role that may read the cluster."""

    async def protected(request: web.Request) -> web.Response:
        try:
            principal = authenticate(bearer_token(request.headers.get("Authorization")))
        except Unauthenticated as exc:
            return _refusal(401, "unauthenticated", exc.message)
        if not principal.may(Permission.READ_CLUSTER):
            return _refusal(
                403,
                "permission_denied",
                f"{request.path} needs the {Permission.READ_CLUSTER.value} permission, which "
                f"the {principal.role.value} role of {principal.name!r} does not have",
            )
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
    allowed_hosts: frozenset[str] = frozenset(),
    metrics: bool = True,
) -> web.Application:
    """The aiohttp application serving the monitoring endpoints (and /ui if given a source).

    `authenticate` (a token to its principal, raising Unauthenticated) puts /status and
    /metrics behind a bearer token; None leaves them open to requests that name the server
    by IP address, localhost or one of `allowed_hosts` (lower case). `metrics` False leaves
    /metrics out, for a server that serves it on an address of its own.
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
            else _bearer_protected(handler, authenticate),
        )
    if dashboard is not None:
        dashboard.register(app)
    return app


def create_metrics_app(source: StatusSource) -> web.Application:
    """An application serving /metrics alone, without authentication (an internal address)."""
    app = web.Application()
    app.router.add_get("/metrics", _metrics_endpoint(source))
    return app


class HttpServer:
    """Runs an aiohttp application on one address until stopped."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Nothing listens until `start`; with `ssl_context` the address speaks HTTPS."""
        self._runner = web.AppRunner(app, access_log=None)
        self._host = host
        self._port = port
        self._ssl_context = ssl_context
        self.port: int | None = None

    async def start(self) -> int:
        """Listen; return the bound port (useful with port 0)."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._ssl_context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stop listening (safe to call twice)."""
        await self._runner.cleanup()
