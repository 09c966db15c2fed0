"""The fault-injection suite's results table: gathered from every scenario, printed, saved.

A pytest plugin, loaded by tests/conftest.py (`pytest_plugins`) so that it runs in the
process that prints the summary. Under pytest-xdist that is the controller, which runs no
test: each scenario's row therefore travels in its teardown report, as a user property
(`RESULT_PROPERTY`, set by the `cluster` fixture in faults/conftest.py), and is gathered
here from the reports, wherever the scenario ran.

At the end of the run the table is printed and written as JSON to
test-artifacts/faults.json (git-ignored); faults/conftest.py's docstring describes its
columns.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import REPO_ROOT

ARTIFACT = REPO_ROOT / "test-artifacts" / "faults.json"
RESULT_PROPERTY = "fault_injection_result"

_rows: list[dict[str, Any]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Keep the row a scenario's teardown report carries."""
    if report.when != "teardown":
        return
    _rows.extend(value for name, value in report.user_properties if name == RESULT_PROPERTY)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    columns = ("scenario", "tasks", "executions", "duplicates", "lost", "recover_s", "result")
    headers = ("scenario", "tasks", "executions", "duplicates", "lost", "recover (s)", "result")
    cells = [[("-" if row[c] is None else str(row[c])) for c in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: list[str] | tuple[str, ...]) -> str:
        return "  ".join(
            value.ljust(width) if i == 0 else value.rjust(width)
            for i, (value, width) in enumerate(zip(values, widths, strict=True))
        )

    return [line(headers), *(line(row) for row in cells)]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the results table and write it to test-artifacts/faults.json."""
    if not _rows:
        return
    terminalreporter.write_sep("=", "fault injection results")
    for text in _table(_rows):
        terminalreporter.write_line(text)
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(json.dumps({"results": _rows}, indent=2) + "\n")
    terminalreporter.write_line(f"written to {ARTIFACT.relative_to(REPO_ROOT)}")
