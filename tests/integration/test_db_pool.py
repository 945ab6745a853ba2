"""The connection pool: a connection goes back without a reset round trip, and safely."""

from __future__ import annotations

import pytest

from flexoraa.db import create_pool
from flexoraa.settings import Settings

pytestmark = pytest.mark.integration


async def test_a_released_connection_costs_no_reset_query_and_ends_its_transaction(
    test_settings: Settings,
) -> None:
    pool = await create_pool(test_settings.model_copy(update={"database_pool_max": 1}))
    try:
        async with pool.acquire() as conn:
            session = await conn.fetchval("SELECT pg_backend_pid()")
            await conn.execute("SET application_name = 'left-as-is'")
            # An unmanaged transaction left open (asyncpg reports it, then rolls it back).
            await conn.execute("BEGIN")
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == session
            assert not conn.is_in_transaction()
            # asyncpg's default reset (RESET ALL, ...) would have put the setting back.
            assert await conn.fetchval("SHOW application_name") == "left-as-is"
    finally:
        await pool.close()
