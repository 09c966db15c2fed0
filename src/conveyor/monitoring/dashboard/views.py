"""The dashboard's pages and actions under /ui, rendered on the server with Jinja2.

Pages: overview (throughput and failures per minute over the last hour, the queue by type
with pause and resume, workers), tasks (filters, search by id, keyset pages), a task's
detail (its timeline of attempts as a chart, its explanation, payload preview, history,
retry or cancel), and workers. Every page costs a bounded number of indexed queries or
none (the overview reads the stats sampler's snapshot), so it stays fast on millions of
tasks. Actions are HTML form POSTs answered with a redirect (post/redirect/get). Every
request must name this dashboard in its Host header (against DNS rebinding), and a POST
whose Origin is another site is refused. With authentication on, the dashboard also owns
its logins: a token typed into /ui/login becomes a signed session cookie (see `sessions`),
every page needs one, every POST carries the session's CSRF token, and only roles with the
operate permission see or may use the actions. The data comes from a `DashboardSource`, so
this module knows nothing of the database or gRPC.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias
from urllib.parse import quote, urlencode, urlsplit

import jinja2
from aiohttp import web

from conveyor.auth import ANONYMOUS, Permission, Principal
from conveyor.codec import is_sealed, sealed_key_id, shown_text
from conveyor.errors import (
    ConveyorError,
    InvalidTask,
    PermissionDenied,
    ServerUnavailable,
    TaskNotFound,
    Unauthenticated,
)
from conveyor.monitoring.dashboard.charts import failure_chart, task_timeline, throughput_chart
from conveyor.monitoring.dashboard.sessions import COOKIE_NAME, DEFAULT_LIFETIME, Sessions
from conveyor.monitoring.hosts import host_allowed
from conveyor.monitoring.preview import as_text
from conveyor.text import utc_time
from conveyor.types import TASK_TYPE_PATTERN, OtherTypes, TaskState

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from conveyor.auth import TokenEntry
    from conveyor.types import (
        BulkResult,
        ClusterStatus,
        TaskDetail,
        TaskPage,
        TypeStatus,
        WorkerPage,
    )

PAGE_SIZE: Final = 50
PAYLOAD_PREVIEW: Final = 2000
# Rows of the overview's queue by type, besides the paused types (always listed, so each
# can be resumed from there): a page redrawn every 10 s is no place for a thousand.
OVERVIEW_TYPES: Final = 100


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

    async def task_detail(self, task_id: str, *, before: int | None = None) -> TaskDetail:
        """A task with payload, explanation and a page of its history (see TaskControl)."""
        ...

    async def workers(self) -> WorkerPage:
        """The first page of registered workers that are not stopped, with their total."""
        ...

    async def retry_task(self, task_id: str, *, actor: str) -> BulkResult:
        """Retry one failed or cancelled task."""
        ...

    async def cancel_task(self, task_id: str, *, actor: str) -> BulkResult:
        """Cancel one queued or running task."""
        ...

    async def pause_type(self, task_type: str, *, actor: str) -> bool:
        """Stop leasing a type."""
        ...

    async def record_login(self, *, actor: str, role: str) -> None:
        """Write a dashboard login to the audit log."""
        ...

    async def resume_type(self, task_type: str, *, actor: str) -> bool:
        """Lease a type again."""
        ...


def _age(seconds: float) -> str:
    if seconds < 60:  # noqa: PLR2004 - seconds read best below a minute
        return f"{seconds:.1f}s"
    if seconds < 3600:  # noqa: PLR2004 - minutes below an hour
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _since(moment: datetime | timedelta | None) -> str:
    """How long ago: a moment (by this server's clock), or an age measured elsewhere."""
    if moment is None:
        return "-"
    ago = moment if isinstance(moment, timedelta) else datetime.now(UTC) - moment
    return _age(max(ago.total_seconds(), 0)) + " ago"


def _when(moment: datetime | None, *, precise: bool = False) -> str:
    """A moment as every view shows it; a task's own times `precise`, as the CLI's."""
    return "-" if moment is None else utc_time(moment, precise=precise)


def payload_preview(head: bytes | None, size: int) -> tuple[str, str]:
    """(how it is shown, the preview) of a payload's first bytes: text, else hex.

    A payload sealed by a client's codec is shown as such: the server has no key, and its
    ciphertext as hex would only look like data.
    """
    if head is None:
        return ("none", "")
    if is_sealed(head):
        return ("encrypted", f"encrypted by the producer (key {sealed_key_id(head) or '?'})")
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
    environment.filters["unsealed"] = shown_text
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
LOGIN_NOTICES: Final = {
    "logged-out": "You are logged out.",
    "ended": "Your session has ended (it expired, or its token was removed). Log in again.",
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
LOGIN_PATH: Final = "/ui/login"
COOKIE_PATH: Final = "/ui"
# Longer than any URL a page of this dashboard links to; a longer `next` is not one of ours.
MAX_NEXT_LENGTH: Final = 2048


@dataclass(frozen=True, slots=True)
class Visit:
    """Who is asking for a page, and the CSRF token that page's forms must carry.

    With authentication off the visitor is ANONYMOUS (an admin) and forms carry no token:
    the server is then reachable from loopback only. With it on, a visitor to the login
    page has no principal at all until the login succeeds.
    """

    principal: Principal | None
    csrf: str = ""
    signed_in: bool = False

    @property
    def actor(self) -> str:
        """Who the history records for an action (actions need a principal to get here)."""
        return self.principal.actor if self.principal is not None else "unknown"

    @property
    def can_operate(self) -> bool:
        """Whether the visitor may use the actions (retry, cancel, pause, resume)."""
        return self.principal is not None and self.principal.may(Permission.OPERATE)

    def require(self, permission: Permission, action: str) -> None:
        """Raise PermissionDenied (Unauthenticated without a principal) unless allowed."""
        if self.principal is None:
            raise Unauthenticated(f"{action} needs a login")
        self.principal.require(permission, action)


# A page or action: the request, and who is asking.
Handler: TypeAlias = "Callable[[web.Request, Visit], Awaitable[web.StreamResponse]]"


def _notice(request: web.Request) -> str | None:
    template = NOTICES.get(request.query.get("notice", ""))
    if template is None:
        return None
    task_type = request.query.get("type", "")
    return template.format(type=task_type if TASK_TYPE_PATTERN.fullmatch(task_type) else "the type")


def _need(item: TypeStatus) -> tuple[float, int, int, str]:
    """Sort key: the types that most need attention first, as the server ranks them."""
    return (-item.oldest_queued_seconds, -item.queued, -item.running, item.type)


def overview_types(status: ClusterStatus) -> tuple[list[TypeStatus], OtherTypes]:
    """The overview's rows by name, and the sum of all the types it does not list.

    Listed: the OVERVIEW_TYPES types of `status` that most need attention, and every
    paused type. Summed: the others, whether `status` listed them or not.
    """
    ranked = sorted(status.types, key=_need)
    shown = [item for rank, item in enumerate(ranked) if rank < OVERVIEW_TYPES or item.paused]
    hidden = [item for item in ranked[OVERVIEW_TYPES:] if not item.paused]
    other = status.other_types
    summed = OtherTypes(
        types=other.types + len(hidden),
        queued=other.queued + sum(item.queued for item in hidden),
        running=other.running + sum(item.running for item in hidden),
        oldest_queued_seconds=max(
            [other.oldest_queued_seconds, *(item.oldest_queued_seconds for item in hidden)]
        ),
    )
    return sorted(shown, key=lambda item: item.type), summed


def _http_status(error: ConveyorError) -> int:
    if isinstance(error, TaskNotFound):
        return 404
    if isinstance(error, InvalidTask):
        return 400
    if isinstance(error, Unauthenticated):
        return 401
    if isinstance(error, PermissionDenied):
        return 403
    if isinstance(error, ServerUnavailable):
        return 503
    return 500


def _same_origin(request: web.Request) -> bool:
    """Whether a POST comes from a page of this dashboard (browsers always send Origin)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser form (curl, scripts): no ambient credentials to abuse
    try:
        return urlsplit(origin).netloc == request.host
    except ValueError:
        return False


def _safe_next(value: object) -> str:
    """Where to go after logging in: a dashboard page, never another site (open redirect)."""
    if (
        not isinstance(value, str)
        or len(value) > MAX_NEXT_LENGTH
        or not value.isascii()
        or not value.isprintable()
        or any(char in value for char in " \\")
    ):
        return "/ui"
    try:
        parts = urlsplit(value)
    except ValueError:
        return "/ui"
    if parts.scheme or parts.netloc or not (parts.path == "/ui" or parts.path.startswith("/ui/")):
        return "/ui"
    if parts.path in (LOGIN_PATH, "/ui/logout"):
        return "/ui"
    return value


def _see_other(location: str) -> web.Response:
    """A 303 redirect that is returned, not raised, so it can carry cookies."""
    return web.Response(status=303, headers={"Location": location})


class Dashboard:
    """Registers the /ui routes on an aiohttp application."""

    def __init__(
        self,
        source: DashboardSource,
        *,
        allowed_hosts: frozenset[str] = frozenset(),
        authenticate: Callable[[str | None], Principal] | None = None,
        on_denied: Callable[[str, PermissionDenied, Principal], None] | None = None,
        token_entry: Callable[[str], TokenEntry | None] | None = None,
        session_secret: bytes | None = None,
        session_lifetime: timedelta = DEFAULT_LIFETIME,
    ) -> None:
        """Pages read from `source`; served under IP addresses, localhost and `allowed_hosts`.

        With `authenticate` (a token to its principal, raising Unauthenticated) the dashboard
        asks for a login, and `token_entry` (a token id to its current entry in the tokens
        file) is required to check sessions; `on_denied` hears of each logged-in visitor or
        token refused for its role. Sessions are signed with `session_secret`;
        None draws a random one, so sessions then last only as long as this process.
        """
        self._source = source
        self._allowed_hosts = frozenset(host.lower() for host in allowed_hosts)
        self._templates = _environment()
        self._authenticate = authenticate
        self._on_denied = on_denied
        self._sessions: Sessions | None = None
        if authenticate is not None:
            if token_entry is None:
                raise ValueError("a dashboard with logins needs `token_entry` to check sessions")
            self._sessions = Sessions(
                session_secret if session_secret is not None else secrets.token_bytes(32),
                token_entry,
                lifetime=session_lifetime,
            )

    def register(self, app: web.Application) -> None:
        """Add every dashboard route to `app`."""
        operate = Permission.OPERATE
        get: list[tuple[str, Handler]] = [
            ("/ui", self.overview),
            ("/ui/", self.overview),
            ("/ui/tasks", self.tasks),
            ("/ui/tasks/{task_id}", self.task),
            ("/ui/workers", self.workers),
        ]
        for path, handler in get:
            app.router.add_get(path, self._guarded(handler, Permission.READ_CLUSTER))
        post: list[tuple[str, Handler, Permission]] = [
            ("/ui/tasks/{task_id}/retry", self.retry, operate),
            ("/ui/tasks/{task_id}/cancel", self.cancel, operate),
            # The type is a form field, not a path segment: browsers resolve `.` and `..`
            # segments (valid type names) away before the form is sent.
            ("/ui/types/pause", self.pause, operate),
            ("/ui/types/resume", self.resume, operate),
        ]
        if self._sessions is not None:
            # Anyone signed in may sign out; the CSRF token still guards it.
            post.append(("/ui/logout", self.logout, Permission.READ_CLUSTER))
        for path, handler, permission in post:
            app.router.add_post(path, self._guarded(handler, permission))
        # Reachable without a session: the login itself, and the stylesheet it is drawn with.
        app.router.add_get("/ui/static/style.css", self._guarded(self.stylesheet, None))
        if self._sessions is not None:
            app.router.add_get(LOGIN_PATH, self._guarded(self.login_page, None))
            app.router.add_post(LOGIN_PATH, self._guarded(self.login, None))

    def _guarded(
        self,
        handler: Handler,
        permission: Permission | None,
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Check host, origin, session, CSRF token and role; turn errors into error pages.

        `permission` None marks a route open to visitors without a session.
        """

        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                response = await answer(request)
            except web.HTTPException as redirect:  # post/redirect/get
                redirect.headers.update(SECURITY_HEADERS)
                raise
            response.headers.update(SECURITY_HEADERS)
            return response

        async def answer(request: web.Request) -> web.StreamResponse:
            admitted = await self._admit(request, permission is not None)
            if isinstance(admitted, web.StreamResponse):
                return admitted
            try:
                if permission is not None:
                    admitted.require(permission, _action_name(request))
                return await handler(request, admitted)
            except ConveyorError as exc:
                if isinstance(exc, PermissionDenied) and admitted.principal is not None:
                    self._denied(_action_name(request), exc, admitted.principal)
                return self._error(_http_status(exc), exc.message, admitted)

        return guarded

    def _denied(self, action: str, refusal: PermissionDenied, principal: Principal) -> None:
        if self._on_denied is not None:
            self._on_denied(action, refusal, principal)

    async def _admit(self, request: web.Request, needs_session: bool) -> Visit | web.Response:
        """The visit a request makes, or the answer that turns it away.

        The Host header first (a rebinding page must learn nothing), then a POST's Origin,
        then, with logins on and unless the route is open, the session and a POST's CSRF
        token.
        """
        if not host_allowed(request.host, self._allowed_hosts):
            return self._error(
                421,
                f"This dashboard is not served under the name {request.host!r}. Open it by "
                "IP address or localhost, or start the server with "
                "--dashboard-allowed-host NAME.",
            )
        if request.method == "POST" and not _same_origin(request):
            return self._error(403, "This action was submitted from another site.")
        if self._sessions is None or not needs_session:
            return Visit(ANONYMOUS if self._sessions is None else None)
        session = self._sessions.open(request.cookies.get(COOKIE_NAME))
        if session is None:
            return self._to_login(request)
        visit = Visit(session.principal, session.csrf, signed_in=True)
        if request.method == "POST":
            form = await _form(request)
            if not self._sessions.csrf_matches(session, form.get("csrf")):
                return self._error(
                    403,
                    "This form has expired or did not come from this dashboard. "
                    "Go back, reload the page and try again.",
                    visit,
                )
        return visit

    def _to_login(self, request: web.Request) -> web.Response:
        """Send a visitor without a (valid) session to the login page, and back after it."""
        query: dict[str, str] = {}
        if request.method == "GET" and request.path not in ("/ui", "/ui/"):
            query["next"] = _safe_next(request.raw_path)
        if COOKIE_NAME in request.cookies:
            query["notice"] = "ended"
            response = _see_other(f"{LOGIN_PATH}?{urlencode(query)}")
            self._clear_cookie(request, response)
        else:
            response = _see_other(f"{LOGIN_PATH}?{urlencode(query)}" if query else LOGIN_PATH)
        return response

    def _clear_cookie(self, request: web.Request, response: web.StreamResponse) -> None:
        response.del_cookie(
            COOKIE_NAME, path=COOKIE_PATH, secure=request.secure, httponly=True, samesite="Strict"
        )

    def _render(
        self,
        template: str,
        *,
        visit: Visit | None = None,
        http_status: int = 200,
        **context: Any,
    ) -> web.Response:
        defaults = {
            "now": datetime.now(UTC),
            "refresh": None,
            "notice": None,
            "user": visit.principal if visit is not None and visit.signed_in else None,
            "csrf": visit.csrf if visit is not None else "",
            "can_operate": visit is not None and visit.can_operate,
        }
        body = self._templates.get_template(template).render({**defaults, **context})
        response = web.Response(text=body, status=http_status, content_type="text/html")
        response.headers["Cache-Control"] = "no-store"
        return response

    def _error(self, status: int, message: str, visit: Visit | None = None) -> web.Response:
        return self._render(
            "error.html", visit=visit, http_status=status, page="error", message=message
        )

    # --- login ---------------------------------------------------------------------------

    async def login_page(self, request: web.Request, _visit: Visit) -> web.Response:
        """The login form (or straight on, for a visitor who already has a session)."""
        next_path = _safe_next(request.query.get("next"))
        if self._open_session(request):
            return _see_other(next_path)
        notice = LOGIN_NOTICES.get(request.query.get("notice", ""))
        return self._login_form(next_path=next_path, notice=notice)

    async def login(self, request: web.Request, _visit: Visit) -> web.Response:
        """Check a token; if its role may view the cluster, start a session."""
        assert self._authenticate is not None  # noqa: S101 - routed only with logins on
        assert self._sessions is not None  # noqa: S101
        form = await _form(request)
        next_path = _safe_next(form.get("next"))
        submitted = form.get("token")
        token = submitted.strip() if isinstance(submitted, str) else ""
        if not token:
            return self._login_form(401, next_path=next_path, error="Enter a token to log in.")
        try:
            principal = self._authenticate(token)
        except Unauthenticated as exc:
            return self._login_form(
                401, next_path=next_path, error=f"Not logged in: {exc.message}."
            )
        if not principal.may(Permission.READ_CLUSTER):
            self._denied(
                "the dashboard's login",
                PermissionDenied(f"the {principal.role.value} role cannot use the dashboard"),
                principal,
            )
            return self._login_form(
                403,
                next_path=next_path,
                error=f"The {principal.role.value} role of {principal.name!r} cannot use the "
                "dashboard. Log in with a viewer or admin token.",
            )
        value, max_age = self._sessions.issue(token, principal)
        # A login opens what an admin token can do to everyone's tasks: on the record.
        await self._source.record_login(actor=principal.actor, role=principal.role.value)
        response = _see_other(next_path)
        response.set_cookie(
            COOKIE_NAME,
            value,
            max_age=max_age,
            path=COOKIE_PATH,
            secure=request.secure,
            httponly=True,
            samesite="Strict",
        )
        return response

    async def logout(self, request: web.Request, _visit: Visit) -> web.Response:
        """End the session in this browser."""
        response = _see_other(f"{LOGIN_PATH}?notice=logged-out")
        self._clear_cookie(request, response)
        return response

    def _open_session(self, request: web.Request) -> bool:
        return (
            self._sessions is not None
            and self._sessions.open(request.cookies.get(COOKIE_NAME)) is not None
        )

    def _login_form(
        self,
        http_status: int = 200,
        *,
        next_path: str,
        error: str | None = None,
        notice: str | None = None,
    ) -> web.Response:
        return self._render(
            "login.html",
            http_status=http_status,
            page="login",
            next_path=next_path,
            session_hours=f"{self._sessions.lifetime / 3600:g}" if self._sessions else "",
            error=error,
            notice=notice,
        )

    # --- pages ---------------------------------------------------------------------------

    async def overview(self, request: web.Request, visit: Visit) -> web.Response:
        """Charts, the queue by type, workers."""
        status = await self._source.cluster_status()
        minutes = self._source.chart_minutes()
        now = datetime.now(UTC)
        finished = status.succeeded_last_minute + status.failed_last_minute
        types, other_types = overview_types(status)
        return self._render(
            "overview.html",
            visit=visit,
            page="overview",
            status=status,
            types=types,
            other_types=other_types,
            chart=throughput_chart(minutes, now=now),
            failures=failure_chart(minutes, now=now),
            queued=status.queued,
            running=status.running,
            oldest=status.oldest_queued_seconds,
            failure_rate=status.failed_last_minute / finished if finished else 0.0,
            notice=_notice(request),
            refresh="/ui",
        )

    async def tasks(self, request: web.Request, visit: Visit) -> web.StreamResponse:
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
            visit=visit,
            page="tasks",
            tasks=page.tasks,
            states=list(TaskState),
            selected={state.value for state in states},
            task_type=task_type or "",
            next_query=next_query,
            first_query=urlencode(filters),
            first_page=not cursor,
        )

    async def task(self, request: web.Request, visit: Visit) -> web.Response:
        """One task: timeline chart, explanation, payload, history, actions.

        The history is its first event and a page of the latest ones; `?before=ID` (the
        page's "older" link) shows the page before. The timeline draws the page.
        """
        before = _history_page(request.query.get("before"))
        detail = await self._source.task_detail(request.match_info["task_id"], before=before)
        status = detail.status
        # With events left out, the first event (the enqueue) is far from the rest: the
        # chart spans the page alone, or the omitted time would look like one long wait.
        drawn = status.history[1:] if status.history_omitted else status.history
        kind, preview = payload_preview(status.payload, detail.payload_size)
        return self._render(
            "task.html",
            visit=visit,
            page="tasks",
            task=status,
            detail=detail,
            timeline=task_timeline(
                drawn, now=datetime.now(UTC), live=before is None and not status.state.is_final
            ),
            older_page=before is not None,
            payload_kind=kind,
            payload_preview=preview,
            payload_size=detail.payload_size,
            can_retry=status.state in (TaskState.FAILED, TaskState.CANCELLED),
            can_cancel=status.state in (TaskState.QUEUED, TaskState.RUNNING),
            notice=_notice(request),
        )

    async def workers(self, _request: web.Request, visit: Visit) -> web.Response:
        """Workers with their state, load and last heartbeat; says so when some are left out."""
        listing = await self._source.workers()
        return self._render(
            "workers.html",
            visit=visit,
            page="workers",
            workers=listing.workers,
            total=listing.total,
            refresh="/ui/workers",
        )

    async def stylesheet(self, _request: web.Request, _visit: Visit) -> web.Response:
        """The one stylesheet (cached by the browser for an hour)."""
        loader = self._templates.loader
        assert loader is not None  # noqa: S101 - set in _environment
        css, _, _ = loader.get_source(self._templates, "style.css")
        response = web.Response(text=css, content_type="text/css")
        response.headers["Cache-Control"] = "max-age=3600"
        return response

    # --- actions -------------------------------------------------------------------------
    # `visit.principal` is who acts: the history and the audit log record it.

    async def retry(self, request: web.Request, visit: Visit) -> web.StreamResponse:
        """Retry a failed or cancelled task, then show it."""
        task_id = request.match_info["task_id"]
        result = await self._source.retry_task(task_id, actor=visit.actor)
        notice = "retried" if result.changed else "not-retried"
        raise web.HTTPSeeOther(f"/ui/tasks/{quote(task_id, safe='')}?notice={notice}")

    async def cancel(self, request: web.Request, visit: Visit) -> web.StreamResponse:
        """Cancel a queued or running task, then show it."""
        task_id = request.match_info["task_id"]
        result = await self._source.cancel_task(task_id, actor=visit.actor)
        notice = "cancelled" if result.changed else "not-cancelled"
        raise web.HTTPSeeOther(f"/ui/tasks/{quote(task_id, safe='')}?notice={notice}")

    async def pause(self, request: web.Request, visit: Visit) -> web.StreamResponse:
        """Pause the type the form names, then back to the overview."""
        task_type = await _form_type(request)
        changed = await self._source.pause_type(task_type, actor=visit.actor)
        notice = "paused" if changed else "already-paused"
        raise web.HTTPSeeOther(f"/ui?{urlencode({'notice': notice, 'type': task_type})}")

    async def resume(self, request: web.Request, visit: Visit) -> web.StreamResponse:
        """Resume the type the form names, then back to the overview."""
        task_type = await _form_type(request)
        changed = await self._source.resume_type(task_type, actor=visit.actor)
        notice = "resumed" if changed else "not-paused"
        raise web.HTTPSeeOther(f"/ui?{urlencode({'notice': notice, 'type': task_type})}")


def _history_page(value: str | None) -> int | None:
    """The `before` of a task page's URL: an event id, or None for the latest events."""
    if value is None:
        return None
    # ASCII digits only: str.isdigit() takes "²", which int() refuses (a 500 here).
    if not (value.isascii() and value.isdigit()) or len(value) > 19:  # noqa: PLR2004 - bigint digits
        raise InvalidTask("`before` must be an event id, as in the page's own links")
    return int(value)


def _action_name(request: web.Request) -> str:
    """How a refusal names what was attempted ("cancel", "the tasks page")."""
    if request.method == "POST":
        return request.path.rsplit("/", 1)[-1] or "this action"
    return "viewing the dashboard"


async def _form_type(request: web.Request) -> str:
    """The task type a pause or resume form names (checked by the action itself)."""
    task_type = (await _form(request)).get("type", "")
    if not task_type:
        raise InvalidTask("no task type given: the form's `type` field is empty", field="type")
    return task_type


async def _form(request: web.Request) -> dict[str, str]:
    """A POST's form fields; a body that is not a readable form counts as an empty one."""
    try:
        fields = await request.post()
    except (ValueError, UnicodeDecodeError):
        return {}
    return {name: value for name, value in fields.items() if isinstance(value, str)}
