"""The /ui dashboard in a real browser: headless Chromium, a real server, real worker processes.

Chromium is the system's (Debian's `chromium`); playwright only drives it and nothing is
downloaded. The module is skipped when either is missing, so `make test` passes without them.

Playwright's sync API keeps an event loop running on the thread that started it, and the
database fixtures call `asyncio.run` on the main thread, so the module's one browser lives on
a thread of its own: each test hands it a scenario, run in a fresh context and page.

Every page the overview, search and pause tests visit is saved as a full-page screenshot in
test-artifacts/screenshots/, once the page shows the data the test expects; with
CONVEYOR_UPDATE_DOC_SCREENSHOTS=1 the ones the docs embed (overview, tasks, task-detail,
workers) are copied to docs/images/ at the end of the module.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO_ROOT, wait_final, wait_for

from conveyor import Task, TaskState

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="the dashboard's browser tests need the playwright package (pip install playwright)",
)


def _find_chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = _find_chromium()
if CHROMIUM is None:
    pytest.skip(
        "the dashboard's browser tests need Chromium at /usr/bin/chromium or `chromium` on PATH "
        "(apt-get install chromium); playwright's own browser downloads are not used",
        allow_module_level=True,
    )

pytestmark = [pytest.mark.slow, pytest.mark.browser]

expect = sync_api.expect
expect.set_options(timeout=10_000)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
SCREENSHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
DOC_IMAGES = REPO_ROOT / "docs" / "images"
DOC_SCREENSHOTS = ("overview.png", "tasks.png", "task-detail.png", "workers.png")
UPDATE_DOCS_VARIABLE = "CONVEYOR_UPDATE_DOC_SCREENSHOTS"
# A main document answered with 4xx is logged by Chromium as a console error.
HTTP_ERROR_LOG = re.compile(r"Failed to load resource: the server responded with a status of 4")
# No worker in tests/worker_apps.py handles these types: their tasks stay queued.
UNHANDLED = "nobody.handles"
MARKUP = "<script>window.__xss = 1; alert('xss')</script><img src=x onerror=\"alert('img')\">"


# --- the browser --------------------------------------------------------------------------


class BrowserThread:
    """One headless Chromium for the module, driven from a thread of its own."""

    def __init__(self, executable: str) -> None:
        self._executable = executable
        self._jobs: queue.Queue[tuple[Callable[[Any], Any], Future[Any]] | None] = queue.Queue()
        self._launched: Future[None] = Future()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="chromium", daemon=True)

    def _main(self) -> None:
        try:
            with sync_api.sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=self._executable, headless=True, args=CHROMIUM_ARGS
                )
                self._launched.set_result(None)
                while (job := self._jobs.get()) is not None:
                    function, result = job
                    try:
                        result.set_result(function(browser))
                    except BaseException as exc:  # AssertionError, pytest's Failed...
                        result.set_exception(exc)
                browser.close()
        except BaseException as exc:
            if self._launched.done():
                self._error = exc
            else:
                self._launched.set_exception(exc)

    def start(self) -> BrowserThread:
        self._thread.start()
        self._launched.result(timeout=60)
        return self

    def run(self, function: Callable[[Any], Any], *, timeout: float = 120) -> Any:
        """Run `function(browser)` on the browser's thread; re-raise what it raises."""
        result: Future[Any] = Future()
        self._jobs.put((function, result))
        return result.result(timeout)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(30)
        if self._error is not None:
            raise self._error


@dataclass
class Screenshots:
    """Full-page screenshots saved during this run (only these may be copied to the docs)."""

    taken: set[str] = field(default_factory=set)

    def save(self, page: Any, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / name), full_page=True)
        self.taken.add(name)


@dataclass
class Tab:
    """A fresh context's page on the test server, and what went wrong in it."""

    page: Any
    screenshots: Screenshots
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.page.on("console", self._console)
        self.page.on("pageerror", self._page_error)
        self.page.on("dialog", self._dialog)

    def _console(self, message: Any) -> None:
        if message.type == "error":
            source = message.location.get("url") or "?"
            self.console_errors.append(f"{message.text} [{source}] on {self.page.url}")

    def _page_error(self, error: Any) -> None:
        self.page_errors.append(str(error))

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def open(self, path: str, *, status: int = 200) -> Any:
        """Navigate to `path` and check the HTTP status of the page."""
        response = self.page.goto(path)
        assert response is not None, f"no response for {path}"
        assert response.status == status, f"GET {path}: HTTP {response.status}, not {status}"
        return response

    def follow(self, action: Callable[[], Any], *, status: int = 200) -> Any:
        """Do `action` (a click, a key press), wait for the page it loads, check its status."""
        with self.page.expect_navigation() as navigation:
            action()
        response = navigation.value
        assert response is not None
        assert response.status == status, f"{response.url}: HTTP {response.status}"
        return response

    def shot(self, name: str) -> None:
        self.screenshots.save(self.page, name)

    def assert_clean(self, *, http_errors: bool = False) -> None:
        """No script error, no dialog, no console error (the browser's own requests included).

        `http_errors` allows the console line Chromium logs for a page answered with 4xx.
        """
        errors = [
            text
            for text in self.console_errors
            if not (http_errors and HTTP_ERROR_LOG.search(text))
        ]
        assert errors == [], f"console errors: {errors}"
        assert self.page_errors == [], f"uncaught script errors: {self.page_errors}"
        assert self.dialogs == [], f"dialogs fired: {self.dialogs}"


@pytest.fixture(scope="module")
def screenshots() -> Iterator[Screenshots]:
    """This run's screenshots; with CONVEYOR_UPDATE_DOC_SCREENSHOTS=1, copied to docs/images/.

    A screenshot is taken only once its page has shown the data the test expects, so the
    ones taken in this run are good to publish even if a later check of the test fails.
    """
    shots = Screenshots()
    yield shots
    if os.environ.get(UPDATE_DOCS_VARIABLE) != "1":
        return
    missing = [name for name in DOC_SCREENSHOTS if name not in shots.taken]
    if missing:
        pytest.fail(f"{UPDATE_DOCS_VARIABLE}=1: not taken in this run: {missing}")
    DOC_IMAGES.mkdir(parents=True, exist_ok=True)
    for name in DOC_SCREENSHOTS:
        shutil.copyfile(SCREENSHOTS / name, DOC_IMAGES / name)


@pytest.fixture(scope="module")
def chromium() -> Iterator[BrowserThread]:
    """The module's one headless Chromium."""
    assert CHROMIUM is not None
    browser = BrowserThread(CHROMIUM).start()
    yield browser
    browser.stop()


@pytest.fixture
def browse(chromium: BrowserThread, screenshots: Screenshots, server) -> Callable[..., None]:
    """`browse(scenario)`: run `scenario(tab)` in a fresh context on `server`'s dashboard.

    Afterwards the tab must have logged no console error, no script error and no dialog
    (`http_errors=True` lets a page answered with 4xx log its status).
    """

    def run(scenario: Callable[[Tab], None], *, http_errors: bool = False) -> None:
        def job(browser: Any) -> None:
            context = browser.new_context(
                base_url=server.http_url, viewport={"width": 1280, "height": 860}
            )
            context.set_default_timeout(10_000)
            try:
                tab = Tab(context.new_page(), screenshots)
                scenario(tab)
                tab.assert_clean(http_errors=http_errors)
            finally:
                context.close()

        chromium.run(job)

    return run


# --- reading pages ------------------------------------------------------------------------


def reload_until(
    page: Any,
    read: Callable[[], Any],
    until: Callable[[Any], bool],
    *,
    what: str,
    timeout: float = 20.0,
) -> Any:
    """Reload `page` until `until(read())`; the stats sampler refreshes every 200 ms."""
    seen: list[Any] = []

    def check() -> bool:
        page.reload()
        seen.append(read())
        return until(seen[-1])

    try:
        wait_for(check, timeout=timeout, interval=0.2, what=what)
    except pytest.fail.Exception:
        pytest.fail(f"timed out waiting for {what}; the page last showed {seen[-1:]}")
    return seen[-1]


def type_rows(page: Any) -> dict[str, tuple[str, str]]:
    """The overview's table#types as {type: (queued, state badge)}."""
    rows = page.eval_on_selector_all(
        "table#types tbody tr",
        "rows => rows.map(r => [r.dataset.type,"
        " [r.cells[1].textContent.trim(), r.cells[4].textContent.trim()]])",
    )
    return {task_type: (queued, state) for task_type, (queued, state) in rows}


def listed_ids(page: Any) -> list[str]:
    """The task ids of table#task-list, top to bottom."""
    return page.eval_on_selector_all(
        "table#task-list tbody tr", "rows => rows.map(r => r.dataset.taskId)"
    )


def listed_column(page: Any, column: int) -> set[str]:
    """The distinct texts of one column of table#task-list."""
    return set(
        page.eval_on_selector_all(
            "table#task-list tbody tr",
            f"rows => rows.map(r => r.cells[{column}].textContent.trim())",
        )
    )


def history_events(page: Any) -> list[str]:
    """The event of each row of the task page's table#history, oldest first."""
    return page.eval_on_selector_all(
        "table#history tbody tr", "rows => rows.map(r => r.dataset.event)"
    )


def expect_current_nav(page: Any, label: str) -> None:
    current = page.locator("nav a[aria-current=page]")
    expect(current).to_have_count(1)
    expect(current).to_have_text(label)


def search(tab: Tab, text: str, *, status: int = 200) -> None:
    """Type `text` in the header's search box and press Enter."""
    box = tab.page.locator("header form.search input[name=id]")
    box.fill(text)
    tab.follow(lambda: box.press("Enter"), status=status)


# --- tests --------------------------------------------------------------------------------


def test_every_page_shows_the_cluster(server, client, spawn_worker, browse):
    """Overview, tasks, a task and workers answer 200, cleanly, with the cluster's data."""
    worker = spawn_worker(server.address)
    queued = {"email.send": 4, "image.resize": 3, "report.render": 2}
    every_id: list[str] = []
    for task_type, count in queued.items():
        every_id += client.enqueue_tasks(
            [Task(type=task_type, payload=f'{{"n": {n}}}'.encode()) for n in range(count)]
        )
    succeeded = client.enqueue_tasks([Task(type="noop", payload=b'{"user": 7}') for _ in range(6)])
    failed = client.enqueue_tasks(
        [Task(type="always_fail", payload=b"card declined", max_retries=0) for _ in range(2)]
    )
    retried = client.enqueue_tasks(
        [Task(type="fail_once", payload=b'{"invoice": 1042}') for _ in range(2)]
    )
    every_id += succeeded + failed + retried
    finals = {task_id: wait_final(client, task_id) for task_id in succeeded + failed + retried}
    assert {finals[task_id].state for task_id in succeeded + retried} == {TaskState.SUCCEEDED}
    assert {finals[task_id].state for task_id in failed} == {TaskState.FAILED}
    (registered,) = client.list_workers()
    assert registered.pid == worker.pid

    def scenario(tab: Tab) -> None:
        page = tab.page
        tab.open("/ui")
        expect_current_nav(page, "Overview")
        expected = {task_type: (str(count), "leasing") for task_type, count in queued.items()}
        reload_until(
            page,
            lambda: (
                type_rows(page),
                page.locator("svg.chart rect.failed").count(),
                page.inner_text("#active-workers"),
            ),
            lambda seen: seen[0] == expected and seen[1] > 0 and seen[2] == "1",
            what=f"the overview to list {expected}, a failed bar and one active worker",
        )
        expect(page.locator("#queued")).to_have_text(str(sum(queued.values())))
        tab.assert_clean()
        tab.shot("overview.png")

        tab.follow(lambda: page.click("nav >> text=Tasks"))
        expect_current_nav(page, "Tasks")
        assert sorted(listed_ids(page)) == sorted(every_id)
        expect(page.locator("a#next-page")).to_have_count(0)
        tab.assert_clean()
        tab.shot("tasks.png")

        tab.follow(lambda: page.click(f"tr[data-task-id='{failed[0]}'] a"))
        assert page.url == f"{server.http_url}/ui/tasks/{failed[0]}"
        expect_current_nav(page, "Tasks")
        expect(page.locator("h1 .badge")).to_have_text("failed")
        expect(page.locator("ul#explanation")).to_contain_text("failed for good after 1 attempt")
        expect(page.locator("ul#explanation")).to_contain_text(
            "last error: ValueError: card declined"
        )
        expect(page.locator("svg.timeline rect[data-kind=failed]")).to_have_count(1)
        expect(page.locator("#payload")).to_have_text("card declined")
        tab.assert_clean()
        tab.shot("task-failed.png")

        tab.follow(lambda: page.click("nav >> text=Workers"))
        expect_current_nav(page, "Workers")
        row = page.locator(f"table#workers tr[data-worker-id='{registered.id}']")
        expect(row).to_have_count(1)
        expect(row.locator("td").nth(2)).to_have_text(str(worker.pid))
        expect(row.locator("td").nth(3)).to_have_text("active")
        expect(row.locator("td").nth(4)).to_contain_text("fail_once")
        tab.assert_clean()
        tab.shot("workers.png")
        # Every page, the browser's own requests included (/favicon.ico), logged no error.
        tab.assert_clean()

    browse(scenario)


def test_filters_and_pages(server, client, spawn_worker, browse):
    """The state and type filters show exactly the matching tasks; pages do not overlap."""
    spawn_worker(server.address)
    failed = client.enqueue_tasks(
        [Task(type="always_fail", payload=b"no", max_retries=0) for _ in range(3)]
    )
    succeeded = client.enqueue_tasks([Task(type="noop") for _ in range(2)])
    older = client.enqueue_tasks([Task(type="bulk.item", payload=b"old") for _ in range(5)])
    newer = client.enqueue_tasks([Task(type="bulk.item", payload=b"new") for _ in range(50)])
    for task_id in failed + succeeded:
        wait_final(client, task_id)

    def scenario(tab: Tab) -> None:
        page = tab.page
        tab.open("/ui/tasks")
        assert len(listed_ids(page)) == 50  # 60 tasks: the newest 50 on the first page
        expect(page.locator("a#next-page")).to_have_count(1)

        page.check("form.filters input[name=state][value=failed]")
        tab.follow(lambda: page.click("form.filters button[type=submit]"))
        assert sorted(listed_ids(page)) == sorted(failed)
        assert listed_column(page, 2) == {"failed"}
        expect(page.locator("form.filters input[name=state][value=failed]")).to_be_checked()
        expect(page.locator("a#next-page")).to_have_count(0)

        page.uncheck("form.filters input[name=state][value=failed]")
        page.fill("form.filters input[name=type]", "bulk.item")
        tab.follow(lambda: page.click("form.filters button[type=submit]"))
        first = listed_ids(page)
        assert set(first) == set(newer)
        assert listed_column(page, 1) == {"bulk.item"}
        expect(page.locator("form.filters input[name=type]")).to_have_value("bulk.item")

        tab.follow(lambda: page.click("a#next-page"))
        second = listed_ids(page)
        assert set(second) == set(older)
        assert not set(first) & set(second)
        assert listed_column(page, 1) == {"bulk.item"}
        expect(page.locator("a#next-page")).to_have_count(0)

    browse(scenario)


def test_search_timeline_and_escaping(server, client, spawn_worker, browse):
    """Search opens a task; a retried task shows both attempts; markup is shown as text."""
    spawn_worker(server.address)
    # Registered first, so the timeline shows the attempts rather than the worker starting.
    wait_for(client.list_workers, what="the worker to register")
    payload = '{"order": 1042, "customer": "ada@example.com", "items": 3}'
    retried = client.enqueue_task(Task(type="fail_once", payload=payload.encode()))
    hostile = client.enqueue_task(Task(type="always_fail", payload=MARKUP.encode(), max_retries=0))
    assert wait_final(client, retried).state is TaskState.SUCCEEDED
    assert wait_final(client, hostile).state is TaskState.FAILED

    def scenario(tab: Tab) -> None:
        page = tab.page
        tab.open("/ui/tasks")
        search(tab, retried)
        assert page.url == f"{server.http_url}/ui/tasks/{retried}"
        expect(page.locator("h1")).to_contain_text(retried)
        expect(page.locator("h1 .badge")).to_have_text("succeeded")
        expect(page.locator("svg.timeline rect[data-kind=failed]")).to_have_count(1)
        expect(page.locator("svg.timeline rect[data-kind=succeeded]")).to_have_count(1)
        assert history_events(page) == ["enqueued", "started", "failed", "started", "succeeded"]
        expect(page.locator("table#history tr[data-event=failed]")).to_contain_text(
            f"first attempt fails on purpose: {payload}"
        )
        expect(page.locator("ul#explanation")).to_contain_text("succeeded after 2 attempt(s)")
        expect(page.locator("#payload")).to_have_text(payload)
        tab.assert_clean()
        tab.shot("task-detail.png")

        search(tab, f"  {hostile.upper()}  ")  # pasted with spaces, in capitals
        expect(page.locator("h1")).to_contain_text(hostile)
        expect(page.locator("#payload")).to_have_text(MARKUP)
        expect(page.locator("table#fields")).to_contain_text(MARKUP)
        expect(page.locator("table#history tr[data-event=failed]")).to_contain_text(MARKUP)
        expect(page.locator("ul#explanation")).to_contain_text(MARKUP)
        expect(page.locator("main script, main img")).to_have_count(0)
        assert page.evaluate("() => window.__xss") is None
        tab.shot("task-escaped-markup.png")

        tab.open("/ui/tasks?state=failed")
        expect(page.locator(f"tr[data-task-id='{hostile}']")).to_contain_text(MARKUP)
        expect(page.locator("main script, main img")).to_have_count(0)
        assert page.evaluate("() => window.__xss") is None
        assert tab.dialogs == []

    browse(scenario)


def test_cancel_from_the_task_page(server, client, browse):
    """Cancel a queued task: the page shows it cancelled; the server says so too."""
    task_id = client.enqueue_task(Task(type=UNHANDLED, payload=b"never runs"))

    def scenario(tab: Tab) -> None:
        page = tab.page
        tab.open(f"/ui/tasks/{task_id}")
        expect(page.locator("h1 .badge")).to_have_text("queued")
        expect(page.locator("ul#explanation")).to_contain_text(
            f"no live worker handles type '{UNHANDLED}'"
        )
        tab.follow(lambda: page.click("button#cancel"))
        assert page.url.startswith(f"{server.http_url}/ui/tasks/{task_id}?")
        expect(page.locator("h1 .badge")).to_have_text("cancelled")
        expect(page.locator("p.notice")).to_have_text("Cancelled.")
        expect(page.locator("button#cancel")).to_have_count(0)
        expect(page.locator("button#retry")).to_be_visible()
        expect(page.locator("table#history tbody tr").last).to_have_attribute(
            "data-event", "cancelled"
        )

    browse(scenario)
    status = client.get_task_status(task_id, history=True)
    assert status.state is TaskState.CANCELLED
    assert status.history[-1].event == "cancelled"
    assert status.history[-1].detail is not None
    assert "dashboard" in status.history[-1].detail


def test_retry_from_the_task_page(server, client, spawn_worker, ledger, browse):
    """Retry a failed task: it is queued again, runs again, and its history says why."""
    spawn_worker(server.address)
    task_id = client.enqueue_task(Task(type="always_fail", payload=b"try me", max_retries=0))
    assert wait_final(client, task_id).state is TaskState.FAILED

    def scenario(tab: Tab) -> None:
        page = tab.page
        tab.open(f"/ui/tasks/{task_id}")
        expect(page.locator("h1 .badge")).to_have_text("failed")
        tab.follow(lambda: page.click("button#retry"))
        expect(page.locator("p.notice")).to_have_text(
            "Retried: queued again as a new series of attempts."
        )
        # The worker may already have picked it up again.
        assert page.inner_text("h1 .badge") in {"queued", "running", "failed"}
        retried_row = page.locator("table#history tr[data-event=retried]")
        expect(retried_row).to_have_count(1)
        expect(retried_row).to_contain_text("retried from the dashboard")

        wait_for(
            lambda: len([row for row in ledger.started() if row["task_id"] == task_id]) == 2,
            what="the retried task to run a second time",
        )
        assert wait_final(client, task_id).state is TaskState.FAILED
        tab.open(f"/ui/tasks/{task_id}")
        expect(page.locator("h1 .badge")).to_have_text("failed")
        expect(page.locator("svg.timeline rect[data-kind=failed]")).to_have_count(2)
        events = history_events(page)
        assert events.index("retried") == events.index("failed") + 1
        expect(page.locator("button#retry")).to_be_visible()

    browse(scenario)


def test_pause_and_resume_a_type(server, client, spawn_worker, ledger, browse):
    """A paused type stays queued while other types run; resumed, it completes."""
    before = client.enqueue_task(Task(type="noop", payload=b"enqueued before the pause"))
    client.enqueue_tasks([Task(type=UNHANDLED) for _ in range(2)])

    def scenario(tab: Tab) -> None:
        page = tab.page
        tab.open("/ui")
        reload_until(
            page,
            lambda: type_rows(page),
            lambda seen: seen == {"noop": ("1", "leasing"), UNHANDLED: ("2", "leasing")},
            what="the overview to list noop and the unhandled type as queued",
        )
        row = page.locator("table#types tr[data-type=noop]")
        tab.follow(lambda: row.get_by_role("button", name="Pause").click())
        expect(page.locator("p.notice")).to_have_text("Paused noop.")
        expect(row.locator(".badge")).to_have_text("paused")
        expect(row.get_by_role("button")).to_have_text("Resume")
        expect(page.locator(f"table#types tr[data-type='{UNHANDLED}'] .badge")).to_have_text(
            "leasing"
        )

        # The worker starts after the pause and keeps completing another type's tasks.
        after = client.enqueue_task(Task(type="noop", payload=b"enqueued after the pause"))
        spawn_worker(server.address)
        other = client.enqueue_task(Task(type="async_noop", payload=b"another type"))
        assert wait_final(client, other).state is TaskState.SUCCEEDED  # the worker polled
        for task_id in (before, after):
            assert client.get_task_status(task_id).state is TaskState.QUEUED
        assert {row["task_id"] for row in ledger.started()} == {other}

        reload_until(
            page,
            lambda: (type_rows(page).get("noop"), page.inner_text("#active-workers")),
            lambda seen: seen == (("2", "paused"), "1"),
            what="the overview to show noop paused with two queued, and one active worker",
        )
        tab.assert_clean()
        tab.shot("overview-paused.png")

        tab.open(f"/ui/tasks/{after}")
        expect(page.locator("h1 .badge")).to_have_text("queued")
        expect(page.locator("ul#explanation")).to_contain_text("its type 'noop' is paused")
        expect(page.locator("table#fields .badge.paused")).to_have_text("paused")
        tab.assert_clean()
        tab.shot("task-paused.png")

        tab.open("/ui")
        tab.follow(lambda: row.get_by_role("button", name="Resume").click())
        expect(page.locator("p.notice")).to_have_text("Resumed noop.")
        expect(page.locator("table#types tr[data-type=noop] .badge.paused")).to_have_count(0)
        for task_id in (before, after):
            assert wait_final(client, task_id).state is TaskState.SUCCEEDED
        tab.open(f"/ui/tasks/{after}")
        expect(page.locator("h1 .badge")).to_have_text("succeeded")
        expect(page.locator("ul#explanation")).to_contain_text("succeeded after 1 attempt(s)")

    browse(scenario)


def test_error_pages(server, browse):
    """An unknown task id is a 404 page; a malformed id or filter is a 400 page."""
    unknown = str(uuid.uuid4())

    def scenario(tab: Tab) -> None:
        page = tab.page
        tab.open(f"/ui/tasks/{unknown}", status=404)
        expect(page.locator("p#error-message")).to_have_text(f"task {unknown} not found")

        tab.open("/ui/tasks/not-a-task-id", status=400)
        expect(page.locator("p#error-message")).to_contain_text("malformed task id")

        tab.open("/ui")
        search(tab, "12345", status=400)
        expect(page.locator("p#error-message")).to_contain_text("malformed task id '12345'")

        tab.open("/ui/tasks?state=lost", status=400)
        expect(page.locator("p#error-message")).to_contain_text("unknown task state")

    browse(scenario, http_errors=True)
