"""The server's HTTP endpoints: /healthz, /readyz, /status (JSON), /metrics, and the /ui dashboard.

This module knows nothing of the database or gRPC: the server hands it a `StatusSource`
that answers the questions, so the endpoints stay thin and testable on their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from conveyor.monitoring.dashboard.views import Dashboard

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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


def create_app(source: StatusSource, dashboard: Dashboard | None = None) -> web.Application:
    """The aiohttp application serving the monitoring endpoints (and /ui if given a source)."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        ready, checks = await source.readiness()
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def status(_request: web.Request) -> web.Response:
        return web.json_response(await source.status())

    async def metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=source.metrics_text())
        response.headers["Content-Type"] = PROMETHEUS_CONTENT_TYPE
        return response

    app = web.Application()
    routes: list[tuple[str, Callable[[web.Request], Awaitable[web.Response]]]] = [
        ("/healthz", healthz),
        ("/readyz", readyz),
        ("/status", status),
        ("/metrics", metrics),
    ]
    for path, handler in routes:
        app.router.add_get(path, handler)
    if dashboard is not None:
        dashboard.register(app)
    return app


class HttpServer:
    """Runs `create_app(source)` on one address until stopped."""

    def __init__(
        self,
        source: StatusSource,
        host: str,
        port: int,
        dashboard: Dashboard | None = None,
    ) -> None:
        """Nothing listens until `start`."""
        self._runner = web.AppRunner(create_app(source, dashboard), access_log=None)
        self._host = host
        self._port = port
        self.port: int | None = None

    async def start(self) -> int:
        """Listen; return the bound port (useful with port 0)."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stop listening (safe to call twice)."""
        await self._runner.cleanup()
