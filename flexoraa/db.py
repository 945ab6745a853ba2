"""PostgreSQL connection pools, created inside the running event loop by each process's root."""

from __future__ import annotations

import json

import asyncpg

from flexoraa.settings import Settings


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(settings: Settings) -> asyncpg.Pool:
    """A pool that opens connections on demand, so a process starts while PostgreSQL is down."""
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=0,
        max_size=settings.database_pool_max,
        init=_init_connection,
        command_timeout=10,
    )
    assert pool is not None
    return pool
