"""A database created at every older schema level, with real data in it
(tasks in every state, their history, workers, paused types), upgraded to the latest and
then served by a server of this release."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from importlib import resources
from pathlib import Path

import asyncpg
import pytest
from helpers import Db, migrate_with, succeed_as_a_worker, wait_for

from conveyor import Client, TaskState
from conveyor.storage import migrate

pytestmark = pytest.mark.slow  # a database at every schema level, each filled and upgraded

LATEST = migrate.latest_version()


def release_up_to(folder: Path, level: int) -> Path:
    shipped = resources.files("conveyor.storage").joinpath("migrations")
    folder.mkdir()
    for entry in shipped.iterdir():
        if entry.name.endswith(".sql") and int(entry.name[:4]) <= level:
            (folder / entry.name).write_text(entry.read_text(encoding="utf-8"), encoding="utf-8")
    return folder


TASK = """
INSERT INTO conveyor_tasks (id, type, state, attempt, max_retries, timeout, created_at,
    available_at, started_at, finished_at, worker_id, lease_id, lease_expires_at,
    deadline_at, last_error, payload)
VALUES ($1::uuid, $2, $3::conveyor_task_state, $4, 3, interval '1 min',
    now() - $5::interval, now() - $5::interval + $6::interval, $7, $8, $9, $10, $11, $12, $13, '')
"""


async def insert_task(
    conn: asyncpg.Connection,
    task_id: str,
    task_type: str,
    state: str,
    *,
    attempt: int = 0,
    age: timedelta = timedelta(hours=1),
    available_after: timedelta = timedelta(0),
    worker_id: str | None = None,
    last_error: str | None = None,
) -> None:
    """A task row as an older release wrote it: enqueued `age` ago, no lease."""
    await conn.execute(
        TASK,
        task_id,
        task_type,
        state,
        attempt,
        age,
        available_after,
        None,
        None,
        worker_id,
        None,
        None,
        None,
        last_error,
    )


EVENT = """
INSERT INTO conveyor_task_events (task_id, at, event, state, attempt, worker_id)
VALUES ($1::uuid, now() - $2::interval, $3, $4::conveyor_task_state, $5, $6)
"""


def seed(url: str, level: int) -> dict[str, str]:
    ids = {
        name: str(uuid.uuid4())
        for name in (
            "queued",
            "backoff",
            "expired",
            "old_succeeded",
            "young_succeeded",
            "old_failed",
            "old_cancelled",
            "paused",
        )
    }

    async def go() -> None:
        conn = await asyncpg.connect(url)
        try:
            d = timedelta(days=30)
            await insert_task(conn, ids["queued"], "up.q", "queued")
            # An older release's retry waiting out its backoff: queued, due in 2 s.
            await insert_task(
                conn,
                ids["backoff"],
                "up.b",
                "queued",
                attempt=1,
                age=timedelta(minutes=1),
                available_after=timedelta(minutes=1, seconds=2),
                worker_id="w-old",
                last_error="ValueError: x",
            )
            await conn.execute(
                "INSERT INTO conveyor_tasks (id, type, state, attempt, max_retries, timeout, "
                "started_at, worker_id, lease_id, lease_expires_at, deadline_at, payload) "
                "VALUES ($1::uuid, 'up.e', 'running', 1, 3, interval '5 min', "
                "now() - interval '4 min', 'w-gone', gen_random_uuid(), "
                "now() - interval '1 min', now() + interval '1 min', '')",
                ids["expired"],
            )
            await conn.execute(
                EVENT, ids["expired"], timedelta(minutes=4), "started", "running", 1, "w-gone"
            )
            for name, state, age in (
                ("old_succeeded", "succeeded", d),
                ("young_succeeded", "succeeded", timedelta(hours=1)),
                ("old_failed", "failed", d),
                ("old_cancelled", "cancelled", d),
            ):
                await insert_task(
                    conn,
                    ids[name],
                    "up.f",
                    state,
                    attempt=1,
                    age=age + timedelta(hours=1),
                    worker_id="w-gone",
                )
                await conn.execute(
                    "UPDATE conveyor_tasks SET started_at = now() - $2::interval, "
                    "finished_at = now() - $2::interval WHERE id = $1::uuid",
                    ids[name],
                    age,
                )
                if level < 9:
                    await conn.execute(
                        EVENT, ids[name], age + timedelta(hours=1), "enqueued", "queued", 0, None
                    )
                await conn.execute(EVENT, ids[name], age, "started", "running", 1, "w-gone")
                await conn.execute(EVENT, ids[name], age, state, state, 1, "w-gone")
            await insert_task(conn, ids["paused"], "up.p", "queued")
            await conn.execute(
                "INSERT INTO conveyor_workers (id, host, pid, task_types, concurrency, version, "
                "state, started_at, last_heartbeat_at) VALUES "
                "('w-gone', 'h', 1, '{up.f}', 1, '0', 'stopped', now() - interval '31 days', "
                "now() - interval '30 days')"
            )
            if level >= 4:
                await conn.execute("INSERT INTO conveyor_paused_types (type) VALUES ('up.p')")
        finally:
            await conn.close()

    asyncio.run(go())
    return ids


@pytest.mark.parametrize("level", list(range(1, LATEST)))
def test_upgrade_with_data_from_every_level(level, empty_database_url, start_server, tmp_path):
    url = empty_database_url
    assert migrate_with(url, release_up_to(tmp_path / "old", level))[-1] == level
    ids = seed(url, level)
    assert migrate_with(url, None) == list(range(level + 1, LATEST + 1))
    db = Db(url)
    if level < 4:
        db.execute("INSERT INTO conveyor_paused_types (type) VALUES ('up.p')")

    server = start_server(database_url=url, retention_interval=timedelta(milliseconds=500))
    with Client(server.address) as client:
        # Every task reads in its state.
        for name, state in (
            ("queued", TaskState.QUEUED),
            ("backoff", TaskState.QUEUED),
            ("young_succeeded", TaskState.SUCCEEDED),
            ("paused", TaskState.QUEUED),
        ):
            status = client.get_task_status(ids[name], history=True)
            assert status.state is state, (name, status)
        # Retention (7 days) deletes the old finished tasks and their history, nothing else.
        wait_for(
            lambda: (
                db.fetchval(
                    "SELECT count(*) FROM conveyor_tasks WHERE id = ANY($1::uuid[])",
                    [ids["old_succeeded"], ids["old_failed"], ids["old_cancelled"]],
                )
                == 0
            ),
            timeout=30,
            what="old finished tasks pruned",
        )
        assert (
            db.fetchval(
                "SELECT count(*) FROM conveyor_task_events WHERE task_id = ANY($1::uuid[])",
                [ids["old_succeeded"], ids["old_failed"], ids["old_cancelled"]],
            )
            == 0
        )
        assert client.get_task_status(ids["young_succeeded"]).state is TaskState.SUCCEEDED
        # The reaper retries the expired lease; the worker retention drops the old worker.
        wait_for(
            lambda: db.task(ids["expired"])["state"] in ("scheduled", "queued"),
            timeout=30,
            what="expired lease reaped",
        )
        wait_for(
            lambda: db.fetchval("SELECT count(*) FROM conveyor_workers") == 0,
            timeout=30,
            what="old worker pruned",
        )
        # The queued task and the old release's backoff are claimed and run.
        succeed_as_a_worker(server.address, "up.q")
        assert client.get_task_status(ids["queued"]).state is TaskState.SUCCEEDED
        succeed_as_a_worker(server.address, "up.b")
        assert client.get_task_status(ids["backoff"]).state is TaskState.SUCCEEDED
        succeed_as_a_worker(server.address, "up.e")
        expired = client.get_task_status(ids["expired"], history=True)
        assert expired.state is TaskState.SUCCEEDED
        assert expired.attempts == 2
        # The paused type stays paused.
        assert client.get_task_status(ids["paused"]).state is TaskState.QUEUED
        assert db.task(ids["paused"])["state"] == "queued"
