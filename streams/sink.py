"""The PostgreSQL sink: inbound messages, in batches, written idempotently.

Only `write` touches PostgreSQL. A batch is upserted with a handful of statements; messages are
keyed by event id (and by the channel's message id), so a replayed batch changes nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import asyncpg

from flexoraa.db import while_unreachable
from schemas.events import InboundMessage
from schemas.messaging import DeliveryStatus, LeadEvent, OutboundMessage
from schemas.tokens import BalanceChangeRecord, TokenCredit, TokenUsage
from streams.metrics import SINK_RETRIES, SINK_ROWS
from streams.poison import is_poison
from streams.rules.delivery import RANK, supersedes

logger = logging.getLogger(__name__)
# A row's source: an event, mostly (the dead-letter index writes rows of its own).
E = TypeVar("E")

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


@dataclass(frozen=True, slots=True)
class RejectedRow(Generic[E]):
    message: E
    reason: str
    # The dead letter's kind: "sink_rejected", data PostgreSQL refused, or "processing_failed",
    # a row the code could not build (a bug or a broken producer: the PoisonRecords alert).
    kind: str = "sink_rejected"


class BatchSink(Generic[E]):
    """Writes batches of events; connection trouble is retried, refused rows are returned."""

    def __init__(self, pool_factory: Callable[[], Awaitable[asyncpg.Pool]]) -> None:
        self._pool_factory = pool_factory

    async def write(self, batch: Sequence[E]) -> list[RejectedRow[E]]:
        """Write a batch; returns the rows PostgreSQL refused (they are not retried)."""
        if not batch:
            return []
        attempts = 0

        async def attempt() -> list[RejectedRow[E]]:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                SINK_RETRIES.inc()
            pool = await self._pool_factory()
            try:
                await self._write_batch(pool, batch)
                return []
            # Not only PostgreSQL's refusals: a row the statement cannot be built from (a lead
            # event without a field its history table needs) failed the batch at every
            # restart. Row by row, the culprit is found and rejected. Anything that is no
            # row's fault (a deadlock, a missing table) stops the worker instead.
            except Exception as exc:
                if not is_poison(exc):
                    raise
                logger.warning("batch refused (%r); writing row by row", exc)
                return await self._write_rows(pool, batch)

        return await while_unreachable(attempt)

    async def _write_rows(self, pool: asyncpg.Pool, batch: Sequence[E]) -> list[RejectedRow[E]]:
        rejected = []
        for message in batch:
            try:
                await self._write_batch(pool, [message])
            except Exception as exc:
                if not is_poison(exc):
                    raise
                if isinstance(exc, asyncpg.PostgresError):
                    rejected.append(RejectedRow(message, f"database refused the row: {exc}"))
                else:
                    reason = f"row not writable: {type(exc).__name__}: {exc}"
                    rejected.append(RejectedRow(message, reason, "processing_failed"))
        return rejected

    async def _write_batch(self, pool: asyncpg.Pool, batch: Sequence[E]) -> None:
        raise NotImplementedError


class InboundMessageSink(BatchSink[InboundMessage]):
    async def _write_batch(self, pool: asyncpg.Pool, batch: Sequence[InboundMessage]) -> None:
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


class OutboundMessageSink(BatchSink[OutboundMessage]):
    """Final outcomes of sends (accepted or failed) as outbound rows of `messages`."""

    async def _write_batch(self, pool: asyncpg.Pool, batch: Sequence[OutboundMessage]) -> None:
        final = [m for m in batch if m.status != "retrying"]
        if not final:
            return
        status = await pool.execute(
            """INSERT INTO messages (event_id, tenant_id, lead_id, direction, channel, message_type,
                                     body, channel_message_id, occurred_at, command_id, send_kind,
                                     sent_by, send_status, error_code, error_message)
               SELECT e, t, l, 'outbound', c, coalesce(k, 'text'), b, cm, o, cmd, k, sb, st, ec, em
               FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                           $7::timestamptz[], $8::uuid[], $9::text[], $10::text[], $11::text[],
                           $12::text[], $13::text[])
                    AS u(e, t, l, c, b, cm, o, cmd, k, sb, st, ec, em)
               ON CONFLICT DO NOTHING""",
            [m.event_id for m in final],
            [m.tenant_id for m in final],
            [m.lead_id for m in final],
            [m.channel for m in final],
            [m.text for m in final],
            [m.channel_message_id for m in final],
            [m.occurred_at for m in final],
            [m.command_id for m in final],
            [m.send_kind for m in final],
            [m.sent_by for m in final],
            [m.status for m in final],
            [m.error_code for m in final],
            [m.error_message for m in final],
        )
        SINK_ROWS.labels("outbound_messages").inc(int(status.rsplit(" ", 1)[-1]))
        # A scheduled message's outcome; a send that raced its cancellation is still "sent".
        await pool.execute(
            """UPDATE scheduled_messages s SET
                   status = CASE WHEN u.st = 'accepted' THEN 'sent' ELSE 'failed' END,
                   error = u.em, updated_at = now()
               FROM unnest($1::uuid[], $2::text[], $3::text[]) AS u(cmd, st, em)
               WHERE s.scheduled_id = u.cmd AND s.status IN ('scheduled', 'cancelled')""",
            [m.command_id for m in final],
            [m.status for m in final],
            [m.error_message for m in final],
        )


def latest_statuses(batch: Sequence[DeliveryStatus]) -> list[DeliveryStatus]:
    """One status per channel message: the one that supersedes the others in the batch."""
    winners: dict[tuple[str, str, str], DeliveryStatus] = {}
    for update in batch:
        key = (update.tenant_id, update.channel, update.channel_message_id)
        known = winners.get(key)
        if known is None or supersedes(
            known.status, known.occurred_at, update.status, update.occurred_at
        ):
            winners[key] = update
    return list(winners.values())


# The SQL twin of `streams.rules.delivery.supersedes`, for rows already in PostgreSQL.
_RANK_SQL = "CASE {col} " + " ".join(f"WHEN '{s}' THEN {r}" for s, r in RANK.items()) + " END"
_NEW_RANK = _RANK_SQL.format(col="EXCLUDED.status")
_OLD_RANK = _RANK_SQL.format(col="message_statuses.status")
_UPSERT_STATUS = f"""
INSERT INTO message_statuses (tenant_id, channel, channel_message_id, status, status_at,
                              error_code, error_title)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                     $6::text[], $7::text[])
ON CONFLICT (tenant_id, channel, channel_message_id) DO UPDATE SET
    status = EXCLUDED.status, status_at = EXCLUDED.status_at, error_code = EXCLUDED.error_code,
    error_title = EXCLUDED.error_title, updated_at = now()
WHERE message_statuses.status <> 'read' AND (
    EXCLUDED.status = 'read'
    OR (EXCLUDED.status_at > message_statuses.status_at
        AND NOT (message_statuses.status = 'delivered' AND EXCLUDED.status = 'sent'))
    OR (EXCLUDED.status_at = message_statuses.status_at
        AND {_NEW_RANK} > {_OLD_RANK})
)
"""


class DeliveryStatusSink(BatchSink[DeliveryStatus]):
    async def _write_batch(self, pool: asyncpg.Pool, batch: Sequence[DeliveryStatus]) -> None:
        rows = latest_statuses(batch)
        await pool.execute(
            _UPSERT_STATUS,
            [r.tenant_id for r in rows],
            [r.channel for r in rows],
            [r.channel_message_id for r in rows],
            [r.status for r in rows],
            [r.occurred_at for r in rows],
            [r.error_code for r in rows],
            [r.error_title for r in rows],
        )
        SINK_ROWS.labels("message_statuses").inc(len(rows))


class LeadEventSink(BatchSink[LeadEvent]):
    """Lead events, and the seed's history tables some of them are also rows of
    (qualification steps, leaks, recovery attempts and replies, reassignments).

    One transaction and one statement per table for a whole batch: a leak storm is hundreds of
    events a second, and a statement per row (with a pool checkout and reset each) was a tenth
    of the worker's time in bench.leakage.
    """

    async def _write_batch(self, pool: asyncpg.Pool, batch: Sequence[LeadEvent]) -> None:
        by_type: dict[str, list[LeadEvent]] = {}
        for event in batch:
            by_type.setdefault(event.type, []).append(event)
        async with pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                """INSERT INTO lead_events (event_id, tenant_id, lead_id, type, data, occurred_at)
                   SELECT e, t, l, ty, d::jsonb, o
                   FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[],
                               $6::timestamptz[]) AS u(e, t, l, ty, d, o)
                   ON CONFLICT DO NOTHING""",
                [e.event_id for e in batch],
                [e.tenant_id for e in batch],
                [e.lead_id for e in batch],
                [e.type for e in batch],
                [json.dumps(e.data) for e in batch],
                [e.occurred_at for e in batch],
            )
            SINK_ROWS.labels("lead_events").inc(int(status.rsplit(" ", 1)[-1]))
            for event_type, events in by_type.items():
                if (history := _HISTORY_ROWS.get(event_type)) is not None:
                    statement, columns = history
                    rows = [columns(event) for event in events]
                    await conn.execute(
                        statement, *(list(column) for column in zip(*rows, strict=True))
                    )
            # Applied after the attempts above: an attempt and its reply may share a batch.
            # A reply marks the attempt it answered; one written before replies named their
            # attempt marks the lead's step, of whichever sequence.
            replies = {
                (e.lead_id, e.data["step"], e.data.get("attempt_event_id")): e.occurred_at
                for e in reversed(by_type.get("recovery_replied", []))
            }  # the first reply of a step wins, as it would row by row
            if replies:
                await conn.execute(
                    """UPDATE lead_recovery_log SET status = 'replied', replied_at = u.at
                       FROM unnest($1::uuid[], $2::int[], $3::uuid[], $4::timestamptz[])
                            AS u(l, s, a, at)
                       WHERE replied_at IS NULL
                         AND (event_id = u.a OR (u.a IS NULL AND lead_id = u.l AND step = u.s))""",
                    [lead for lead, _, _ in replies],
                    [step for _, step, _ in replies],
                    [attempt for _, _, attempt in replies],
                    list(replies.values()),
                )


def _qualification_row(e: LeadEvent) -> tuple[object, ...]:
    return (e.event_id, e.tenant_id, e.lead_id, e.data["turn"], e.data["status"],
            json.dumps(e.data["facts"]), e.data["score"], e.data.get("sdr_id"),
            e.data.get("source", "builtin"), e.occurred_at)  # fmt: skip


def _leak_row(e: LeadEvent) -> tuple[object, ...]:
    return (e.event_id, e.tenant_id, e.lead_id, e.data["temperature"], e.data["action"],
            e.data["waiting_since_ms"], e.data["deadline_ms"], e.occurred_at,
            json.dumps(e.data))  # fmt: skip


def _recovery_attempt_row(e: LeadEvent) -> tuple[object, ...]:
    return (e.event_id, e.tenant_id, e.lead_id, e.data["step"], e.data["strategy"],
            e.data.get("tokens", 0), e.occurred_at)  # fmt: skip


def _reassignment_row(e: LeadEvent) -> tuple[object, ...]:
    return (e.event_id, e.tenant_id, e.lead_id, e.data.get("from_sdr_id"),
            e.data.get("to_sdr_id"), e.data.get("reason", "leak"), e.occurred_at)  # fmt: skip


# Lead event type -> (the insert of its rows into a seed history table, one row's columns).
_HISTORY_ROWS: dict[str, tuple[str, Callable[[LeadEvent], tuple[object, ...]]]] = {
    # Every interview step is a row of the seed's qualification history.
    "qualification_updated": (
        """INSERT INTO lead_qualification_state (event_id, tenant_id, lead_id, turn, status,
                                                 facts, score, assigned_sdr_id, source,
                                                 occurred_at)
           SELECT e, t, l, tu, st, f::jsonb, sc, sdr, so, o
           FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::smallint[], $5::text[],
                       $6::text[], $7::numeric[], $8::uuid[], $9::text[], $10::timestamptz[])
                AS u(e, t, l, tu, st, f, sc, sdr, so, o)
           ON CONFLICT DO NOTHING""",
        _qualification_row,
    ),
    "leak_detected": (
        """INSERT INTO lead_leakage_events (event_id, tenant_id, lead_id, temperature, action,
                                            waiting_since, deadline_at, detected_at, details)
           SELECT e, t, l, te, a, to_timestamp(w / 1000.0), to_timestamp(d / 1000.0), o, x::jsonb
           FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[],
                       $6::bigint[], $7::bigint[], $8::timestamptz[], $9::text[])
                AS u(e, t, l, te, a, w, d, o, x)
           ON CONFLICT DO NOTHING""",
        _leak_row,
    ),
    "recovery_attempt": (
        """INSERT INTO lead_recovery_log (event_id, tenant_id, lead_id, step, strategy, status,
                                          tokens_spent, sent_at, occurred_at)
           SELECT e, t, l, s, st, 'sent', k, o, o
           FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int[], $5::text[], $6::int[],
                       $7::timestamptz[]) AS u(e, t, l, s, st, k, o)
           ON CONFLICT DO NOTHING""",
        _recovery_attempt_row,
    ),
    "reassigned": (
        """INSERT INTO lead_reassignment_log (event_id, tenant_id, lead_id, from_sdr_id,
                                              to_sdr_id, reason, occurred_at)
           SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::uuid[],
                                $6::text[], $7::timestamptz[])
           ON CONFLICT DO NOTHING""",
        _reassignment_row,
    ),
}


_INSERT_USAGE = """
WITH inserted AS (
    INSERT INTO token_ledger (event_id, tenant_id, kind, feature, lead_id, model, prompt_tokens,
                              completion_tokens, tokens, occurred_at)
    SELECT e, t, 'usage', f, l, m, p, c, k, o
    FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                $7::bigint[], $8::bigint[], $9::timestamptz[]) AS u(e, t, f, l, m, p, c, k, o)
    ON CONFLICT DO NOTHING
    RETURNING tenant_id, (occurred_at AT TIME ZONE 'UTC')::date AS day, feature, tokens
)
INSERT INTO token_usage_daily (tenant_id, day, feature, tokens, actions)
SELECT tenant_id, day, feature, sum(tokens), count(*) FROM inserted GROUP BY 1, 2, 3
ON CONFLICT (tenant_id, day, feature) DO UPDATE SET
    tokens = token_usage_daily.tokens + EXCLUDED.tokens,
    actions = token_usage_daily.actions + EXCLUDED.actions
"""


class TokenUsageSink(BatchSink[TokenUsage]):
    """The usage half of the token ledger, and the daily usage it adds up to (only rows actually
    inserted are added, so a replay changes neither)."""

    async def _write_batch(self, pool: asyncpg.Pool, batch: Sequence[TokenUsage]) -> None:
        await pool.execute(
            _INSERT_USAGE,
            [e.event_id for e in batch],
            [e.tenant_id for e in batch],
            [e.feature for e in batch],
            [e.lead_id for e in batch],
            [e.model for e in batch],
            [e.prompt_tokens for e in batch],
            [e.completion_tokens for e in batch],
            [e.tokens for e in batch],
            [e.occurred_at for e in batch],
        )
        SINK_ROWS.labels("token_ledger").inc(len(batch))


class TokenCreditSink(BatchSink[BalanceChangeRecord]):
    """The credits topic's records, credits and debits, into the ledger (tokens positive, the
    kind saying which way)."""

    async def _write_batch(self, pool: asyncpg.Pool, batch: Sequence[BalanceChangeRecord]) -> None:
        changes = [record.root for record in batch]
        await pool.execute(
            """INSERT INTO token_ledger (event_id, tenant_id, kind, source, tokens, occurred_at)
               SELECT e, t, c, s, k, o
               FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::bigint[],
                           $6::timestamptz[])
                    AS u(e, t, c, s, k, o)
               ON CONFLICT DO NOTHING""",
            [e.event_id for e in changes],
            [e.tenant_id for e in changes],
            ["credit" if isinstance(e, TokenCredit) else "debit" for e in changes],
            [e.source for e in changes],
            [e.tokens for e in changes],
            [e.occurred_at for e in changes],
        )
        SINK_ROWS.labels("token_ledger").inc(len(batch))
