"""Chart geometry of the dashboard: pure functions, checked without a server or browser."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from conveyor.monitoring.dashboard.charts import (
    CHART_HEIGHT,
    CHART_WIDTH,
    LABEL_WIDTH,
    failure_chart,
    task_timeline,
    throughput_chart,
)
from conveyor.monitoring.dashboard.views import payload_preview
from conveyor.types import TaskEvent, TaskState

NOW = datetime(2026, 11, 29, 12, 30, 20, tzinfo=UTC)
T0 = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


def event(seconds: float, name: str, state: TaskState, attempt: int = 0, detail=None):
    worker = "w-1" if attempt else None
    return TaskEvent(T0 + timedelta(seconds=seconds), name, state, attempt, worker, detail)


class TestThroughputChart:
    def test_bars_stack_per_minute_and_scale_to_a_round_peak(self) -> None:
        minute = NOW.replace(second=0)
        chart = throughput_chart({minute: {"succeeded": 30, "retried": 5, "failed": 10}}, now=NOW)
        by_kind = {shape.kind: shape for shape in chart.shapes}
        assert set(by_kind) == {"succeeded", "retried", "failed"}
        # 45 in the minute: the axis tops at 50.
        assert [tick.text for tick in chart.y_ticks] == ["0", "25", "50"]
        assert by_kind["succeeded"].height == pytest.approx(CHART_HEIGHT * 30 / 50)
        # Stacked: each bar starts where the one below it ends.
        assert by_kind["retried"].y + by_kind["retried"].height == pytest.approx(
            by_kind["succeeded"].y
        )
        assert by_kind["failed"].y + by_kind["failed"].height == pytest.approx(by_kind["retried"].y)
        # The current minute is the rightmost slot.
        assert by_kind["succeeded"].x > CHART_WIDTH - CHART_WIDTH / 60
        assert chart.total == 45

    def test_minutes_outside_the_window_are_not_drawn(self) -> None:
        old = NOW.replace(second=0) - timedelta(minutes=61)
        chart = throughput_chart({old: {"succeeded": 9}}, now=NOW)
        assert chart.shapes == ()
        assert chart.total == 0
        assert chart.y_ticks[-1].text == "1"


class TestFailureChart:
    def test_bar_height_is_the_failed_share_of_finished_tasks(self) -> None:
        minute = NOW.replace(second=0)
        earlier = minute - timedelta(minutes=2)
        chart = failure_chart(
            {
                minute: {"succeeded": 3, "failed": 1, "retried": 7},
                earlier: {"succeeded": 5},
            },
            now=NOW,
        )
        (bar,) = chart.shapes  # a minute without failures draws no bar
        assert bar.height == pytest.approx(CHART_HEIGHT * 0.25)
        assert bar.y + bar.height == pytest.approx(CHART_HEIGHT)
        assert "25% failed (1 of 4)" in bar.title


class TestTaskTimeline:
    def test_a_retried_task_has_a_row_per_attempt_and_waits_on_the_queue_row(self) -> None:
        events = [
            event(0, "enqueued", TaskState.QUEUED),
            event(1, "started", TaskState.RUNNING, 1),
            event(3, "failed", TaskState.QUEUED, 1, "ValueError: x"),
            event(5, "started", TaskState.RUNNING, 2),
            event(10, "succeeded", TaskState.SUCCEEDED, 2),
        ]
        chart = task_timeline(events, now=NOW, live=False)
        assert [row.text for row in chart.rows] == ["queue", "attempt 1 · w-1", "attempt 2 · w-1"]
        kinds = [(shape.kind, round(shape.x), round(shape.width)) for shape in chart.shapes]
        scale = (CHART_WIDTH - LABEL_WIDTH) / 10
        assert kinds == [
            ("waiting", LABEL_WIDTH, round(1 * scale)),
            ("failed", round(LABEL_WIDTH + 1 * scale), round(2 * scale)),
            ("waiting", round(LABEL_WIDTH + 3 * scale), round(2 * scale)),
            ("succeeded", round(LABEL_WIDTH + 5 * scale), round(5 * scale)),
        ]
        assert "ValueError: x" in chart.shapes[1].title
        assert chart.x_ticks[-1].text == "+10.0 s"

    def test_a_running_task_is_drawn_up_to_now(self) -> None:
        events = [
            event(0, "enqueued", TaskState.QUEUED),
            event(2, "started", TaskState.RUNNING, 1),
        ]
        now = T0 + timedelta(seconds=12)
        chart = task_timeline(events, now=now, live=True)
        running = [shape for shape in chart.shapes if shape.kind == "running"]
        assert len(running) == 1
        assert running[0].x + running[0].width == pytest.approx(CHART_WIDTH)

    def test_cancelled_while_queued_closes_the_wait(self) -> None:
        events = [
            event(0, "enqueued", TaskState.QUEUED),
            event(4, "cancelled", TaskState.CANCELLED),
        ]
        chart = task_timeline(events, now=NOW, live=False)
        assert [shape.kind for shape in chart.shapes] == ["waiting"]
        assert "cancelled" in chart.shapes[0].title
        assert [row.text for row in chart.rows] == ["queue"]

    def test_an_attempt_handed_back_and_started_again_keeps_its_row(self) -> None:
        """A release spends no attempt: the next start is the same attempt, on the same row,
        so a task handed back over and over is one row. A failure moves on to a new row."""
        events = [event(0, "enqueued", TaskState.QUEUED)]
        for cycle in range(3):
            events.append(event(1 + 2 * cycle, "started", TaskState.RUNNING, 1))
            events.append(event(2 + 2 * cycle, "released", TaskState.QUEUED, 1))
        events += [
            event(7, "started", TaskState.RUNNING, 1),
            event(8, "failed", TaskState.QUEUED, 1, "ValueError: x"),
            event(9, "started", TaskState.RUNNING, 2),
            event(10, "succeeded", TaskState.SUCCEEDED, 2),
        ]
        chart = task_timeline(events, now=NOW, live=False)
        assert [row.text for row in chart.rows] == [
            "queue",
            "attempt 1 · w-1 · 4 starts",
            "attempt 2 · w-1",
        ]
        bars = [(shape.kind, shape.y) for shape in chart.shapes if shape.kind != "waiting"]
        attempt_1 = bars[0][1]
        assert bars[:4] == [("released", attempt_1)] * 3 + [("failed", attempt_1)]
        assert bars[4][0] == "succeeded"
        assert bars[4][1] > attempt_1

    def test_each_bar_names_its_worker_and_a_row_every_worker_that_started_it(self) -> None:
        """Handed back on one worker and started again on another, the row was labelled
        with the second worker only, over both bars, and no bar said which it ran on."""
        events = [
            event(0, "enqueued", TaskState.QUEUED),
            TaskEvent(T0 + timedelta(seconds=1), "started", TaskState.RUNNING, 1, "w-a", None),
            TaskEvent(T0 + timedelta(seconds=2), "released", TaskState.QUEUED, 1, "w-a", None),
            TaskEvent(T0 + timedelta(seconds=3), "started", TaskState.RUNNING, 1, "w-b", None),
            TaskEvent(T0 + timedelta(seconds=4), "succeeded", TaskState.SUCCEEDED, 1, "w-b", None),
        ]
        chart = task_timeline(events, now=NOW, live=False)
        assert [row.text for row in chart.rows] == ["queue", "attempt 1 · w-a, w-b · 2 starts"]
        bars = [shape.title for shape in chart.shapes if shape.kind != "waiting"]
        assert bars[0].startswith("released on w-a")
        assert bars[1].startswith("succeeded on w-b")

    def test_a_retried_series_does_not_share_the_handed_back_attempts_row(self) -> None:
        """Released, cancelled, retried by an operator: the new series' attempt 1 was drawn
        on the old attempt 1's row, as if it were that attempt started again."""
        events = [
            event(0, "enqueued", TaskState.QUEUED),
            event(1, "started", TaskState.RUNNING, 1),
            event(2, "released", TaskState.QUEUED, 1),
            event(3, "cancelled", TaskState.CANCELLED, 1),
            event(4, "retried", TaskState.QUEUED, 0),
            event(5, "started", TaskState.RUNNING, 1),
            event(6, "succeeded", TaskState.SUCCEEDED, 1),
        ]
        chart = task_timeline(events, now=NOW, live=False)
        assert [row.text for row in chart.rows] == ["queue", "attempt 1 · w-1", "attempt 1 · w-1"]

    def test_no_events_draws_nothing(self) -> None:
        assert task_timeline([], now=NOW, live=True).shapes == ()


class TestPayloadPreview:
    @pytest.mark.parametrize(
        ("head", "size", "expected"),
        [
            (None, 0, ("none", "")),
            (b'{"to": "a@b.c"}', 15, ("text", '{"to": "a@b.c"}')),
            ("héllo\n".encode(), 7, ("text", "héllo\n")),
            (bytes([0, 1, 255]), 3, ("hex", "00 01 ff")),
            (b"\x00text", 5, ("hex", "00 74 65 78 74")),
            (b"\x1b[2Jclear", 11, ("hex", "1b 5b 32 4a 63 6c 65 61 72")),
            # A preview cut inside a two-byte character is still text.
            ("aé".encode()[:2], 3, ("text", "a")),
        ],
    )
    def test_text_when_printable_else_hex(self, head, size, expected) -> None:
        assert payload_preview(head, size) == expected


def test_the_workers_page_shows_heartbeat_ages_by_the_databases_clock() -> None:
    """The server's clock may be off from the database's: the age the database measured
    (silent_for) is shown, not this clock against the stored time."""
    from conveyor.monitoring.dashboard.views import _environment  # noqa: PLC0415
    from conveyor.types import WorkerInfo  # noqa: PLC0415

    worker = WorkerInfo(
        id="w-1",
        host="h",
        pid=1,
        task_types=("t",),
        concurrency=4,
        version="1",
        state="active",
        started_at=datetime.now(UTC) - timedelta(hours=1),
        # Ten minutes ago by this clock, which runs ten minutes ahead of the database's.
        last_heartbeat_at=datetime.now(UTC) - timedelta(minutes=10),
        in_flight=0,
        loop_lag_ms=0,
        silent_for=timedelta(seconds=2),
    )
    page = (
        _environment()
        .get_template("workers.html")
        .render(
            workers=[worker],
            now=datetime.now(UTC),
            refresh=None,
            notice=None,
            user=None,
            page="workers",
            visit=None,
        )
    )
    assert "2.0s ago" in page
    assert "10.0m ago" not in page
