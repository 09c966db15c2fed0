"""The migration files: each one's compatibility header, read from its leading comments."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from conveyor.errors import ConfigError
from conveyor.storage import migrate

if TYPE_CHECKING:
    from pathlib import Path


def series(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir()
    for name, sql in files.items():
        (folder / name).write_text(sql, encoding="utf-8")
    return folder


class TestShippedMigrations:
    def test_each_migration_declares_which_older_servers_it_tolerates(self) -> None:
        """Only from 0014 on: before, no file had the header (0014 records their answers)."""
        declared = {m.version: m.oldest_compatible_schema for m in migrate.available_migrations()}
        assert declared == {version: version for version in range(1, 14)} | {14: 13}


class TestHeader:
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
        "sql",
        [
            "-- oldest-compatible-schema: 2\n",
            "-- oldest-compatible-schema: 0\n",
            "-- oldest-compatible-schema: one\n",
            "-- oldest-compatible-schema: 1\n-- oldest-compatible-schema: 1\n",
        ],
        ids=["above-itself", "zero", "not-a-number", "twice"],
    )
    def test_a_malformed_header_is_refused(self, tmp_path: Path, sql: str) -> None:
        folder = series(tmp_path / "m", {"0001_a.sql": sql})
        with pytest.raises(ConfigError, match=r"must hold one line .* with N from 1 to 1"):
            migrate.available_migrations(folder)
