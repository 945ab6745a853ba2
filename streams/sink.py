"""The PostgreSQL sink: inbound messages, in batches, written idempotently.

Only `write` touches PostgreSQL. A batch is upserted with a handful of statements; messages are
keyed by event id (and by the channel's message id), so a replayed batch changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
from tenacity import AsyncRetrying, before_sleep_log, retry_if_exception, wait_exponential

from schemas.events import InboundMessage
from streams.metrics import SINK_RETRIES, SINK_ROWS

logger = logging.getLogger(__name__)

# A lead row exists before its messages (foreign key); activity times move only for messages
# actually inserted, so a duplicate never changes a lead.
_ENSURE_LEADS = """
INSERT INTO leads (lead_id, tenant_id, channel, contact, contact_name, first_seen_at,
                   last_activity_at)
SELECT l, t, c, ct, n, o, o
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])
     AS u(l, t, c, ct, n, o)
ON CONFLICT (lead_id) DO UPDATE SET
    contact_name = COALESCE(EXCLUDED.contact_name, leads.contact_name)
"""

_INSERT_MESSAGES = """
WITH inserted AS (
    INSERT INTO messages (event_id, tenant_id, lead_id, direction, channel, message_type, body,
                          channel_message_id, occurred_at)
    SELECT e, t, l, 'inbound', c, m, b, cm, o
    FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                $7::text[], $8::timestamptz[]) AS u(e, t, l, c, m, b, cm, o)
    ON CONFLICT DO NOTHING
    RETURNING lead_id, occurred_at
), activity AS (
    SELECT lead_id, min(occurred_at) AS first_at, max(occurred_at) AS last_at, count(*) AS n
    FROM inserted GROUP BY lead_id
), touched AS (
    UPDATE leads SET
        first_seen_at = LEAST(leads.first_seen_at, activity.first_at),
        last_activity_at = GREATEST(leads.last_activity_at, activity.last_at)
    FROM activity WHERE leads.lead_id = activity.lead_id
    RETURNING 1
)
SELECT coalesce(sum(n), 0)::bigint FROM activity
"""


def _is_transient(exc: BaseException) -> bool:
    """Connection trouble is retried forever; a row PostgreSQL rejects is not retried."""
    return isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.CannotConnectNowError
        | asyncpg.TooManyConnectionsError,
    )


@dataclass(frozen=True, slots=True)
class RejectedRow:
    message: InboundMessage
    reason: str


class InboundMessageSink:
    def __init__(self, pool_factory: Callable[[], Awaitable[asyncpg.Pool]]) -> None:
        self._pool_factory = pool_factory

    async def write(self, batch: Sequence[InboundMessage]) -> list[RejectedRow]:
        """Write a batch; returns the rows PostgreSQL refused (they are not retried)."""
        if not batch:
            return []
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_is_transient),
            wait=wait_exponential(multiplier=0.1, max=5),
            before_sleep=before_sleep_log(logger, logging.WARNING),
            reraise=True,
        ):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    SINK_RETRIES.inc()
                pool = await self._pool_factory()
                try:
                    await self._write_batch(pool, batch)
                    return []
                except asyncpg.PostgresError as exc:
                    if _is_transient(exc):
                        raise
                    logger.warning("batch refused (%s); writing row by row", exc)
                    return await self._write_rows(pool, batch)
        raise AssertionError("unreachable: AsyncRetrying either returns or raises")

    async def _write_rows(
        self, pool: asyncpg.Pool, batch: Sequence[InboundMessage]
    ) -> list[RejectedRow]:
        rejected = []
        for message in batch:
            try:
                await self._write_batch(pool, [message])
            except asyncpg.PostgresError as exc:
                if _is_transient(exc):
                    raise
                rejected.append(RejectedRow(message, f"database refused the row: {exc}"))
        return rejected

    @staticmethod
    async def _write_batch(pool: asyncpg.Pool, batch: Sequence[InboundMessage]) -> None:
        # One row per lead: an upsert may touch a row only once per statement.
        first_of_lead: dict[str, InboundMessage] = {}
        for message in batch:
            known = first_of_lead.get(message.lead_id)
            if known is None or message.occurred_at < known.occurred_at:
                first_of_lead[message.lead_id] = message
        leads = list(first_of_lead.values())
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                _ENSURE_LEADS,
                [m.lead_id for m in leads],
                [m.tenant_id for m in leads],
                [m.channel for m in leads],
                [m.contact for m in leads],
                [m.contact_name for m in leads],
                [m.occurred_at for m in leads],
            )
            inserted = await conn.fetchval(
                _INSERT_MESSAGES,
                [m.event_id for m in batch],
                [m.tenant_id for m in batch],
                [m.lead_id for m in batch],
                [m.channel for m in batch],
                [m.message_type for m in batch],
                [m.text for m in batch],
                [m.channel_message_id for m in batch],
                [m.occurred_at for m in batch],
            )
        SINK_ROWS.labels("leads").inc(len(leads))
        SINK_ROWS.labels("messages").inc(inserted)
