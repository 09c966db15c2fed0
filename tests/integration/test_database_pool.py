"""The server's connection pool hands back clean connections without a reset round trip."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from conveyor.server.config import ServerConfig
from conveyor.server.database import Database


def test_a_transaction_left_open_is_rolled_back_before_reuse(database_url) -> None:
    """A call cancelled mid-transaction must not leave the next user of its connection
    inside that transaction, or holding its row locks."""

    async def scenario() -> tuple[bool, int]:
        database = Database(
            ServerConfig(database_url=database_url, pool_max_size=1, grpc_listen="127.0.0.1:0")
        )
        await database.connect(startup_timeout=timedelta(seconds=30))
        try:
            async with database.connection() as conn:
                await conn.execute("BEGIN")
                await conn.execute("CREATE TABLE left_open (x int)")
            async with database.connection() as conn:
                in_transaction = conn.is_in_transaction()
                exists = await conn.fetchval(
                    "SELECT count(*) FROM pg_tables WHERE tablename = 'left_open'"
                )
            return in_transaction, exists
        finally:
            await database.close()

    in_transaction, exists = asyncio.run(scenario())
    assert in_transaction is False
    assert exists == 0
