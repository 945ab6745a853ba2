"""PostgreSQL connection pools, created inside the running event loop by each process's root."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import asyncpg
from tenacity import AsyncRetrying, before_sleep_log, retry_if_exception, wait_exponential

from flexoraa.settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")


# PostgreSQL unreachable (down, restarting, out of connections, a connection cut), as opposed
# to a statement it refused: the first passes, the second would fail again.
UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    # A connection cut mid-query (the server shutting down) can come back from the pool still
    # "busy": asyncpg refuses it with this error and terminates it on release, so a retry gets
    # a fresh connection. Seen crashing a sink and a timer in the PostgreSQL-outage test.
    asyncpg.exceptions.InternalClientError,
)
# Any database failure: what a periodic pass logs and leaves to its next tick, and what a read
# endpoint answers 503 for.
DB_ERRORS: tuple[type[BaseException], ...] = (*UNREACHABLE, asyncpg.PostgresError)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, UNREACHABLE)


async def while_unreachable(
    call: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
) -> T:
    """`call(*args, **kwargs)`, repeated (backing off up to 5 s) while PostgreSQL is unreachable.

    Agents wrap each record's work in it: a record whose processing needs the database waits
    for it, holding back its partition, instead of being skipped (its effects lost, or half
    applied). Every effect of a record carries an id derived from it, so the repeated part of a
    half-done attempt is recognised downstream.
    """
    # Tried once outside tenacity first: building its retry state for every record took a
    # few percent of the worker's time (py-spy, throughput benchmark).
    try:
        return await call(*args, **kwargs)
    except Exception as exc:
        if not is_transient(exc):
            raise
        logger.warning("database unreachable (%r); retrying", exc)
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential(multiplier=0.1, max=5),
        before_sleep=before_sleep_log(logger, logging.WARNING),
        reraise=True,
    ):
        with attempt:
            return await call(*args, **kwargs)
    raise AssertionError("unreachable: AsyncRetrying either returns or raises")


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    """A connection going back to the pool has no session state to undo: nothing here sets a
    setting, listens, keeps a cursor or takes an advisory lock. (asyncpg still rolls back an
    open transaction before calling this.) Its default reset runs `RESET ALL; UNLISTEN *;
    CLOSE ALL; SELECT pg_advisory_unlock_all()`: a round trip for every query a pooled
    connection served, about 3 % of a lightly loaded worker (py-spy, freshness benchmark)."""


async def create_pool(settings: Settings) -> asyncpg.Pool:
    """A pool that opens connections on demand, so a process starts while PostgreSQL is down."""
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=0,
        max_size=settings.database_pool_max,
        init=_init_connection,
        reset=_nothing_to_reset,
        command_timeout=10,
    )
    assert pool is not None
    return pool
