"""Task explanations: why a task is where it is, in plain sentences.

`explain` turns one `task_explain` row into sentences, most important first. It answers the
question operators ask most ("why isn't this task running?"): waiting behind older tasks,
no live worker for its type, waiting out a retry backoff, running on a worker that went
silent, and so on. Pure: no I/O, so every branch is tested without a database.
`Explainer` holds the cluster's timings the sentences depend on, and reads the row on its
caller's connection, so an explanation can share a snapshot with the rest of a reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from conveyor.codec import shown_text
from conveyor.storage import queries
from conveyor.text import utc_time

if TYPE_CHECKING:
    from datetime import datetime, timedelta

# Beyond a reaper round, how late a due retry may be moved into the queue (a busy leader,
# a slow statement) before it is called overdue.
PROMOTION_MARGIN: Final = 1.0


def _text(text: str | None) -> str:
    """A task's error, detail or progress as a sentence shows it: `-` for none.

    Sealed by the worker, as the dashboard shows it (a client with the key opens the task's
    status).
    """
    return shown_text(text) or "-"


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "an unknown time"
    return f"{seconds:.1f}s"


def _at(moment: datetime) -> str:
    """A moment as every view shows it, to the millisecond."""
    return utc_time(moment, precise=True)


def _paused(row: Any, consequence: str) -> str:
    why = f" ({row['paused_reason']})" if row["paused_reason"] else ""
    return (
        f"its type {row['type']!r} is paused{why} since {_at(row['paused_at'])}: "
        f"{consequence} until `conveyor resume {row['type']}`"
    )


def _queued(row: Any, promotion_round: float) -> list[str]:
    reasons = []
    task_type = row["type"]
    if row["paused_at"] is not None:
        reasons.append(_paused(row, "no worker leases it"))
    if row["backing_off"]:
        reasons.append(
            f"waiting for its retry backoff: it becomes available in "
            f"{_ago(row['available_in'])}, after attempt {row['attempt']} of "
            f"{row['max_retries'] + 1} ended ({row['last_event']}): {_text(row['last_error'])}"
        )
    elif row["state"] == "scheduled":
        # Due, but not yet moved into the queue: the scheduling server's timer or the
        # leader's next round does that; overdue by more than a round means neither ran.
        # Within a round it is only the moment between the two: the alarm was raised then
        # too, for every retry looked at as its backoff ended (8 of 9 in a review).
        overdue_by = -(row["available_in"] or 0.0)
        sentence = (
            f"its retry backoff ended {_ago(overdue_by)} ago and it joins the queue at the "
            "next promotion (its server's timer, or the leader's next reaper round)"
        )
        if overdue_by > promotion_round + PROMOTION_MARGIN:
            sentence += (
                ": long overdue, look for a server without a leader or failing to promote "
                "(`retry_promotion_failed` in its log)"
            )
        reasons.append(sentence)
    elif row["ahead"]:
        reasons.append(
            f"waiting behind {row['ahead']} older available task(s) of type {task_type!r} "
            "(FIFO per type)"
        )
    else:
        reasons.append(f"next in line for type {task_type!r}")
    if row["live_workers"] == 0:
        reasons.append(
            f"no live worker handles type {task_type!r}: it will not start until one "
            "registers (check `conveyor workers`)"
        )
    else:
        reasons.append(
            f"{row['live_workers']} live worker(s) handle type {task_type!r} "
            f"with {row['live_slots']} slot(s) in all"
        )
    if row["last_event"] in ("lease_expired", "released", "timed_out") and not row["backing_off"]:
        reasons.append(
            f"its previous attempt ended with {row['last_event']}: "
            f"{_text(row['last_detail'])}; it was re-queued"
        )
    return reasons


def _running(row: Any, promotion_round: float) -> list[str]:
    reasons = [
        (
            f"running attempt {row['attempt']} of {row['max_retries'] + 1} on worker "
            f"{row['worker_id']} for {_ago(row['running_for'])}"
        )
    ]
    silent = row["worker_silent_for"]
    reasons.append(
        f"that worker is {row['worker_state'] or 'unknown'}; its last heartbeat was "
        f"{_ago(silent)} ago"
    )
    lease_left = row["lease_left"]
    if lease_left is not None and lease_left < 0:
        # On the last attempt the reaper fails the task rather than queueing it again.
        fate = (
            "fail it (this was its last attempt)"
            if row["attempt"] > row["max_retries"]
            else "re-queue it"
        )
        sentence = (
            f"its lease expired {_ago(-lease_left)} ago: the leader's reaper will {fate} "
            "at its next round"
        )
        # As for a due retry: past a round and the margin, no reaper ran (a leader gap
        # read "will re-queue it" for 8 s while no server led, in a review).
        if -lease_left > promotion_round + PROMOTION_MARGIN:
            sentence += (
                ": long overdue, look for a cluster without a leader (`conveyor stats` names "
                "it) or a reaper failing (its log)"
            )
        reasons.append(sentence)
    else:
        reasons.append(f"its lease runs for {_ago(lease_left)} more unless renewed")
    if row["progress"] is not None:
        reasons.append(f"last progress report: {_text(row['progress'])}")
    if row["paused_at"] is not None:
        reasons.append(_paused(row, "this attempt may finish, but no new one starts"))
    return reasons


def explain(row: Any, *, promotion_round: float) -> list[str]:
    """Sentences explaining a task's state, most important first.

    `promotion_round`: the seconds between the leader's promotions of due retries (its
    reaper interval); a due retry is overdue only past it.
    """
    state = row["state"]
    if state in ("queued", "scheduled"):
        return _queued(row, promotion_round)
    if state == "running":
        return _running(row, promotion_round)
    attempts = f"after {row['attempt']} attempt(s)"
    if state == "succeeded":
        return [f"succeeded {attempts}, at {_at(row['finished_at'])}"]
    if state == "failed":
        return [
            f"failed for good {attempts}, at {_at(row['finished_at'])}",
            f"last error: {_text(row['last_error'])}",
        ]
    return [f"cancelled at {_at(row['finished_at'])}: {_text(row['last_detail'])}"]


@dataclass(frozen=True, slots=True)
class Explainer:
    """`explain` with this server's timings (see `from_settings`)."""

    # A worker counts as live while heard from within this.
    live_within: timedelta
    # The seconds between the leader's promotions of due retries.
    promotion_round: float

    @classmethod
    def from_settings(
        cls, *, worker_lost_after: timedelta, lease_ttl: timedelta, reaper_interval: timedelta
    ) -> Explainer:
        """The explainer for a server with these settings."""
        # Live means heard from within both: silent past its lease, a worker's leases are
        # expiring whatever the sweep has yet to say, and with a lease shorter than
        # `worker_lost_after` a killed worker was still "1 live worker" for its own
        # re-queued task (a review: 8 s of it with a 6 s lease).
        return cls(min(worker_lost_after, lease_ttl), reaper_interval.total_seconds())

    async def read(self, conn: Any, task_id: str) -> tuple[Any, list[str]] | None:
        """The task's `task_explain` row and its sentences; None when there is no task."""
        row = await queries.task_explain(conn, task_id=task_id, live_within=self.live_within)
        if row is None:
            return None
        return row, explain(row, promotion_round=self.promotion_round)
