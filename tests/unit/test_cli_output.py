"""What the CLI prints of handler-supplied text: never live terminal control sequences."""

from __future__ import annotations

import ast
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table

from conveyor.cli import output
from conveyor.cli.cluster_commands import render_stats
from conveyor.cli.output import inert, plain, row, truncate
from conveyor.cli.task_admin_commands import _task_table
from conveyor.types import ClusterStatus, PausedType, TaskState, TaskStatus, TypeStatus


class TestInert:
    @pytest.mark.parametrize(
        ("raw", "shown"),
        [
            ("plain text", "plain text"),
            ("tab\tand\nnewline", "tab\tand\nnewline"),
            ("\x1b[2Jcleared", "\\x1b[2Jcleared"),
            ("title\x1b]0;pwned\x07", "title\\x1b]0;pwned\\x07"),
            ("abc\u202edcba", "abc\\u202edcba"),  # a bidi override reorders what follows
            ("héllo ✓", "héllo ✓"),
        ],
    )
    def test_control_and_format_characters_become_escapes(self, raw, shown) -> None:
        assert inert(raw) == shown

    def test_every_printing_path_is_inert(self) -> None:
        assert "\x1b" not in plain("a\x1b[31mred").plain
        assert "\x1b" not in truncate("a\x1b[31mred", 40)


HOSTILE = "[/]evil[link=https://evil.example]x[/link]\x1b[2J\u202e"
SHOWN = "[/]evil[link=https://evil.example]x[/link]\\x1b[2J\\u202e"


def rendered(renderable: object) -> str:
    """What a console prints of `renderable`: with colour, so escapes would show."""
    console = Console(width=400, force_terminal=True, color_system="standard", record=True)
    with console.capture() as captured:
        console.print(renderable)
    return captured.get()


class TestTables:
    def test_a_str_cell_is_refused(self) -> None:
        """rich reads a str cell as markup: `row` takes Text only."""
        table = Table("id")
        with pytest.raises(TypeError, match=r"wrap it in output\.plain"):
            row(table, "[/]evil")  # type: ignore[arg-type]
        row(table, plain("[/]evil"))
        assert table.row_count == 1

    def test_every_cli_table_row_goes_through_row(self) -> None:
        """No command adds a row any other way, so no cell can be a bare str built from
        what the server sent (a worker id as a str cell crashed `conveyor workers`)."""
        cli = Path(output.__file__).parent
        offenders = [
            f"{path.name}:{node.lineno}"
            for path in sorted(cli.glob("*.py"))
            if path.name != "output.py"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute) and node.attr in {"add_row", "add_rows"}
        ]
        assert offenders == [], "use output.row(table, ...) instead: " + ", ".join(offenders)

    def test_the_task_listing_shows_a_worker_id_as_text(self) -> None:
        status = TaskStatus(
            id="0190d6c4-0000-7000-8000-000000000001",
            type="t",
            state=TaskState.RUNNING,
            attempts=1,
            max_retries=3,
            created_at=datetime.now(UTC),
            started_at=datetime.now(UTC),
            finished_at=None,
            last_error=None,
            worker_id=HOSTILE,
            result=None,
        )
        shown = rendered(_task_table([status], 400))
        assert SHOWN in shown
        assert "\x1b[2J" not in shown
        assert "\x1b]8;" not in shown  # no hyperlink

    def test_the_stats_view_shows_ids_and_reasons_as_text(self) -> None:
        status = ClusterStatus(
            version="1",
            server_id=HOSTILE,
            is_leader=False,
            leader_id=HOSTILE,
            leader_term=3,
            sampled_at=None,
            types=(TypeStatus("t", 1, 0, 1.0, paused=True),),
            workers={"active": 1},
            succeeded_last_minute=0,
            failed_last_minute=0,
            retried_last_minute=0,
            started_last_minute=0,
            paused_types=(PausedType("t", datetime.now(UTC), reason=HOSTILE, paused_by="ops"),),
        )
        shown = rendered(render_stats(status))
        assert shown.count(SHOWN) == 3
        assert "\x1b[2J" not in shown
        assert "\u202e" not in shown
