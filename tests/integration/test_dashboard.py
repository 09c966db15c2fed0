"""The /ui dashboard over plain HTTP: every page, filters, paging, actions, errors, escaping.

What the browser draws is checked in tests/e2e/test_dashboard_browser.py; here the server's
answers are checked directly (status codes, redirects, the HTML it renders, the effect of
each action in the database as the Client sees it), which is fast and needs no browser.
"""

from __future__ import annotations

import html
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser

import pytest
from helpers import wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker
from conveyor.errors import PermanentFailure
from conveyor.text import utc_time


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_args, **_kwargs):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def fetch(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    form: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) without following redirects; a POST sends `form`, if any."""
    data = urllib.parse.urlencode(form or {}).encode() if method == "POST" else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})  # noqa: S310
    try:
        with _opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read().decode()


class _Forms(HTMLParser):
    """The forms of a page as a browser sees them: action, and fields in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, list[tuple[str, str]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.forms.append((named.get("action", ""), []))
        elif tag == "input" and self.forms and "name" in named:
            self.forms[-1][1].append((named["name"], named.get("value", "")))


def submit_form(page_url: str, form_html: str) -> tuple[int, dict[str, str], str]:
    """Submit the one form in `form_html` exactly as a browser would from `page_url`.

    The action is resolved against the page's URL (which removes `.` and `..` segments),
    the fields are sent url-encoded in document order, and the Origin is the page's.
    """
    parser = _Forms()
    parser.feed(form_html)
    [(action, fields)] = parser.forms
    target = urllib.parse.urljoin(page_url, action)
    origin = "{0.scheme}://{0.netloc}".format(urllib.parse.urlsplit(page_url))
    request = urllib.request.Request(  # noqa: S310 - the test server
        target,
        data=urllib.parse.urlencode(fields).encode(),
        method="POST",
        headers={"Origin": origin, "Content-Type": "application/x-www-form-urlencoded"},
    )
    try:
        with _opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read().decode()


def type_row(body: str, task_type: str) -> str | None:
    """The overview's table row of `task_type`, if listed."""
    row = re.search(
        f'<tr data-type="{re.escape(html.escape(task_type))}">(.*?)</tr>', body, re.DOTALL
    )
    return row.group(1) if row else None


def row_ids(body: str) -> list[str]:
    """The task ids listed in a /ui/tasks page, in order."""
    return re.findall(r'<tr data-task-id="([0-9a-f-]{36})">', body)


@pytest.fixture
def client(server) -> Iterator[Client]:
    with Client(server.address) as client:
        yield client


@pytest.fixture
def worker(server) -> Iterator[Worker]:
    """A worker for `ui.ok` (succeeds) and `ui.bad` (fails for good); nothing else."""
    worker = Worker(server.address, concurrency=4)
    worker.register_handler("ui.ok", lambda _ctx, payload: payload)

    def bad(_ctx, payload):
        raise PermanentFailure(f"refused {payload.decode(errors='replace')}")

    worker.register_handler("ui.bad", bad)
    worker.start()
    yield worker
    worker.stop()


class TestPages:
    def test_overview_shows_the_queue_by_type_and_paused_types(self, server, client) -> None:
        """Queued counts per type come from the sampler; a paused type shows as paused."""
        client.enqueue_tasks([Task(type="ui.idle") for _ in range(3)])
        client.pause_type("ui.held", reason="maintenance")

        def overview() -> str | None:
            status, _, body = fetch(f"{server.http_url}/ui")
            assert status == 200
            row = re.search(r'<tr data-type="ui.idle">(.*?)</tr>', body, re.DOTALL)
            return body if row and re.search(r'class="num">3<', row.group(1)) else None

        body = wait_for(overview, what="the overview to show 3 queued ui.idle tasks")
        held = re.search(r'<tr data-type="ui.held">(.*?)</tr>', body, re.DOTALL)
        assert held is not None
        assert "paused" in held.group(1)
        assert 'action="/ui/types/resume"' in held.group(1)
        assert '<input type="hidden" name="type" value="ui.held">' in held.group(1)
        assert "<svg" in body
        assert "Outcomes per minute" in body

    def test_overview_chart_draws_this_minutes_outcomes(self, server, client, worker) -> None:
        """After tasks succeed and fail, the chart has bars for them (sampled)."""
        ids = client.enqueue_tasks([Task(type="ui.ok") for _ in range(4)])
        ids += client.enqueue_tasks([Task(type="ui.bad", max_retries=0)])
        for task_id in ids:
            wait_final(client, task_id)

        def bars() -> str | None:
            _, _, body = fetch(f"{server.http_url}/ui")
            titles = re.findall(r'<rect class="(\w+)"[^>]*><title>[^<]*: (\d+) \1</title>', body)
            found = {kind: int(count) for kind, count in titles}
            return body if found.get("succeeded") == 4 and found.get("failed") == 1 else None

        wait_for(bars, what="the chart to show 4 succeeded and 1 failed")

    def test_workers_page_lists_live_workers(self, server, worker) -> None:
        """A registered worker appears with its types and slots."""
        status, _, body = fetch(f"{server.http_url}/ui/workers")
        assert status == 200
        row = re.search(r'<tr data-worker-id="[^"]+">(.*?)</tr>', body, re.DOTALL)
        assert row is not None
        assert "ui.bad, ui.ok" in row.group(1) or "ui.ok, ui.bad" in row.group(1)
        assert "/4<" in row.group(1)

    def test_stylesheet_is_served_and_cached(self, server) -> None:
        status, headers, body = fetch(f"{server.http_url}/ui/static/style.css")
        assert status == 200
        assert headers["Content-Type"].startswith("text/css")
        assert "max-age" in headers["Cache-Control"]
        assert ".badge" in body


class TestTaskList:
    def test_newest_first_and_filtered_by_state_and_type(self, server, client, worker) -> None:
        ok = client.enqueue_tasks([Task(type="ui.ok") for _ in range(3)])
        bad = client.enqueue_tasks([Task(type="ui.bad", max_retries=0) for _ in range(2)])
        idle = client.enqueue_tasks([Task(type="ui.idle") for _ in range(2)])
        for task_id in ok + bad:
            wait_final(client, task_id)

        _, _, body = fetch(f"{server.http_url}/ui/tasks")
        assert row_ids(body) == list(reversed(ok + bad + idle))
        _, _, body = fetch(f"{server.http_url}/ui/tasks?state=failed")
        assert row_ids(body) == list(reversed(bad))
        _, _, body = fetch(f"{server.http_url}/ui/tasks?state=succeeded&state=queued")
        assert row_ids(body) == list(reversed(ok + idle))
        _, _, body = fetch(f"{server.http_url}/ui/tasks?type=ui.idle")
        assert row_ids(body) == list(reversed(idle))
        _, _, body = fetch(f"{server.http_url}/ui/tasks?type=ui.ok&state=failed")
        assert row_ids(body) == []
        assert "No tasks match." in body

    def test_pages_cover_every_task_once(self, server, client) -> None:
        """Following the Older link from page to page lists each task exactly once."""
        ids = client.enqueue_tasks([Task(type="ui.page") for _ in range(120)])
        seen: list[str] = []
        url = f"{server.http_url}/ui/tasks?type=ui.page"
        while url:
            status, _, body = fetch(url)
            assert status == 200
            seen += row_ids(body)
            more = re.search(r'<a id="next-page" href="([^"]+)"', body)
            url = f"{server.http_url}{more.group(1).replace('&amp;', '&')}" if more else ""
        assert seen == list(reversed(ids))

    def test_search_by_id_redirects_to_the_task(self, server, client) -> None:
        task_id = client.enqueue_task(Task(type="ui.idle"))
        status, headers, _ = fetch(f"{server.http_url}/ui/tasks?id={task_id}")
        assert status == 303
        assert headers["Location"] == f"/ui/tasks/{task_id}"

    def test_unknown_state_is_a_400_page(self, server) -> None:
        status, _, body = fetch(f"{server.http_url}/ui/tasks?state=bogus")
        assert status == 400
        assert 'id="error-message"' in body
        assert "unknown task state" in body


class TestTaskDetail:
    def test_timeline_history_explanation_and_payload(self, server, client) -> None:
        """A task that failed once, then succeeded: two attempt bars, every event listed."""
        attempts: list[int] = []
        worker = Worker(server.address, concurrency=1)

        def flaky(ctx, payload):
            attempts.append(ctx.attempt)
            if ctx.attempt == 1:
                raise RuntimeError("first attempt fails")
            return payload

        worker.register_handler("ui.flaky", flaky)
        worker.start()
        try:
            task_id = client.enqueue_task(Task(type="ui.flaky", payload=b"hello dashboard"))
            final = wait_final(client, task_id)
        finally:
            worker.stop()
        assert final.state is TaskState.SUCCEEDED
        status, _, body = fetch(f"{server.http_url}/ui/tasks/{task_id}")
        assert status == 200
        kinds = re.findall(r'<rect class="\w+" data-kind="(\w+)"', body)
        assert kinds.count("failed") == 1
        assert kinds.count("succeeded") == 1
        assert "attempt 1 · " in body
        assert "attempt 2 · " in body
        events = re.findall(r'<tr data-event="(\w+)">', body)
        assert events == [event.event for event in final.history]
        assert "succeeded after 2 attempt(s)" in body
        # Its times as the CLI and the explanation write them, to the millisecond: one
        # copied from `tasks show` is found here (the page showed whole seconds).
        assert final.finished_at is not None
        finished = utc_time(final.finished_at, precise=True)
        assert body.count(finished) == 3, finished  # Finished, the last event, why
        assert "hello dashboard" in body
        assert 'id="retry"' not in body
        assert 'id="cancel"' not in body

    def test_markup_in_payload_and_errors_is_escaped(self, server, client, worker) -> None:
        """Payloads and errors are data: shown as text, never as markup."""
        task_id = client.enqueue_task(
            Task(type="ui.bad", payload=b"<script>alert(1)</script>", max_retries=0)
        )
        wait_final(client, task_id)
        for url in (f"/ui/tasks/{task_id}", "/ui/tasks?state=failed"):
            _, _, body = fetch(f"{server.http_url}{url}")
            assert "<script>" not in body
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body

    def test_binary_payload_is_shown_as_hex(self, server, client) -> None:
        task_id = client.enqueue_task(Task(type="ui.idle", payload=bytes([0, 1, 2, 255])))
        _, _, body = fetch(f"{server.http_url}/ui/tasks/{task_id}")
        assert "00 01 02 ff" in body
        assert "shown as hex" in body

    def test_unknown_and_malformed_ids(self, server) -> None:
        missing = "0190b5d2-0000-7000-8000-000000000000"
        status, _, body = fetch(f"{server.http_url}/ui/tasks/{missing}")
        assert status == 404
        assert missing in body
        status, _, body = fetch(f"{server.http_url}/ui/tasks/not-a-uuid")
        assert status == 400
        assert 'id="error-message"' in body


class TestActions:
    def test_cancel_a_queued_task(self, server, client) -> None:
        task_id = client.enqueue_task(Task(type="ui.idle"))
        _, _, body = fetch(f"{server.http_url}/ui/tasks/{task_id}")
        assert f'action="/ui/tasks/{task_id}/cancel"' in body
        status, headers, _ = fetch(f"{server.http_url}/ui/tasks/{task_id}/cancel", method="POST")
        assert status == 303
        assert headers["Location"] == f"/ui/tasks/{task_id}?notice=cancelled"
        _, _, page = fetch(f"{server.http_url}{headers['Location']}")
        assert '<p class="notice" role="status">Cancelled.</p>' in page
        final = client.get_task_status(task_id, history=True)
        assert final.state is TaskState.CANCELLED
        assert final.history[-1].detail == "cancelled from the dashboard"

    def test_retry_a_failed_task_then_it_runs_again(self, server, client) -> None:
        calls: list[int] = []
        worker = Worker(server.address, concurrency=1)

        def once_bad(ctx, payload):
            calls.append(ctx.attempt)
            if len(calls) == 1:
                raise PermanentFailure("bad the first time")
            return payload

        worker.register_handler("ui.once_bad", once_bad)
        worker.start()
        try:
            task_id = client.enqueue_task(Task(type="ui.once_bad"))
            assert wait_final(client, task_id).state is TaskState.FAILED
            status, headers, _ = fetch(f"{server.http_url}/ui/tasks/{task_id}/retry", method="POST")
            assert status == 303
            assert headers["Location"] == f"/ui/tasks/{task_id}?notice=retried"
            final = wait_for(
                lambda: (
                    (s := client.get_task_status(task_id, history=True)).state
                    is TaskState.SUCCEEDED
                    and s
                ),
                what="the retried task to succeed",
            )
        finally:
            worker.stop()
        events = [event.event for event in final.history]
        assert events == ["enqueued", "started", "failed", "retried", "started", "succeeded"]
        assert final.history[3].detail == "retried from the dashboard"

    def test_retrying_a_queued_task_changes_nothing(self, server, client) -> None:
        task_id = client.enqueue_task(Task(type="ui.idle"))
        status, headers, _ = fetch(f"{server.http_url}/ui/tasks/{task_id}/retry", method="POST")
        assert status == 303
        assert headers["Location"] == f"/ui/tasks/{task_id}?notice=not-retried"
        _, _, page = fetch(f"{server.http_url}{headers['Location']}")
        assert "Not retried: only failed or cancelled tasks can be retried." in page
        assert client.get_task_status(task_id).state is TaskState.QUEUED

    def test_pause_and_resume_a_type(self, server, client) -> None:
        status, headers, _ = fetch(
            f"{server.http_url}/ui/types/pause", method="POST", form={"type": "ui.p"}
        )
        assert (status, headers["Location"]) == (303, "/ui?notice=paused&type=ui.p")
        _, _, page = fetch(f"{server.http_url}{headers['Location']}")
        assert "Paused ui.p." in page
        assert [p.type for p in client.get_status().paused_types] == ["ui.p"]
        assert client.get_status().paused_types[0].reason == "paused from the dashboard"
        status, headers, _ = fetch(
            f"{server.http_url}/ui/types/resume", method="POST", form={"type": "ui.p"}
        )
        assert (status, headers["Location"]) == (303, "/ui?notice=resumed&type=ui.p")
        assert client.get_status().paused_types == ()

    def test_every_valid_type_can_be_paused_and_resumed_from_the_overview(
        self, server, client
    ) -> None:
        """Types made of dots are valid: their forms must not carry them in the path,
        which browsers resolve (`/ui/types/../pause` is posted to `/ui/pause`)."""
        names = (".", "..", "a:b-c_d.e")
        client.enqueue_tasks([Task(type=name) for name in names])
        page_url = f"{server.http_url}/ui"

        def rows(button: str) -> dict[str, str] | None:
            body = fetch(page_url)[2]
            found = {name: type_row(body, name) for name in names}
            if all(row and f">{button}</button>" in row for row in found.values()):
                return {name: row for name, row in found.items() if row}
            return None

        for button, notice in (("Pause", "paused"), ("Resume", "resumed")):
            for name, row in wait_for(lambda b=button: rows(b), what=f"{button} buttons").items():
                form = re.search(r"<form .*?</form>", row, re.DOTALL)
                assert form is not None
                status, headers, _ = submit_form(page_url, form.group(0))
                location = urllib.parse.urlsplit(headers.get("Location", ""))
                query = dict(urllib.parse.parse_qsl(location.query))
                assert (status, location.path, query) == (
                    303,
                    "/ui",
                    {"notice": notice, "type": name},
                ), name
            paused = {item.type for item in client.get_status().paused_types}
            assert paused == (set(names) if button == "Pause" else set())

    def test_a_post_from_another_site_is_refused(self, server, client) -> None:
        """A cross-site form cannot act through an operator's browser."""
        task_id = client.enqueue_task(Task(type="ui.idle"))
        status, _, body = fetch(
            f"{server.http_url}/ui/tasks/{task_id}/cancel",
            method="POST",
            headers={"Origin": "http://evil.example"},
        )
        assert status == 403
        assert "another site" in body
        assert client.get_task_status(task_id).state is TaskState.QUEUED
        origin = server.http_url
        status, _, _ = fetch(
            f"{server.http_url}/ui/tasks/{task_id}/cancel",
            method="POST",
            headers={"Origin": origin},
        )
        assert status == 303
        assert client.get_task_status(task_id).state is TaskState.CANCELLED

    def test_invalid_type_name_is_a_400_page(self, server) -> None:
        for form in ({"type": "bad type"}, {"type": ""}, {}):
            status, _, body = fetch(f"{server.http_url}/ui/types/pause", method="POST", form=form)
            assert status == 400, form
            assert 'id="error-message"' in body, form
        assert "the form&#39;s `type` field is empty" in body


class TestDisabled:
    def test_dashboard_can_be_turned_off(self, start_server) -> None:
        """With dashboard=False the HTTP port serves only the monitoring endpoints."""
        server = start_server(dashboard=False)
        assert fetch(f"{server.http_url}/ui")[0] == 404
        assert fetch(f"{server.http_url}/healthz")[0] == 200

    def test_conveyor_server_no_dashboard_flag(self, server_process) -> None:
        """`conveyor server --no-dashboard`: a real process whose HTTP port has no /ui."""
        process = server_process("--no-dashboard")
        assert fetch(f"{process.http_url}/ui")[0] == 404
        assert fetch(f"{process.http_url}/metrics")[0] == 200


class TestHardening:
    """Until logins arrive (issue #6), the dashboard defends what a loopback page can."""

    def test_another_host_name_is_refused_against_dns_rebinding(self, server) -> None:
        port = server.http_url.rsplit(":", 1)[1]
        status, _, body = fetch(f"{server.http_url}/ui", headers={"Host": f"evil.example:{port}"})
        assert status == 421
        assert "--dashboard-allowed-host" in body
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
            assert fetch(f"{server.http_url}/ui", headers={"Host": host})[0] == 200, host
        # Without tokens /status and /metrics are checked the same way
        # (test_http_hardening.py); the probes are not: they reveal nothing.
        assert fetch(f"{server.http_url}/metrics", headers={"Host": "prom.internal"})[0] == 421
        assert fetch(f"{server.http_url}/healthz", headers={"Host": "prom.internal"})[0] == 200

    def test_a_listed_host_name_is_served(self, start_server) -> None:
        server = start_server(dashboard_allowed_hosts=frozenset({"queue.internal"}))
        status, _, _ = fetch(f"{server.http_url}/ui", headers={"Host": "queue.internal:8080"})
        assert status == 200

    def test_pages_cannot_be_framed_or_cached(self, server, client) -> None:
        task_id = client.enqueue_task(Task(type="ui.idle"))
        for path in ("/ui", f"/ui/tasks/{task_id}", "/ui/tasks/not-a-uuid"):
            _, headers, _ = fetch(f"{server.http_url}{path}")
            assert headers["X-Frame-Options"] == "DENY", path
            assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
            assert headers["Cache-Control"] == "no-store", path
        status, headers, _ = fetch(
            f"{server.http_url}/ui/types/pause", method="POST", form={"type": "ui.h"}
        )
        assert status == 303
        assert headers["X-Frame-Options"] == "DENY"

    def test_a_notice_is_chosen_by_code_never_taken_from_the_url(self, server) -> None:
        _, _, body = fetch(f"{server.http_url}/ui?notice=Your+session+expired%2C+call+555")
        assert "session expired" not in body
        assert 'class="notice"' not in body
        _, _, body = fetch(f"{server.http_url}/ui?notice=paused&type=%3Cb%3Ex")
        assert "Paused the type." in body
