"""Fixtures of the fault-injection suite (the machinery lives in faults/cluster.py).

`cluster`: the scenario's processes, proxies and clients (`faults.cluster.Cluster`). When the
scenario ends, the invariants are checked against the ledger and the database while every
process still runs (`check_invariants`: acknowledged tasks all reach a final state within
a bound, none is lost, one outcome per attempt, re-runs only after an expiry, release or
failure in the history, attempts within 1 + max_retries, one leader per term), a row of the
results table is kept, and everything is stopped: workers with SIGKILL (the scenario is
over; a drain would only cost time), proxies, clients, then servers with SIGTERM.

At the end of the run faults/results.py prints the results table and writes it as JSON to
test-artifacts/faults.json (git-ignored). Columns: tasks (rows in conveyor_tasks),
executions (ledger 'start' rows: real handler runs), duplicates (executions beyond the
first of each task; each must be explained by an expiry, release or failure in the task's
history), lost (acknowledged tasks missing or not final within the bound), recover (s)
(each scenario's own measure, recorded with `cluster.record_recovery`: from the fault to
the moment the affected tasks ran again elsewhere, a new leader led, /readyz answered
200 again, or the server listened again; in the soak the worst fault), result.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pytest
from faults.cluster import FINAL_STATE_TIMEOUT, Cluster, Summary, check_invariants
from faults.results import RESULT_PROPERTY
from helpers import Db, Ledger

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


def scenario_outcome(item: pytest.Item) -> str:
    """passed, failed or skipped (from the reports tests/conftest.py keeps on the item)."""
    setup = getattr(item, "rep_setup", None)
    call = getattr(item, "rep_call", None)
    if setup is not None and setup.skipped:
        return "skipped"
    if call is None:
        return "failed"  # the setup failed
    return str(call.outcome)


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest,
    database_url: str,
    processes: Callable[..., Any],
    ledger: Ledger,
    db: Db,
) -> Iterator[Cluster]:
    """The scenario's cluster; invariants are checked and a result row kept afterwards."""
    name = request.node.name.removeprefix("test_")
    started = time.monotonic()
    cluster = Cluster(processes, database_url, ledger, db, scenario=name)
    try:
        yield cluster
    finally:
        outcome = scenario_outcome(request.node)
        summary = Summary()
        try:
            summary = check_invariants(db, ledger, cluster.acked, timeout=FINAL_STATE_TIMEOUT)
        finally:
            cluster.stop_everything()
            request.node.user_properties.append(
                (
                    RESULT_PROPERTY,
                    {
                        "scenario": name,
                        "tasks": summary.tasks,
                        "executions": summary.executions,
                        "duplicates": summary.duplicates,
                        "lost": summary.lost,
                        "recover_s": (
                            None
                            if cluster.recovery_seconds is None
                            else round(cluster.recovery_seconds, 2)
                        ),
                        "result": "failed" if summary.violations else outcome,
                        "violations": len(summary.violations),
                        "seconds": round(time.monotonic() - started, 1),
                        "notes": "; ".join(cluster.notes),
                    },
                )
            )
    if summary.violations:
        pytest.fail(
            f"{len(summary.violations)} invariant violation(s):\n"
            + "\n".join(summary.violations[:40])
        )
