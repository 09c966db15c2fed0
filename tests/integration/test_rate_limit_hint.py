"""The clients wait out the server's "retry in N ms" before asking again.

A rate refusal says when the caller's next request would be admitted. A client that
retried on its own backoff alone (50 ms, then 100, 200...) was refused three or four times
for each enqueue at 2 requests a second, every refusal a request the server had to answer
and count; and when the hint was past the retry budget it kept retrying, refused each
time, until the budget ran out. Now each enqueue is refused once at most, and a hint past
the budget fails at once with `LimitExceeded.retry_in`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pytest

from conveyor import AsyncClient, Client, RetryPolicy, Task
from conveyor.auth import Role, new_token
from conveyor.errors import LimitExceeded

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from conftest import ServerThread


def serve(
    start_server: Callable[..., ServerThread], tmp_path: Path, rate: float
) -> tuple[ServerThread, str]:
    token, entry = new_token("app", Role.PRODUCER)
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(entry.as_toml())
    return start_server(tokens_file=tokens, rate_limit=rate, rate_burst=1.0), token


def refusals(server: ServerThread) -> float:
    assert server.server is not None
    value: float = server.server.metrics.limit_refusals.labels("request_rate")._value.get()
    return value


def test_sequential_enqueues_are_refused_once_each(
    start_server: Callable[..., ServerThread], tmp_path: Path, db: Any
) -> None:
    server, token = serve(start_server, tmp_path, rate=2.0)
    with Client(server.address, token=token) as client:
        ids = [client.enqueue_task(Task(type="hint.sync")) for _ in range(5)]
    assert len(set(ids)) == 5
    # The first found the burst's request; each other waited once for the refill.
    assert refusals(server) == 4
    assert db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE type = 'hint.sync'") == 5


async def test_async_sequential_enqueues_are_refused_once_each(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    server, token = serve(start_server, tmp_path, rate=2.0)
    async with AsyncClient(server.address, token=token) as client:
        ids = [await client.enqueue_task(Task(type="hint.async")) for _ in range(5)]
    assert len(set(ids)) == 5
    assert refusals(server) == 4


def test_a_hint_past_the_budget_fails_at_once_with_it(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    server, token = serve(start_server, tmp_path, rate=0.2)  # a request every 5 s
    with Client(server.address, token=token, retry=RetryPolicy(total_timeout=2)) as client:
        client.enqueue_task(Task(type="hint.budget"))
        started = time.monotonic()
        with pytest.raises(LimitExceeded) as caught:
            client.enqueue_task(Task(type="hint.budget"))
        elapsed = time.monotonic() - started
    assert 4.0 < caught.value.retry_in <= 5.0
    assert "retry in" in caught.value.message
    # One refusal, not a budget's worth of them; and no waiting for a sure refusal.
    assert refusals(server) == 1
    assert elapsed < 1.5
