"""Several servers or `conveyor migrate` runs starting at once on an
empty database, and `conveyor migrate` on a database whose schema is ahead of the code."""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
from importlib import resources
from pathlib import Path

import asyncpg
from conftest import ServerThread, server_config_for_tests
from helpers import Db, assert_ok, assert_one_error_line, conveyor_command, process_env, run_cli

from conveyor import Client, Task
from conveyor.storage import migrate

LATEST = migrate.latest_version()


def test_three_servers_start_at_once_on_an_empty_database(empty_database_url) -> None:
    servers = [
        ServerThread(server_config_for_tests(empty_database_url, migrate=True)) for _ in range(3)
    ]
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            started = list(pool.map(lambda s: s.start(), servers))
        assert len(started) == 3
        db = Db(empty_database_url)
        assert [
            r["version"]
            for r in db.fetch("SELECT version FROM conveyor_schema_migrations ORDER BY version")
        ] == list(range(1, LATEST + 1))
        for server in servers:
            with Client(server.address) as client:
                client.enqueue_task(Task(type="race.t"))
    finally:
        for server in servers:
            server.stop()


def test_three_migrate_commands_at_once_on_an_empty_database(empty_database_url) -> None:
    procs = [
        subprocess.Popen(
            conveyor_command("migrate", "--database-url", empty_database_url),
            env=process_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, (out, err)
        assert "Traceback" not in err
    applied = [out.count("applied ") for out, _ in outputs]
    assert sorted(applied) == [0, 0, LATEST], outputs


def _newer_release(folder: Path, header: str) -> Path:
    shipped = resources.files("conveyor.storage").joinpath("migrations")
    folder.mkdir()
    for entry in shipped.iterdir():
        if entry.name.endswith(".sql"):
            (folder / entry.name).write_text(entry.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / f"{LATEST + 1:04d}_next.sql").write_text(
        header + "ALTER TABLE conveyor_workers ADD COLUMN zone text;\n", encoding="utf-8"
    )
    return folder


def test_migrate_command_on_an_incompatible_newer_schema(database_url, tmp_path) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await migrate.migrate(conn, migrations_dir=_newer_release(tmp_path / "n", ""))
        finally:
            await conn.close()

    asyncio.run(go())
    db = Db(database_url)
    before = db.fetch("SELECT version, name FROM conveyor_schema_migrations ORDER BY version")
    result = run_cli("migrate", "--database-url", database_url)
    line = assert_one_error_line(result)
    assert "upgrade Conveyor" in line
    after = db.fetch("SELECT version, name FROM conveyor_schema_migrations ORDER BY version")
    assert before == after


def test_migrate_command_on_a_compatible_newer_schema(database_url, tmp_path) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await migrate.migrate(
                conn,
                migrations_dir=_newer_release(
                    tmp_path / "n", f"-- oldest-compatible-schema: {LATEST}\n"
                ),
            )
        finally:
            await conn.close()

    asyncio.run(go())
    out = assert_ok(run_cli("migrate", "--database-url", database_url))
    assert f"version {LATEST + 1}" in out
