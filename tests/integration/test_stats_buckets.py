"""The stats sampler's history buckets: Python's bucket boundaries are the database's.

The sampler keeps outcome counts per 5-second bucket (`task_event_buckets`, PostgreSQL's
`date_bin`) and sums them into minutes and the last minute in Python; both sides must cut
time at the same instants, or a bucket would be counted in the wrong minute.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from conveyor.server.stats_sampler import BUCKET, _bucket, _minute
from conveyor.storage.queries import SQL


def test_python_buckets_match_date_bin(db) -> None:
    """Moments on and around bucket and minute edges fall in the same bucket on both sides."""
    base = datetime(2026, 11, 29, 23, 59, 55, tzinfo=UTC)
    moments = [
        base + timedelta(microseconds=offset)
        for offset in (0, 1, 4_999_999, 5_000_000, 5_000_001, 59_999_999, 123_456_789)
    ]
    bins = db.fetch(
        "SELECT m, date_bin(make_interval(secs => $2), m, "
        "TIMESTAMPTZ '2000-01-01 00:00:00+00') AS b FROM unnest($1::timestamptz[]) AS m",
        moments,
        BUCKET.total_seconds(),
    )
    assert [row["b"] for row in bins] == [_bucket(moment) for moment in moments]
    # Buckets never straddle a minute: each lies in the minute it starts in.
    for moment in moments:
        assert _minute(_bucket(moment)) == _minute(moment)


def test_the_bucket_query_counts_each_outcome_once(db) -> None:
    """Events seeded across three buckets are counted in the buckets they fall in."""
    task = "0193a1b2-0000-7000-8000-000000000001"
    start = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
    rows = [
        (start + timedelta(seconds=1), "started", "running"),
        (start + timedelta(seconds=4.9), "succeeded", "succeeded"),
        (start + timedelta(seconds=5), "started", "running"),
        (start + timedelta(seconds=6), "failed", "queued"),
        (start + timedelta(seconds=11), "failed", "failed"),
    ]
    for at, event, state in rows:
        db.fetch(
            "INSERT INTO conveyor_task_events (task_id, at, event, state, attempt) "
            "VALUES ($1::uuid, $2, $3, $4::conveyor_task_state, 1)",
            task,
            at,
            event,
            state,
        )
    counted = db.fetch(SQL["task_event_buckets"], start, BUCKET.total_seconds())
    assert [
        (row["bucket"], row["started"], row["succeeded"], row["retried"], row["failed"])
        for row in counted
    ] == [
        (start, 1, 1, 0, 0),
        (start + BUCKET, 1, 0, 1, 0),
        (start + 2 * BUCKET, 0, 0, 0, 1),
    ]
