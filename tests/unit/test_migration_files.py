"""The migration files: a series numbered 1, 2, 3..., each header read, none edited once shipped.

A database records which migrations it ran, not their text; so a shipped file must never
change (the ledger could not tell), and the series must be one a server can compare a
ledger with. See storage/migrate.py for why no checksum is kept in the database instead.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import pytest
from asyncpg import ServerVersion

from conveyor.errors import ConfigError
from conveyor.storage import migrate
from conveyor.storage.migrate import check_postgres_version

# sha256 of every shipped migration. A new migration adds its line; an existing line never
# changes: a database that ran the old text would not be migrated again, and would differ
# from every database migrated afterwards without anything saying so. To change the schema,
# write a new migration.
SHIPPED = {
    "0001_initial.sql": "818c4ced00c96fb0bfa6572a3f45e2de0b184c193d3b898e142c699bc2f82d33",
    "0002_fault_tolerance.sql": "b72832af2283c2a4c172c8f5d33a6e6cbe3078940911889e9b012f5d92023bd3",
    "0003_event_time_index.sql": "04a2a802accb183151d2690e5b0850ee85e276b750f28d92c2a20b53de00e16a",
    "0004_operator_control.sql": "198e82be8fa671cdd583d26dae3700391acc1b06d0a83f6b4459e744cc879a30",
    "0005_lean_history.sql": "2f1654c8b8fe372b09dcf925661996e615e2797765a27bf762499cbe71f1ce41",
    "0006_bulk_enqueue.sql": "748293fac0e548fd05f4fdac4a487a354215874d098cacd0d7b66bcfd64228a7",
    "0007_worker_principal.sql": "7a266b69b17b71fc0518e8642605f79c9218dbfd3c9fac2dacbb1fa8362658b0",
    "0008_audit.sql": "407f8d8e7b75d3a27a72dca2a5d0f47756897e81c98d68725f5557ef1e41f735",
    "0009_history_view.sql": "54759dad16d2fc0025ccd7a0da2b4c33a962e82178e032744a9b06d0511c6032",
    "0010_one_queue_index.sql": "a6030829328a0a937291f268277086e0e6d0d2826f6d703a6966dbad2066153f",
    "0011_claim_type_estimate.sql": (
        "0556c7f7fed2e8c0e7e5045c325c704e81a0b260ac754a8f0b32c16fe3bedcd6"
    ),
    "0012_no_running_worker_index.sql": (
        "6195bf322b288b882b4bcbd850fd239f09b59965cf3be75884dbed6d1f14ff44"
    ),
    "0013_prune_marks.sql": "584e968567664d3a9b8e444cc3aa58fa7b2861ddf8ccc513ea7fa2174de2e08a",
    "0014_schema_compatibility.sql": (
        "259d63604218657944b64e6a47b650fbc7c14691bc0162c89b51662286998c3c"
    ),
    "0015_scheduled_retries.sql": (
        "ef8804c11a584583ab3e2e8f40b4d199988e55bd1f5966ce93875d228df34879"
    ),
    "0016_worker_timing.sql": "552dc8dc83597ab1ceccb553e26ceb3cd22898140e22e0aa158bc3594bb27d60",
}


def series(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir()
    for name, sql in files.items():
        (folder / name).write_text(sql, encoding="utf-8")
    return folder


class TestShippedMigrations:
    def test_no_shipped_migration_was_edited(self) -> None:
        folder = resources.files("conveyor.storage").joinpath("migrations")
        found = {
            entry.name: hashlib.sha256(entry.read_bytes()).hexdigest()
            for entry in folder.iterdir()
            if entry.name.endswith(".sql")
        }
        edited = sorted(name for name in SHIPPED if found.get(name) != SHIPPED[name])
        assert not edited, (
            f"{edited} changed (or went) after they were shipped: restore them and put the "
            "change in a new migration"
        )
        assert sorted(found) == sorted(SHIPPED), "add the new migration's hash to SHIPPED"

    def test_each_migration_declares_which_older_servers_it_tolerates(self) -> None:
        """Only from 0014 on: before, no file had the header (0014 records their answers)."""
        declared = {m.version: m.oldest_compatible_schema for m in migrate.available_migrations()}
        assert declared == {version: version for version in range(1, 14)} | {14: 13, 15: 15, 16: 15}


class TestSeries:
    def test_a_header_in_the_leading_comments_is_read(self, tmp_path: Path) -> None:
        folder = series(
            tmp_path / "m",
            {
                "0001_a.sql": "CREATE TABLE a (x int);",
                "0002_b.sql": "-- B.\n--\n-- oldest-compatible-schema: 1\nCREATE TABLE b (x int);",
                "0003_c.sql": "-- C.\nCREATE TABLE c (x int);\n-- oldest-compatible-schema: 2\n",
            },
        )
        found = migrate.available_migrations(folder)
        assert [(m.label, m.oldest_compatible_schema) for m in found] == [
            ("0001_a", 1),
            ("0002_b", 1),
            # After the first statement it is no header: the safe default, its own version.
            ("0003_c", 3),
        ]
        assert migrate.latest_version(folder) == 3

    @pytest.mark.parametrize(
        ("files", "complaint"),
        [
            ({"0001_a.sql": "", "0003_c.sql": ""}, "numbered 1, 2, 3... without a gap"),
            ({"0002_b.sql": ""}, "numbered 1, 2, 3... without a gap"),
            ({"0001_a.sql": "", "0001_b.sql": ""}, "or a duplicate; found 1, 1"),
            ({"0001_a.sql": "", "2_b.sql": ""}, "2_b.sql in"),
            ({"0001_A.sql": ""}, "is not named NNNN_name.sql"),
            ({"0001_a.sql": "-- oldest-compatible-schema: 2\n"}, "with N from 1 to 1"),
            ({"0001_a.sql": "-- oldest-compatible-schema: 0\n"}, "with N from 1 to 1"),
            ({"0001_a.sql": "-- oldest-compatible-schema: one\n"}, "with N from 1 to 1"),
            (
                {
                    "0001_a.sql": "",
                    "0002_b.sql": "-- oldest-compatible-schema: 1\n-- oldest-compatible-schema: 1",
                },
                "must hold one line",
            ),
        ],
        ids=[
            "gap",
            "no-first",
            "duplicate",
            "misnamed",
            "upper-case",
            "above-itself",
            "zero",
            "not-a-number",
            "twice",
        ],
    )
    def test_a_folder_that_is_no_series_is_refused(
        self, tmp_path: Path, files: dict[str, str], complaint: str
    ) -> None:
        folder = series(tmp_path / "m", files)
        with pytest.raises(ConfigError, match=complaint.replace(".", r"\.")):
            migrate.available_migrations(folder)


class TestPostgresVersion:
    """PostgreSQL 13 and 14 are past their end of life, and the stats sampler's `date_bin`
    does not exist on 13: a server there failed every sample, late and quietly. Too old a
    database is refused with one clear line instead (what asyncpg reports of the server it
    connected to is all the check reads)."""

    class _Connected:
        def __init__(self, version: str) -> None:
            major, minor = (int(part) for part in version.split("."))
            self._version = ServerVersion(major, minor, 0, "final", 0)

        def get_server_version(self) -> ServerVersion:
            return self._version

    @pytest.mark.parametrize("version", ["13.16", "14.13"])
    def test_older_than_15_is_refused(self, version: str) -> None:
        with pytest.raises(ConfigError) as raised:
            check_postgres_version(self._Connected(version))
        assert raised.value.message == (
            f"PostgreSQL {version} is too old: Conveyor needs PostgreSQL 15 or newer"
        )

    @pytest.mark.parametrize("version", ["15.0", "18.1"])
    def test_15_and_newer_pass(self, version: str) -> None:
        check_postgres_version(self._Connected(version))
