"""A server whose stats sampler cannot read the database stops exporting the sampled gauges.

Their last values would otherwise stay in /metrics unchanged for as long as the sampler
fails, and a frozen high queue would win the `max` the documented alerts take across
servers. The sample timestamp stays, as the staleness signal.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from helpers import holding, metric_samples, wait_for

from conveyor import Client, Task

SAMPLED = (
    "conveyor_tasks",
    "conveyor_oldest_queued_task_age_seconds",
    "conveyor_workers",
    "conveyor_task_type_paused",
)


def sampled(http_url: str) -> dict[str, list[Any]]:
    """The samples of the sampled gauges (by name, only those present) and the timestamp."""
    found: dict[str, list[Any]] = {}
    for sample in metric_samples(http_url):
        if sample.name in (*SAMPLED, "conveyor_stats_sampled_timestamp_seconds"):
            found.setdefault(sample.name, []).append(sample)
    return found


@pytest.mark.slow  # about 5 s each: the gauges go once the last sample is 5 s old
@pytest.mark.parametrize(
    "statement_timeout",
    [
        pytest.param(timedelta(seconds=1), id="each-sample-fails"),
        pytest.param(timedelta(seconds=60), id="the-sample-hangs"),
    ],
)
def test_sampled_gauges_are_withdrawn_while_samples_fail_and_come_back(
    start_server: Callable[..., Any], database_url: str, statement_timeout: timedelta
) -> None:
    server = start_server(statement_timeout=statement_timeout)
    with Client(server.address) as client:
        client.enqueue_task(Task(type="stale.t"))
        client.pause_type("stale.t")
    wait_for(
        lambda: set(SAMPLED) <= set(sampled(server.http_url)),
        what="every sampled gauge to be exported",
    )
    # The sampler's first statement reads the task table: an exclusive lock stops it there
    # (until the statement timeout ends it, or for as long as the lock is held).
    with holding(database_url, "LOCK TABLE conveyor_tasks IN ACCESS EXCLUSIVE MODE"):
        last = sampled(server.http_url)["conveyor_stats_sampled_timestamp_seconds"][0].value
        stale = wait_for(
            lambda: (found := sampled(server.http_url)) and not set(SAMPLED) & set(found) and found,
            timeout=30,
            what="the sampled gauges to be withdrawn",
        )
        # The staleness signal stays, with the time of the last sample.
        (timestamp,) = stale["conveyor_stats_sampled_timestamp_seconds"]
        assert timestamp.value == last
    wait_for(
        lambda: set(SAMPLED) <= set(sampled(server.http_url)),
        what="the next sample to bring every gauge back",
    )
    back = sampled(server.http_url)
    assert {
        sample.labels["type"]: sample.value for sample in back["conveyor_task_type_paused"]
    } == {"stale.t": 1}
    assert any(
        sample.labels == {"state": "queued", "type": "stale.t"} and sample.value == 1
        for sample in back["conveyor_tasks"]
    )
    assert back["conveyor_stats_sampled_timestamp_seconds"][0].value > last
