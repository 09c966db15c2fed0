"""A server's InvalidTask reaches the client with the field it blames.

errors.py: context is kept in attributes, so callers never parse strings. A payload over
the client's own message limit was `InvalidTask(field="payload")`, but one over the
server's payload limit (1 MiB by default, the limit users meet) arrived with
`field=None`: the status carried the message only. The field now travels beside it, as
the trailing metadata `conveyor-field` of a call and `field` of an enqueue stream's answer.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest

from conveyor import AsyncClient, Client, Task
from conveyor.errors import InvalidTask

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import ServerThread

OVER_THE_LIMIT = b"x" * (1024 * 1024 + 1)  # the server's default max_payload_bytes + 1


@pytest.mark.parametrize("enqueue_stream", [True, False], ids=["on the stream", "as calls"])
def test_a_payload_over_the_servers_limit_names_the_field(
    start_server: Callable[..., ServerThread], enqueue_stream: bool
) -> None:
    server = start_server(enqueue_stream=enqueue_stream)
    with Client(server.address) as client, pytest.raises(InvalidTask) as refused:
        client.enqueue_task(Task(type="upload", payload=OVER_THE_LIMIT))
    assert refused.value.field == "payload"
    assert "payload is 1048577 bytes" in refused.value.message


def test_the_async_client_names_it_too(server: Any) -> None:
    async def main() -> InvalidTask:
        async with AsyncClient(server.address) as client:
            with pytest.raises(InvalidTask) as refused:
                await client.enqueue_tasks(
                    [Task(type="upload"), Task(type="upload", payload=OVER_THE_LIMIT)]
                )
            return refused.value

    refused = asyncio.run(main())
    assert refused.field == "payload"
    assert refused.message.startswith("tasks[1]: ")


def test_a_page_token_the_server_refuses_names_it(client: Client) -> None:
    with pytest.raises(InvalidTask) as refused:
        client.list_tasks(page_token="not-a-token")  # noqa: S106 - not a secret
    assert refused.value.field == "page_token"
