"""Thousands of expired leases at once; every one retried or failed
exactly once, and the counts (history, metrics) exact; the retries promoted and run."""

from __future__ import annotations

from helpers import wait_for

SEED = """
INSERT INTO conveyor_tasks (id, type, state, attempt, max_retries, timeout, started_at,
    worker_id, lease_id, lease_expires_at, deadline_at, payload)
SELECT gen_random_uuid(), $1, 'running', $2, 3, interval '1 min', now() - interval '2 min',
       $3, gen_random_uuid(), now() - interval '1 s' - g * interval '1 ms',
       now() - interval '1 min', ''
FROM generate_series(1, $4) AS g
"""


def test_thousands_of_expired_leases_each_reaped_once(start_server, db) -> None:
    # One worker went silent before the deadline (lease_expired), one was heard after it
    # (timed_out).
    db.execute(
        "INSERT INTO conveyor_workers (id, host, pid, task_types, concurrency, version, state, "
        "last_heartbeat_at) VALUES "
        "('w-silent', 'h', 1, '{reap.t}', 1, '0', 'lost', now() - interval '5 min'), "
        "('w-late', 'h', 2, '{reap.t}', 1, '0', 'stopped', now() - interval '10 s')"
    )
    db.execute(SEED, "reap.retry", 1, "w-silent", 2500)
    db.execute(SEED, "reap.last", 4, "w-late", 2500)
    db.execute(
        "INSERT INTO conveyor_tasks (id, type, state, attempt, max_retries, timeout, started_at, "
        "worker_id, lease_id, lease_expires_at, deadline_at, payload) "
        "SELECT gen_random_uuid(), 'reap.live', 'running', 1, 3, interval '1 h', now(), "
        "'w-live', gen_random_uuid(), now() + interval '10 min', now() + interval '1 h', '' "
        "FROM generate_series(1, 500)"
    )
    server = start_server(
        retry_backoff_base=__import__("datetime").timedelta(milliseconds=50),
        retry_backoff_cap=__import__("datetime").timedelta(milliseconds=100),
    )
    wait_for(
        lambda: (
            db.fetchval(
                "SELECT count(*) FROM conveyor_tasks "
                "WHERE state = 'running' AND type <> 'reap.live'"
            )
            == 0
        ),
        timeout=60,
        what="every expired lease reaped",
    )
    # Retries promoted back into the queue.
    wait_for(
        lambda: db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE state = 'scheduled'") == 0,
        timeout=30,
        what="every retry promoted",
    )
    states = {
        (r["type"], r["state"]): r["n"]
        for r in db.fetch(
            "SELECT type, state::text, count(*) AS n FROM conveyor_tasks GROUP BY 1, 2"
        )
    }
    assert states == {
        ("reap.retry", "queued"): 2500,
        ("reap.last", "failed"): 2500,
        ("reap.live", "running"): 500,
    }
    events = {
        (r["event"], r["state"]): r["n"]
        for r in db.fetch(
            "SELECT event, state::text, count(*) AS n FROM conveyor_task_events GROUP BY 1, 2"
        )
    }
    assert events == {("lease_expired", "scheduled"): 2500, ("timed_out", "failed"): 2500}
    assert (
        db.fetchval(
            "SELECT max(n) FROM (SELECT count(*) AS n FROM conveyor_task_events GROUP BY task_id) x"
        )
        == 1
    )
    assert (
        db.fetchval(
            "SELECT count(*) FROM conveyor_tasks WHERE type = 'reap.retry' AND attempt <> 1"
        )
        == 0
    )
    cut_short = {
        (s.labels["type"], s.labels["reason"]): s.value
        for s in __import__("helpers").metric_samples(server.http_url)
        if s.name == "conveyor_attempts_cut_short_total" and s.value  # (each type's start at 0)
    }
    assert cut_short == {("reap.retry", "lease_expired"): 2500, ("reap.last", "timed_out"): 2500}
    outcomes = {
        (s.labels["type"], s.labels["outcome"]): s.value
        for s in __import__("helpers").metric_samples(server.http_url)
        if s.name == "conveyor_task_outcomes_total" and s.value
    }
    assert outcomes == {("reap.retry", "retried"): 2500, ("reap.last", "failed"): 2500}
