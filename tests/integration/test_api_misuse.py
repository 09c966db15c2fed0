"""Mistakes a team adopting Conveyor can make, refused at once with a Conveyor error.

Found by a review of the public API. Each was accepted before, and misbehaved later:
- `cancel_tasks(states=[])` (a selection with no box ticked) read as "no filter", and
  cancelled every queued and running task; `retry_tasks` and `list_tasks` likewise.
- A handler registered after `start()` was accepted, and its tasks stayed queued for good:
  the worker tells the servers its types when it registers.
- `Client(retry=30)`, `tls="true"` (read from an environment variable) and `breaker=5`
  were taken as settings, and calls failed later with an AttributeError (for `breaker`,
  only in an outage, where the caller's handling of ServerUnavailable was due).
- Bulk and listing arguments of the wrong kind failed deep in request building with an
  AttributeError or protobuf's TypeError, naming nothing the caller wrote.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
from helpers import running, wait_for

from conveyor import AsyncClient, Client, Task, TaskState, TlsConfig, Worker
from conveyor.errors import ConfigError, InvalidTask


class TestAnEmptySelectionOfStates:
    def test_is_refused_and_cancels_nothing(self, client: Client) -> None:
        keep = client.enqueue_task(Task(type="payroll.run"))
        selected: list[TaskState] = []
        with pytest.raises(InvalidTask, match="states is empty") as refused:
            client.cancel_tasks(states=selected)
        assert refused.value.field == "states"
        with pytest.raises(InvalidTask, match="states is empty"):
            client.retry_tasks(states=selected)
        with pytest.raises(InvalidTask, match="states is empty"):
            client.list_tasks(states=selected)
        assert client.get_task_status(keep).state is TaskState.QUEUED

    def test_is_refused_by_the_async_client(self, server: Any) -> None:
        async def main() -> TaskState:
            async with AsyncClient(server.address) as client:
                keep = await client.enqueue_task(Task(type="payroll.run"))
                with pytest.raises(InvalidTask, match="states is empty"):
                    await client.cancel_tasks(states=[])
                return (await client.get_task_status(keep)).state

        assert asyncio.run(main()) is TaskState.QUEUED


def test_a_handler_registered_after_start_is_refused(server: Any, client: Client) -> None:
    worker = Worker(server.address, concurrency=2, lease_wait=timedelta(seconds=1))
    worker.register_handler("early", lambda _ctx, _payload: b"early")
    with running(worker):
        with pytest.raises(ConfigError, match="register every handler before start"):
            worker.register_handler("late", lambda _ctx, _payload: b"late")
        with pytest.raises(ConfigError, match="before start"):
            worker.handler("late")(lambda _ctx, _payload: b"late")
        # The worker goes on with what it had.
        task_id = client.enqueue_task(Task(type="early"))
        wait_for(
            lambda: client.get_task_status(task_id).state is TaskState.SUCCEEDED,
            timeout=15,
            what="the early type's task to run",
        )


WRONG_SETTINGS = [
    pytest.param({"retry": 30}, "retry must be a RetryPolicy", id="retry=30"),
    pytest.param({"tls": "true"}, "tls must be a TlsConfig", id="tls='true'"),
    pytest.param({"breaker": 5}, "breaker must be a BreakerPolicy", id="breaker=5"),
    pytest.param({"server": b"127.0.0.1:1"}, "server must be HOST:PORT", id="server=bytes"),
    pytest.param({"server": ["127.0.0.1:1", 5]}, "must be a str", id="server=[.., 5]"),
]


class TestSettingsOfTheWrongKind:
    @pytest.mark.parametrize(("settings", "message"), WRONG_SETTINGS)
    def test_client(self, settings: dict[str, Any], message: str) -> None:
        settings = {"server": "127.0.0.1:1", **settings}
        with pytest.raises(ConfigError, match=message):
            Client(**settings)

    @pytest.mark.parametrize(("settings", "message"), WRONG_SETTINGS)
    def test_async_client(self, settings: dict[str, Any], message: str) -> None:
        settings = {"server": "127.0.0.1:1", **settings}

        async def main() -> None:
            with pytest.raises(ConfigError, match=message):
                AsyncClient(**settings)

        asyncio.run(main())

    def test_worker_tls(self) -> None:
        with pytest.raises(ConfigError, match="tls must be a TlsConfig"):
            Worker("127.0.0.1:1", tls="true")  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("settings", "message"),
        [
            # An AttributeError from the name's UTF-8 check.
            ({"server_name": 5}, "server_name must be a str"),
            # A TypeError from pathlib at the client's first call.
            ({"ca_file": 5}, "ca_file must be a path"),
            ({"cert_file": b"c.pem", "key_file": "k.pem"}, "cert_file must be a path"),
        ],
        ids=["server_name=5", "ca_file=5", "cert_file=bytes"],
    )
    def test_tls_config(self, settings: dict[str, Any], message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            TlsConfig(**settings)


NOT_UTF8 = "\udcff"  # the byte 0xff, as Python hands over a command-line argument


class TestArgumentsOfTheWrongKind:
    """Each names the argument, as `limit`, `reason` and a malformed id already did."""

    @pytest.mark.parametrize(
        ("call", "field"),
        [
            pytest.param(lambda c: c.retry_tasks(states="failed", as_of=5), None, id="as_of=5"),
            pytest.param(lambda c: c.cancel_tasks(5), "task_ids", id="task_ids=5"),
            pytest.param(
                lambda c: c.cancel_tasks(states="queued", dry_run="yes"),
                "dry_run",
                id="dry_run='yes'",
            ),
            pytest.param(
                lambda c: c.get_task_status(str(uuid.uuid4()), history="yes"),
                "history",
                id="history='yes'",
            ),
            pytest.param(
                lambda c: c.list_workers(include_stopped=1), "include_stopped", id="flag=1"
            ),
            pytest.param(lambda c: c.list_tasks(page_token=5), "page_token", id="token=5"),
            pytest.param(
                lambda c: c.list_workers_page(page_token=5), "page_token", id="workers token=5"
            ),
            # Bytes that are not UTF-8, as a command line hands them over: protobuf's
            # UnicodeEncodeError, and a traceback from `conveyor tasks list --page-token`.
            pytest.param(
                lambda c: c.list_tasks(page_token=NOT_UTF8), "page_token", id="token not UTF-8"
            ),
            pytest.param(
                lambda c: c.list_workers_page(page_token=NOT_UTF8),
                "page_token",
                id="workers token not UTF-8",
            ),
            # as_of travels as a uint64: a longer number was protobuf's ValueError.
            pytest.param(
                lambda c: c.retry_tasks(states="failed", as_of=str(2**64)), None, id="as_of=2**64"
            ),
            pytest.param(
                lambda c: c.retry_tasks(states="failed", as_of="9" * 5000), None, id="as_of=9*5000"
            ),
        ],
    )
    def test_is_an_invalid_task_naming_it(self, client: Client, call: Any, field: Any) -> None:
        with pytest.raises(InvalidTask) as refused:
            call(client)
        assert refused.value.field == field
        assert field is None or field in refused.value.message

    def test_task_ids_may_be_any_iterable(self, client: Client) -> None:
        task_id = client.enqueue_task(Task(type="misuse.iterable"))
        result = client.cancel_tasks(iter([task_id]))
        assert result.changed == 1
        assert client.get_task_status(task_id).state is TaskState.CANCELLED
