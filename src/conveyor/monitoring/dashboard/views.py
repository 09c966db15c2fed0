"""The dashboard's pages and actions under /ui, rendered on the server with Jinja2.

Pages: overview (throughput and failures per minute over the last hour, the queue by type
with pause and resume, workers), tasks (filters, search by id, keyset pages), a task's
detail (its timeline of attempts as a chart, its explanation, payload preview, history,
retry or cancel), and workers. Every page costs a bounded number of indexed queries or
none (the overview reads the stats sampler's snapshot), so it stays fast on millions of
tasks. Actions are HTML form POSTs answered with a redirect (post/redirect/get); a POST
whose Origin is another site is refused, which stops cross-site form submissions until
logins and CSRF tokens arrive with the security work. The data comes from a
`DashboardSource`, so this module knows nothing of the database or gRPC.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import quote, urlencode, urlsplit

import jinja2
from aiohttp import web

from conveyor.errors import ConveyorError, InvalidTask, ServerUnavailable, TaskNotFound
from conveyor.monitoring.dashboard.charts import failure_chart, task_timeline, throughput_chart
from conveyor.monitoring.preview import as_text
from conveyor.types import TASK_TYPE_PATTERN, TaskState

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from conveyor.types import (
        BulkResult,
        ClusterStatus,
        TaskDetail,
        TaskPage,
        WorkerInfo,
    )

PAGE_SIZE: Final = 50
PAYLOAD_PREVIEW: Final = 2000


class DashboardSource(Protocol):
    """What the dashboard asks of the server."""

    async def cluster_status(self) -> ClusterStatus:
        """The status numbers (sampled)."""
        ...

    def chart_minutes(self) -> dict[datetime, dict[str, int]]:
        """Outcomes per minute over the last hour (sampled)."""
        ...

    async def list_tasks(
        self, states: tuple[TaskState, ...], task_type: str | None, limit: int, page_token: str
    ) -> TaskPage:
        """One page of tasks, newest first."""
        ...

    async def task_detail(self, task_id: str) -> TaskDetail:
        """A task with history, payload and explanation."""
        ...

    async def workers(self) -> list[WorkerInfo]:
        """Registered workers that are not stopped."""
        ...

    async def retry_task(self, task_id: str) -> BulkResult:
        """Retry one failed or cancelled task."""
        ...

    async def cancel_task(self, task_id: str) -> BulkResult:
        """Cancel one queued or running task."""
        ...

    async def pause_type(self, task_type: str) -> bool:
        """Stop leasing a type."""
        ...

    async def resume_type(self, task_type: str) -> bool:
        """Lease a type again."""
        ...


def _age(seconds: float) -> str:
    if seconds < 60:  # noqa: PLR2004 - seconds read best below a minute
        return f"{seconds:.1f}s"
    if seconds < 3600:  # noqa: PLR2004 - minutes below an hour
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _since(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return _age(max((datetime.now(UTC) - moment).total_seconds(), 0)) + " ago"


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def payload_preview(head: bytes | None, size: int) -> tuple[str, str]:
    """(how it is shown, the preview) of a payload's first bytes: text, else hex."""
    if head is None:
        return ("none", "")
    text = as_text(head, complete=len(head) >= size)
    if text is not None:
        return ("text", text)
    return ("hex", head.hex(" "))


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("conveyor.monitoring.dashboard", "templates"),
        autoescape=jinja2.select_autoescape(["html", "svg"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["age"] = _age
    environment.filters["since"] = _since
    environment.filters["when"] = _when
    return environment


# Notices are chosen by code, never taken as text from the URL: a crafted link cannot make
# the dashboard display a message of an attacker's choosing.
NOTICES: Final = {
    "retried": "Retried: queued again as a new series of attempts.",
    "not-retried": "Not retried: only failed or cancelled tasks can be retried.",
    "cancelled": "Cancelled.",
    "not-cancelled": "Not cancelled: only queued or running tasks can be cancelled.",
    "paused": "Paused {type}.",
    "already-paused": "{type} was already paused.",
    "resumed": "Resumed {type}.",
    "not-paused": "{type} was not paused.",
}
# Every dashboard response: no framing (clickjacking), no third-party anything, no caching
# of pages that show payloads.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def _notice(request: web.Request) -> str | None:
    template = NOTICES.get(request.query.get("notice", ""))
    if template is None:
        return None
    task_type = request.query.get("type", "")
    return template.format(type=task_type if TASK_TYPE_PATTERN.fullmatch(task_type) else "the type")


def _host_allowed(request: web.Request, allowed: frozenset[str]) -> bool:
    """Whether the Host header names this dashboard, which defeats DNS rebinding.

    A rebinding attack reaches a loopback dashboard under the attacker's own domain name;
    an IP literal or `localhost` cannot be such a name, and other names must be listed
    (`--dashboard-allowed-host`).
    """
    hostname = urlsplit(f"//{request.host}").hostname or ""
    if hostname == "localhost" or hostname in allowed:
        return True
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


def _http_status(error: ConveyorError) -> int:
    if isinstance(error, TaskNotFound):
        return 404
    if isinstance(error, InvalidTask):
        return 400
    if isinstance(error, ServerUnavailable):
        return 503
    return 500


def _same_origin(request: web.Request) -> bool:
    """Whether a POST comes from a page of this dashboard (browsers always send Origin)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser form (curl, scripts): no ambient credentials to abuse
    return urlsplit(origin).netloc == request.host


class Dashboard:
    """Registers the /ui routes on an aiohttp application."""

    def __init__(
        self, source: DashboardSource, *, allowed_hosts: frozenset[str] = frozenset()
    ) -> None:
        """Pages read from `source`; served under IP addresses, localhost and `allowed_hosts`."""
        self._source = source
        self._allowed_hosts = frozenset(host.lower() for host in allowed_hosts)
        self._templates = _environment()

    def register(self, app: web.Application) -> None:
        """Add every dashboard route to `app`."""
        get: list[tuple[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
            ("/ui", self.overview),
            ("/ui/", self.overview),
            ("/ui/tasks", self.tasks),
            ("/ui/tasks/{task_id}", self.task),
            ("/ui/workers", self.workers),
            ("/ui/static/style.css", self.stylesheet),
        ]
        for path, handler in get:
            app.router.add_get(path, self._guarded(handler))
        post: list[tuple[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
            ("/ui/tasks/{task_id}/retry", self.retry),
            ("/ui/tasks/{task_id}/cancel", self.cancel),
            ("/ui/types/{task_type}/pause", self.pause),
            ("/ui/types/{task_type}/resume", self.resume),
        ]
        for path, handler in post:
            app.router.add_post(path, self._guarded(handler))

    def _guarded(
        self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Turn Conveyor errors into an error page with a fitting HTTP status."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                response = await answer(request)
            except web.HTTPException as redirect:  # post/redirect/get
                redirect.headers.update(SECURITY_HEADERS)
                raise
            response.headers.update(SECURITY_HEADERS)
            return response

        async def answer(request: web.Request) -> web.StreamResponse:
            if not _host_allowed(request, self._allowed_hosts):
                return self._error(
                    421,
                    f"This dashboard is not served under the name {request.host!r}. Open it by "
                    "IP address or localhost, or start the server with "
                    "--dashboard-allowed-host NAME.",
                )
            if request.method == "POST" and not _same_origin(request):
                return self._error(403, "This action was submitted from another site.")
            try:
                return await handler(request)
            except ConveyorError as exc:
                return self._error(_http_status(exc), exc.message)

        return guarded

    def _render(self, template: str, *, http_status: int = 200, **context: Any) -> web.Response:
        defaults = {"now": datetime.now(UTC), "refresh": None, "notice": None}
        body = self._templates.get_template(template).render({**defaults, **context})
        response = web.Response(text=body, status=http_status, content_type="text/html")
        response.headers["Cache-Control"] = "no-store"
        return response

    def _error(self, status: int, message: str) -> web.Response:
        return self._render("error.html", http_status=status, page="error", message=message)

    # --- pages ---------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        """Charts, the queue by type, workers."""
        status = await self._source.cluster_status()
        minutes = self._source.chart_minutes()
        now = datetime.now(UTC)
        finished = status.succeeded_last_minute + status.failed_last_minute
        return self._render(
            "overview.html",
            page="overview",
            status=status,
            chart=throughput_chart(minutes, now=now),
            failures=failure_chart(minutes, now=now),
            queued=sum(item.queued for item in status.types),
            running=sum(item.running for item in status.types),
            oldest=max((item.oldest_queued_seconds for item in status.types), default=0.0),
            failure_rate=status.failed_last_minute / finished if finished else 0.0,
            notice=_notice(request),
            refresh="/ui",
        )

    async def tasks(self, request: web.Request) -> web.StreamResponse:
        """The task list with filters, search by id and keyset paging."""
        search = request.query.get("id", "").strip()
        if search:
            raise web.HTTPSeeOther(f"/ui/tasks/{quote(search, safe='')}")
        try:
            states = tuple(TaskState(value) for value in request.query.getall("state", []))
        except ValueError:
            raise InvalidTask("unknown task state in the filter") from None
        task_type = request.query.get("type", "").strip() or None
        cursor = request.query.get("page", "")
        page = await self._source.list_tasks(states, task_type, PAGE_SIZE, cursor)
        filters = [("state", state.value) for state in states]
        if task_type:
            filters.append(("type", task_type))
        next_query = None
        if page.next_page_token:
            next_query = urlencode([*filters, ("page", page.next_page_token)])
        return self._render(
            "tasks.html",
            page="tasks",
            tasks=page.tasks,
            states=list(TaskState),
            selected={state.value for state in states},
            task_type=task_type or "",
            next_query=next_query,
            first_query=urlencode(filters),
            first_page=not cursor,
        )

    async def task(self, request: web.Request) -> web.Response:
        """One task: timeline chart, explanation, payload, history, actions."""
        detail = await self._source.task_detail(request.match_info["task_id"])
        status = detail.status
        kind, preview = payload_preview(status.payload, detail.payload_size)
        return self._render(
            "task.html",
            page="tasks",
            task=status,
            detail=detail,
            timeline=task_timeline(
                status.history, now=datetime.now(UTC), live=not status.state.is_final
            ),
            payload_kind=kind,
            payload_preview=preview,
            payload_size=detail.payload_size,
            can_retry=status.state in (TaskState.FAILED, TaskState.CANCELLED),
            can_cancel=status.state in (TaskState.QUEUED, TaskState.RUNNING),
            notice=_notice(request),
        )

    async def workers(self, _request: web.Request) -> web.Response:
        """Workers with their state, load and last heartbeat."""
        return self._render(
            "workers.html",
            page="workers",
            workers=await self._source.workers(),
            refresh="/ui/workers",
        )

    async def stylesheet(self, _request: web.Request) -> web.Response:
        """The one stylesheet (cached by the browser for an hour)."""
        loader = self._templates.loader
        assert loader is not None  # noqa: S101 - set in _environment
        css, _, _ = loader.get_source(self._templates, "style.css")
        response = web.Response(text=css, content_type="text/css")
        response.headers["Cache-Control"] = "max-age=3600"
        return response

    # --- actions -------------------------------------------------------------------------

    async def retry(self, request: web.Request) -> web.StreamResponse:
        """Retry a failed or cancelled task, then show it."""
        task_id = request.match_info["task_id"]
        result = await self._source.retry_task(task_id)
        notice = "retried" if result.changed else "not-retried"
        raise web.HTTPSeeOther(f"/ui/tasks/{quote(task_id, safe='')}?notice={notice}")

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        """Cancel a queued or running task, then show it."""
        task_id = request.match_info["task_id"]
        result = await self._source.cancel_task(task_id)
        notice = "cancelled" if result.changed else "not-cancelled"
        raise web.HTTPSeeOther(f"/ui/tasks/{quote(task_id, safe='')}?notice={notice}")

    async def pause(self, request: web.Request) -> web.StreamResponse:
        """Pause a type, then back to the overview."""
        task_type = request.match_info["task_type"]
        changed = await self._source.pause_type(task_type)
        notice = "paused" if changed else "already-paused"
        raise web.HTTPSeeOther(f"/ui?{urlencode({'notice': notice, 'type': task_type})}")

    async def resume(self, request: web.Request) -> web.StreamResponse:
        """Resume a type, then back to the overview."""
        task_type = request.match_info["task_type"]
        changed = await self._source.resume_type(task_type)
        notice = "resumed" if changed else "not-paused"
        raise web.HTTPSeeOther(f"/ui?{urlencode({'notice': notice, 'type': task_type})}")
