"""The benchmark's report of the floor under W3 single (benchmarks/run.py, `floor_report`).

The floor's row compares the sequential target with the least a sequential enqueue costs
here: the floor itself and, since the nineteenth session, the bound (the transport's and
the insert's times alone, added). These tests hold the report to the numbers it is given,
and to result files written before the bound existed.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench_modules import load_bench_module
from rich.console import Console

run = load_bench_module("run.py", "bench_run")


def floor_run(tasks_per_second: float, transport_us: float, insert_us: float) -> dict[str, Any]:
    return {
        "tasks_per_second": tasks_per_second,
        "client_cpu_us_per_task": 240.0,
        "server_cpu_us_per_task": 300.0,
        "transport_alone_us": transport_us,
        "transport_client_cpu_us": 180.0,
        "transport_server_cpu_us": 120.0,
        "insert_alone_us": insert_us,
        "bound_per_second": round(1e6 / (transport_us + insert_us), 1),
    }


def report(runs: list[dict[str, Any]], conveyor_single: float | None = None) -> str:
    results: dict[str, dict[str, Any]] = {
        "w3-floor": {run.FLOOR: {"runs": runs, "summary": run.spread_tree(runs)}}
    }
    if conveyor_single is not None:
        single = [{"tasks_per_second": conveyor_single}]
        results["w3-single"] = {"conveyor": {"runs": single, "summary": run.spread_tree(single)}}
    console = Console(record=True, width=220)
    for part in run.floor_report(results, argparse.Namespace(w3_seconds=5.0)):
        console.print(part)
    return console.export_text()


def row(text: str, label: str) -> list[str]:
    """The cells of the table row whose first cell starts with `label`."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").split("│")]
        if cells and cells[0].startswith(label):
            return cells
    raise AssertionError(f"no row {label!r} in:\n{text}")


def test_the_bound_is_the_parts_added_and_the_target_is_set_against_it() -> None:
    # 275 µs + 337 µs = 612 µs an enqueue: 1,634 a second at most; the parts are the
    # medians of the repeats (275.5 and 336.5 µs).
    text = report(
        [floor_run(1238.0, 275.0, 337.0), floor_run(1171.0, 276.0, 336.0)], conveyor_single=816.0
    )
    assert row(text, "the transport alone")[1] == f"{1e6 / 275.5:,.0f}"
    assert row(text, "the insert and its commit alone")[1] == f"{1e6 / 336.5:,.0f}"
    bound = row(text, "both, one after the other")
    assert bound[1].startswith("1,634")
    assert bound[-1] == f"{1634.0 / 1204.5:.0%}"  # against the floor's median
    assert row(text, "Conveyor W3 single")[-1] == f"{816.0 / 1204.5:.0%}"
    assert row(text, "the target")[-1] == "1.7x the floor, 1.2x the bound"


def test_a_result_file_from_before_the_bound_still_reports_the_floor() -> None:
    old = {
        "tasks_per_second": 999.0,
        "client_cpu_us_per_task": 244.0,
        "server_cpu_us_per_task": 404.0,
    }
    text = report([old])
    assert row(text, "floor")[1] == "999"
    assert "the bound" not in text.replace("than this floor, nor faster than the bound", "")
    assert row(text, "the target")[-1] == "2x the floor"
