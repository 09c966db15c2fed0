"""Chart geometry for the dashboard: throughput per minute and a task's timeline of attempts.

Pure functions from numbers and events to shapes (rectangles with a kind, a label and a
tooltip) in SVG user units; the templates draw them, with escaping. No JavaScript and no
charting library: a server-rendered page shows its charts with scripts disabled, loads in
one request, and is testable here without a browser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final

from conveyor.codec import is_sealed_text

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from conveyor.types import TaskEvent

CHART_WIDTH: Final = 720
CHART_HEIGHT: Final = 160
ROW_HEIGHT: Final = 26
LABEL_WIDTH: Final = 170
# Events that end an attempt, and how its bar is coloured.
ATTEMPT_ENDINGS: Final = frozenset(
    {"succeeded", "failed", "timed_out", "lease_expired", "released", "cancelled"}
)


@dataclass(frozen=True, slots=True)
class Shape:
    """A rectangle: `kind` picks its colour (a CSS class), `title` is its tooltip."""

    x: float
    y: float
    width: float
    height: float
    kind: str
    title: str


@dataclass(frozen=True, slots=True)
class Tick:
    """An axis label at `position` (x for time axes, y for count axes)."""

    position: float
    text: str


@dataclass(frozen=True, slots=True)
class Chart:
    """Shapes and axis labels in a `width` x `height` box."""

    width: float
    height: float
    shapes: tuple[Shape, ...]
    x_ticks: tuple[Tick, ...] = ()
    y_ticks: tuple[Tick, ...] = ()
    # Row labels of a timeline, top to bottom.
    rows: tuple[Tick, ...] = ()
    total: int = 0
    legend: tuple[str, ...] = field(default=())


def _nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten at or above `value` (at least 1)."""
    magnitude = 1
    while True:
        for step in (1, 2, 5):
            if step * magnitude >= value:
                return step * magnitude
        magnitude *= 10


def _minute_ticks(end: datetime, span: int) -> tuple[Tick, ...]:
    """About six HH:MM labels along a per-minute axis ending at minute `end`."""
    slot_width = CHART_WIDTH / span
    return tuple(
        Tick(position=index * slot_width, text=f"{end - timedelta(minutes=span - 1 - index):%H:%M}")
        for index in range(0, span, max(span // 6, 1))
    )


def throughput_chart(
    minutes: Mapping[datetime, Mapping[str, int]], *, now: datetime, span: int = 60
) -> Chart:
    """Stacked bars per minute over the last `span` minutes: succeeded, retried, failed."""
    end = now.replace(second=0, microsecond=0)
    slots = [end - timedelta(minutes=span - 1 - index) for index in range(span)]
    kinds = ("succeeded", "retried", "failed")
    counts = [{kind: minutes.get(slot, {}).get(kind, 0) for kind in kinds} for slot in slots]
    peak = _nice_ceiling(max((sum(c.values()) for c in counts), default=0))
    slot_width = CHART_WIDTH / span
    shapes = []
    for index, (slot, count) in enumerate(zip(slots, counts, strict=True)):
        base = float(CHART_HEIGHT)
        for kind in kinds:
            if not count[kind]:
                continue
            height = CHART_HEIGHT * count[kind] / peak
            base -= height
            shapes.append(
                Shape(
                    x=index * slot_width + 1,
                    y=base,
                    width=max(slot_width - 2, 1),
                    height=height,
                    kind=kind,
                    title=f"{slot:%H:%M} UTC: {count[kind]} {kind}",
                )
            )
    x_ticks = _minute_ticks(end, span)
    y_ticks = (Tick(CHART_HEIGHT, "0"), Tick(CHART_HEIGHT / 2, f"{peak / 2:g}"), Tick(0, f"{peak}"))
    return Chart(
        width=CHART_WIDTH,
        height=CHART_HEIGHT,
        shapes=tuple(shapes),
        x_ticks=x_ticks,
        y_ticks=y_ticks,
        total=sum(sum(c.values()) for c in counts),
        legend=kinds,
    )


def failure_chart(
    minutes: Mapping[datetime, Mapping[str, int]], *, now: datetime, span: int = 60
) -> Chart:
    """Bars per minute of the share of finished tasks that failed for good (0-100 %)."""
    end = now.replace(second=0, microsecond=0)
    slot_width = CHART_WIDTH / span
    shapes = []
    for index in range(span):
        slot = end - timedelta(minutes=span - 1 - index)
        counts = minutes.get(slot, {})
        failed = counts.get("failed", 0)
        finished = failed + counts.get("succeeded", 0)
        if not failed:
            continue
        share = failed / finished
        shapes.append(
            Shape(
                x=index * slot_width + 1,
                y=CHART_HEIGHT * (1 - share),
                width=max(slot_width - 2, 1),
                height=CHART_HEIGHT * share,
                kind="failed",
                title=f"{slot:%H:%M} UTC: {share:.0%} failed ({failed} of {finished})",
            )
        )
    x_ticks = _minute_ticks(end, span)
    y_ticks = (Tick(CHART_HEIGHT, "0%"), Tick(CHART_HEIGHT / 2, "50%"), Tick(0, "100%"))
    return Chart(
        width=CHART_WIDTH,
        height=CHART_HEIGHT,
        shapes=tuple(shapes),
        x_ticks=x_ticks,
        y_ticks=y_ticks,
        total=len(shapes),
    )


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:  # noqa: PLR2004 - two minutes still read best in seconds
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


class _TimelineBuilder:
    """Walks a task's events once, opening and closing the bars of the chart."""

    def __init__(self, first: datetime, total: float) -> None:
        self.first = first
        self.scale = (CHART_WIDTH - LABEL_WIDTH) / total
        self.rows = [Tick(ROW_HEIGHT / 2, "queue")]
        self.shapes: list[Shape] = []
        self.waiting: datetime | None = None
        # (start, row, worker) of the attempt in progress
        self.running: tuple[datetime, int, str] | None = None
        # (attempt, row) of an attempt handed back (released): not spent, so its next
        # start is the same attempt again and is drawn on the same row. A task handed back
        # over and over is one row, not a row per hand-back.
        self.handed_back: tuple[int, int] | None = None
        self.starts: dict[int, int] = {}
        # Each row's workers, in the order they started it: a handed-back attempt may start
        # again elsewhere, and the row named only the latest, with every bar under it.
        self.workers: dict[int, list[str]] = {}

    def add(self, row: int, start: datetime, end: datetime, kind: str, title: str) -> None:
        seconds = (end - start).total_seconds()
        self.shapes.append(
            Shape(
                x=LABEL_WIDTH + (start - self.first).total_seconds() * self.scale,
                y=row * ROW_HEIGHT + 4,
                width=max(seconds * self.scale, 2),
                height=ROW_HEIGHT - 8,
                kind=kind,
                title=f"{title} ({_duration(seconds)})",
            )
        )

    def step(self, event: TaskEvent) -> None:
        if event.event == "started":
            if self.waiting is not None:
                self.add(0, self.waiting, event.at, "waiting", "queued")
                self.waiting = None
            worker = event.worker_id or "?"
            if self.handed_back is not None and self.handed_back[0] == event.attempt:
                row = self.handed_back[1]
                self.starts[row] += 1
                if worker not in self.workers[row]:
                    self.workers[row].append(worker)
                label = (
                    f"attempt {event.attempt} · {', '.join(self.workers[row])} · "
                    f"{self.starts[row]} starts"
                )
                self.rows[row] = Tick(self.rows[row].position, label)
            else:
                row = len(self.rows)
                self.starts[row] = 1
                self.workers[row] = [worker]
                self.rows.append(
                    Tick((row + 0.5) * ROW_HEIGHT, f"attempt {event.attempt} · {worker}")
                )
            self.running = (event.at, row, worker)
            self.handed_back = None
        elif self.running is not None and event.event in ATTEMPT_ENDINGS:
            # A worker with a codec seals its errors; the hover says so instead of base64.
            shown = "(encrypted)" if event.detail and is_sealed_text(event.detail) else event.detail
            detail = f": {shown}" if shown else ""
            start, row, worker = self.running
            self.add(row, start, event.at, event.event, f"{event.event} on {worker}{detail}")
            self.running = None
            if event.event == "released":
                self.handed_back = (event.attempt, row)
        elif event.event == "cancelled" and self.waiting is not None:
            self.add(0, self.waiting, event.at, "waiting", "queued, then cancelled")
            self.waiting = None
        if event.event in ("retried", "cancelled"):
            # A new series of attempts, or none: a later "attempt 1" is not the one handed
            # back, and was drawn on its row.
            self.handed_back = None
        if event.state.value == "queued" and self.waiting is None:
            self.waiting = event.at

    def finish(self, now: datetime) -> None:
        """Draw what is still open up to `now` (a live task)."""
        if self.running is not None:
            start, row, worker = self.running
            self.add(row, start, now, "running", f"running on {worker}")
        if self.waiting is not None:
            self.add(0, self.waiting, now, "waiting", "queued")


def task_timeline(events: Sequence[TaskEvent], *, now: datetime, live: bool) -> Chart:
    """A row per attempt, plus a `queue` row for the time spent waiting between them.

    An attempt runs from its `started` event to the event that ended it (coloured by that
    event); a live task's open period runs to `now`. An attempt handed back and started
    again keeps its row. The rows are as many as the attempts in `events`, which a caller
    bounds (the dashboard draws a page of the history).
    """
    if not events:
        return Chart(width=CHART_WIDTH, height=ROW_HEIGHT, shapes=())
    first = events[0].at
    last = now if live else events[-1].at
    total = max((last - first).total_seconds(), 0.001)
    builder = _TimelineBuilder(first, total)
    for event in events:
        builder.step(event)
    if live:
        builder.finish(now)
    width = CHART_WIDTH - LABEL_WIDTH
    x_ticks = tuple(
        Tick(LABEL_WIDTH + fraction * width, f"+{_duration(total * fraction)}")
        for fraction in (0, 0.25, 0.5, 0.75, 1)
    )
    return Chart(
        width=CHART_WIDTH,
        height=len(builder.rows) * ROW_HEIGHT,
        shapes=tuple(builder.shapes),
        x_ticks=x_ticks,
        rows=tuple(builder.rows),
        total=len(builder.rows) - 1,
    )
