"""A producer that invents a type per task: every view of the queue by type stays bounded.

The metrics bound their type labels (MAX_TYPE_LABELS); the stats sample, `/status`,
`GetStatus` (and `conveyor stats`) and the dashboard's overview list a bounded number of
types too: the ones that most need attention, every paused type, and a sum of all the
others, so the totals stay exact. Checked at the real bound, against a real server, real
PostgreSQL and the real CLI.
"""

from __future__ import annotations

import json
import re
import urllib.request

from helpers import assert_ok, metric_samples, run_cli, wait_for

from conveyor import Client, Task
from conveyor.monitoring.dashboard.views import OVERVIEW_TYPES
from conveyor.server.stats_sampler import NAMED_TYPES

SPAM = 1200
# The oldest queued task of all: it must be listed whatever else is queued.
STUCK = "stuck.old"
# Paused: one whose task would otherwise be summed with the others, one with no task.
PAUSED_BUSY = f"spam.{SPAM - 1:04d}"
PAUSED_IDLE = "paused.idle"
TOTAL_QUEUED = 1 + SPAM + 5
TOTAL_TYPES = 1 + SPAM + 1


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - the test server
        return response.read().decode()


def complete_status(server) -> dict | None:
    """/status once its sample holds every enqueued task and both pauses, else None."""
    document = json.loads(get(f"{server.http_url}/status"))
    queue = document["queue"]
    # The pauses too: a sample taken between the enqueues and the second pause left
    # PAUSED_IDLE unlisted (a fresh-clone CI run failed on it).
    complete = queue["queued"] == TOTAL_QUEUED and PAUSED_IDLE in queue["by_type"]
    return document if complete else None


def test_a_flood_of_types_is_listed_bounded_with_exact_totals(server, client: Client) -> None:
    client.enqueue_task(Task(type=STUCK))
    for start in range(0, SPAM, 600):
        client.enqueue_tasks([Task(type=f"spam.{i:04d}") for i in range(start, start + 600)])
    client.enqueue_tasks([Task(type="busy.young") for _ in range(5)])
    client.pause_type(PAUSED_BUSY, reason="flood")
    client.pause_type(PAUSED_IDLE)
    bound = 2 * NAMED_TYPES + 2  # by need, those with gauges of their own, the paused

    document = wait_for(
        lambda: complete_status(server), timeout=30, what="a sample of every task and pause"
    )
    queue = document["queue"]
    by_type, other = queue["by_type"], queue["other_types"]
    assert len(by_type) <= bound
    assert other["types"] > 0
    # Every live type is listed or summed, once; and so is every task.
    assert len(by_type) - 1 + other["types"] == TOTAL_TYPES  # PAUSED_IDLE has no task
    assert sum(item["queued"] for item in by_type.values()) + other["queued"] == TOTAL_QUEUED
    assert by_type[STUCK]["queued"] == 1
    assert by_type[STUCK]["oldest_queued_seconds"] >= other["oldest_queued_seconds"]
    assert by_type[PAUSED_BUSY] == {
        "queued": 1,
        "running": 0,
        "oldest_queued_seconds": by_type[PAUSED_BUSY]["oldest_queued_seconds"],
        "paused": True,
    }
    assert by_type[PAUSED_IDLE]["paused"] is True
    assert document["paused_types"] == sorted([PAUSED_BUSY, PAUSED_IDLE])
    # What the sampler keeps (and works through on the event loop) is bounded too.
    snapshot = server.server.stats.snapshot
    assert len(snapshot.queued) <= bound
    assert snapshot.other.types == other["types"]

    status = client.get_status()
    assert len(status.types) == len(by_type)
    assert status.other_types.types == other["types"]
    assert (status.queued, status.running) == (TOTAL_QUEUED, 0)
    listed = {item.type: item for item in status.types}
    assert listed[PAUSED_BUSY].paused
    assert listed[PAUSED_IDLE].paused

    # The gauges still add up to every queued task.
    queued_gauges = [
        sample.value
        for sample in metric_samples(server.http_url)
        if sample.name == "conveyor_tasks" and sample.labels["state"] == "queued"
    ]
    assert sum(queued_gauges) == TOTAL_QUEUED

    overview = get(f"{server.http_url}/ui")
    rows = dict(
        re.findall(
            r'<tr data-type="([^"]+)">\s*<td>.*?</td>\s*<td class="num">(\d+)</td>',
            overview,
            re.DOTALL,
        )
    )
    assert len(rows) == OVERVIEW_TYPES + 2  # the paused types are not among the most urgent
    assert {STUCK, PAUSED_BUSY, PAUSED_IDLE} <= set(rows)
    for paused in (PAUSED_BUSY, PAUSED_IDLE):
        assert f'name="type" value="{paused}"><button type="submit">Resume' in overview
    more = re.search(
        r'<tr id="other-types">\s*<td>(\d+) more types</td>\s*<td class="num">(\d+)</td>',
        overview,
    )
    assert more is not None
    assert int(more.group(1)) == TOTAL_TYPES + 1 - len(rows)
    assert int(more.group(2)) == TOTAL_QUEUED - sum(map(int, rows.values()))
    assert f'<span class="value" id="queued">{TOTAL_QUEUED}</span>' in overview
    assert len(overview) < 200_000

    cli = {"CONVEYOR_SERVER": server.address}
    stats = json.loads(assert_ok(run_cli("stats", "--json", **cli)))
    assert stats["other_types"]["types"] == other["types"]
    assert stats["other_types"]["queued"] == other["queued"]
    assert len(stats["types"]) == len(by_type)
    table = assert_ok(run_cli("stats", "--once", **cli))
    assert f"{other['types']} more types" in table
