"""Scheduled wake-ups (a retry's backoff ending) never come before their due time.

TaskNotifier coalesces wake-ups due close together into one timer. It used to fire at the
first and drop every other one due within the next 5 ms: a retry woken up to 5 ms early is
not yet claimable, the claim that missed it marked its type drained for the round, and the
retry waited for the fallback poll, a whole `poll_interval`, instead of milliseconds. A
real event loop, no database: the timer is all that is under test, so the promotion it
runs moves nothing and reports that it moved some (the server's wakes only then).
"""

from __future__ import annotations

import asyncio

import pytest

from conveyor.server.notifier import COALESCE_WAKE_UPS, TaskNotifier


async def promoted_some() -> bool:
    return True


async def wake_times(dues: list[float], watch_for: float) -> list[float]:
    """When the notifier woke its waiters (seconds since the wake-ups were scheduled)."""
    notifier = TaskNotifier("postgresql://unused", {}, promoted_some)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for due in dues:
        notifier.wake_after(due)
    times: list[float] = []
    while (left := start + watch_for - loop.time()) > 0:
        since = notifier.generation
        await notifier.wait(since, timeout=left)
        if notifier.generation != since:
            times.append(loop.time() - start)
    return times


@pytest.mark.parametrize(
    "dues",
    [
        [0.050, 0.054],  # 4 ms apart: one wake, after both
        [0.050, 0.0549, 0.056],  # the last falls outside the first's window
        [0.050, 0.080],  # far apart: a wake each
        [0.080, 0.050, 0.052],  # scheduled out of order
    ],
    ids=["within-the-window", "straddling-it", "apart", "out-of-order"],
)
def test_every_due_time_gets_a_wake_at_or_after_it(dues: list[float]) -> None:
    times = asyncio.run(wake_times(dues, watch_for=0.2))
    assert times, "no wake-up at all"
    assert times[0] >= min(dues), f"woke at {times[0]:.4f}, before anything was due"
    for due in dues:
        assert any(due <= at for at in times), f"nothing woke at or after {due}: {times}"
        # ...and soon after: coalescing delays a wake-up by at most its window (plus the
        # loop's own lateness, generous on a busy machine).
        assert min(at for at in times if at >= due) - due < COALESCE_WAKE_UPS + 0.05
