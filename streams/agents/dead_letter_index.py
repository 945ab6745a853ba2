"""The dead-letter index: every letter, and every replay of one, stored in PostgreSQL, where a
tenant's admins see the records of theirs that were set aside (`GET /api/dead-letters`).

A letter is the tenant's whose record names it: the `tenant_id` of the record's JSON, as every
producer of the source topics writes it (a failed deadline's letter names its lead's tenant).
Letters of records naming none (undecodable bytes, a partition's batch of deadlines) are the
operators', read with `flexoraa dead-letters list`.

This handler never dead-letters anything: a letter about a letter would be read back here, and
one it cannot store would go round for ever. A record of the topics that is no letter or mark,
or a row PostgreSQL refuses (or that cannot be built), is logged and counted
(`flexoraa_dead_letters_unindexed_total`).
"""

from __future__ import annotations

import base64
import binascii
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
from faust.types import AppT, TopicT
from pydantic import ValidationError

from flexoraa.db import DB_ERRORS
from schemas.events import DeadLetter, ReplayedLetter, is_webhook_source
from streams.batches import BatchLane, SourceRecord
from streams.metrics import DEAD_LETTERS_UNINDEXED, SINK_ROWS
from streams.sink import BatchSink, RejectedRow

logger = logging.getLogger(__name__)
PRUNE_INTERVAL_S = 3600.0

_INSERT_LETTERS = """
INSERT INTO dead_letters (letter_partition, letter_offset, dead_lettered_at, tenant_id,
                          source_topic, source_partition, source_offset, kind, consumer, reason,
                          record_key, record)
SELECT * FROM unnest($1::int[], $2::bigint[], $3::timestamptz[], $4::uuid[], $5::text[],
                     $6::int[], $7::bigint[], $8::text[], $9::text[], $10::text[], $11::bytea[],
                     $12::bytea[])
ON CONFLICT DO NOTHING
"""
_INSERT_REPLAYS = """
INSERT INTO dead_letter_replays (letter_partition, letter_offset, dead_lettered_at, replayed_at)
SELECT * FROM unnest($1::int[], $2::bigint[], $3::timestamptz[], $4::timestamptz[])
ON CONFLICT DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class LetterRow:
    partition: int
    offset: int
    dead_lettered_at: datetime
    tenant_id: str | None
    source_topic: str
    source_partition: int | None
    source_offset: int | None
    kind: str | None
    consumer: str | None
    reason: str
    key: bytes | None
    record: bytes


@dataclass(frozen=True, slots=True)
class ReplayRow:
    partition: int
    offset: int
    dead_lettered_at: datetime
    replayed_at: datetime


def record_tenant(raw: bytes) -> str | None:
    """The tenant a set-aside record names: its JSON's `tenant_id`, if that is a UUID in its
    canonical text (as every producer writes it; anything else names no tenant for sure)."""
    try:
        decoded = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    tenant = decoded.get("tenant_id") if isinstance(decoded, dict) else None
    if not isinstance(tenant, str):
        return None
    try:
        return tenant if str(uuid.UUID(tenant)) == tenant else None
    except ValueError:
        return None


def _text(value: str) -> str:
    # PostgreSQL's text holds no NUL, and a reason quotes whatever the record carried.
    return value.replace("\x00", "\\0")


def letter_row(record: SourceRecord) -> LetterRow | None:
    """The row of a letter on the dead-letter topic; None for a record that is no letter."""
    try:
        letter = DeadLetter.model_validate_json(record.value)
        raw = base64.b64decode(letter.raw_base64, validate=True)
        key = (
            base64.b64decode(letter.key_base64, validate=True)
            if letter.key_base64 is not None
            else None
        )
    except (ValidationError, ValueError, binascii.Error):
        return None
    return LetterRow(
        partition=record.partition,
        offset=record.offset,
        dead_lettered_at=_utc(letter.dead_lettered_at),
        # What a webhook's sender signed is not ours: whoever holds a channel's app secret could
        # name another tenant in it. Operator-only (`flexoraa dead-letters list`).
        tenant_id=None if is_webhook_source(letter.source_topic) else record_tenant(raw),
        source_topic=_text(letter.source_topic),
        source_partition=letter.partition,
        source_offset=letter.offset,
        kind=_text(letter.kind) if letter.kind is not None else None,
        consumer=_text(letter.consumer) if letter.consumer is not None else None,
        reason=_text(letter.reason),
        key=key,
        record=raw,
    )


def replay_row(record: SourceRecord) -> ReplayRow | None:
    """The row of a mark on the marks topic; None for a record that is no mark."""
    try:
        mark = ReplayedLetter.model_validate_json(record.value)
    except ValidationError:
        return None
    return ReplayRow(
        mark.replayed_partition,
        mark.replayed_offset,
        _utc(mark.dead_lettered_at),
        _utc(mark.replayed_at),
    )


def _utc(at: datetime) -> datetime:
    # Workers write UTC; a time without a zone (an older or a foreign producer) is taken as
    # UTC too, not as whatever zone the worker storing it runs in (asyncpg's reading).
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


class LetterSink(BatchSink[LetterRow]):
    async def _write_batch(self, pool: asyncpg.Pool, batch: Sequence[LetterRow]) -> None:
        status = await pool.execute(
            _INSERT_LETTERS,
            *(list(column) for column in zip(*map(_letter_values, batch), strict=True)),
        )
        SINK_ROWS.labels("dead_letters").inc(int(status.rsplit(" ", 1)[-1]))


class ReplaySink(BatchSink[ReplayRow]):
    async def _write_batch(self, pool: asyncpg.Pool, batch: Sequence[ReplayRow]) -> None:
        await pool.execute(
            _INSERT_REPLAYS,
            [r.partition for r in batch],
            [r.offset for r in batch],
            [r.dead_lettered_at for r in batch],
            [r.replayed_at for r in batch],
        )


class DeadLetterIndex:
    """Stores a fetch's letters and marks: a transient failure is retried (the lane holds the
    fetch meanwhile), a row PostgreSQL refuses is logged and skipped."""

    def __init__(
        self,
        pool_factory: Callable[[], Awaitable[asyncpg.Pool]],
        *,
        letters_topic: str,
        marks_topic: str,
    ) -> None:
        self._letters = LetterSink(pool_factory)
        self._replays = ReplaySink(pool_factory)
        self._letters_topic = letters_topic
        self._marks_topic = marks_topic

    async def write(self, records: Sequence[SourceRecord]) -> None:
        letters: list[LetterRow] = []
        replays: list[ReplayRow] = []
        for record in records:
            if record.value is None:
                continue
            if record.topic == self._letters_topic:
                if (letter := letter_row(record)) is not None:
                    letters.append(letter)
                    continue
            elif (replay := replay_row(record)) is not None:
                replays.append(replay)
                continue
            DEAD_LETTERS_UNINDEXED.labels("undecodable").inc()
            logger.warning(
                "not indexed: %s[%d]@%d is no %s",
                record.topic, record.partition, record.offset,
                "dead letter" if record.topic == self._letters_topic else "replay mark",
            )  # fmt: skip
        try:
            refused: list[RejectedRow[LetterRow] | RejectedRow[ReplayRow]] = [
                *await self._letters.write(letters),
                *await self._replays.write(replays),
            ]
        except asyncpg.PostgresError as exc:
            # Neither the letters' fault nor an outage (both handled above): a missing table
            # (workers started before `flexoraa migrate`), a permission, a timeout. The index
            # is for reading, the topic keeps every letter, and raising would stop the lane's
            # every handler, at every restart, on every worker the partitions moved to.
            DEAD_LETTERS_UNINDEXED.labels("failed").inc(len(letters) + len(replays))
            logger.error(
                "%d dead letters and marks not indexed: %r", len(letters) + len(replays), exc
            )
            return
        for rejected in refused:
            DEAD_LETTERS_UNINDEXED.labels("refused").inc()
            logger.warning(
                "not indexed: letter %d@%d (%s)",
                rejected.message.partition, rejected.message.offset, rejected.reason,
            )  # fmt: skip


async def prune(
    pool_factory: Callable[[], Awaitable[asyncpg.Pool]], before: datetime
) -> tuple[int, int]:
    """Deletes the letters set aside before `before`, and their replays; returns how many."""
    pool = await pool_factory()
    async with pool.acquire() as conn, conn.transaction():
        letters = await conn.execute("DELETE FROM dead_letters WHERE dead_lettered_at < $1", before)
        replays = await conn.execute(
            "DELETE FROM dead_letter_replays WHERE dead_lettered_at < $1", before
        )
    return int(letters.rsplit(" ", 1)[-1]), int(replays.rsplit(" ", 1)[-1])


def _letter_values(row: LetterRow) -> tuple[object, ...]:
    return (row.partition, row.offset, row.dead_lettered_at, row.tenant_id, row.source_topic,
            row.source_partition, row.source_offset, row.kind, row.consumer, row.reason,
            row.key, row.record)  # fmt: skip


def register(
    app: AppT,
    lane: BatchLane,
    pool_factory: Callable[[], Awaitable[asyncpg.Pool]],
    *,
    letters: TopicT,
    marks: TopicT,
    kept_days: int,
    batch_size: int,
    batch_window_s: float,
) -> None:
    index = DeadLetterIndex(
        pool_factory, letters_topic=letters.get_topic_name(), marks_topic=marks.get_topic_name()
    )
    lane.add_handler(
        "dead-letter-index",
        [letters, marks],
        index.write,
        max_batch=batch_size,
        linger_s=batch_window_s,
    )

    # One worker of the group prunes; a pass missed (PostgreSQL down) is the next one's.
    @app.timer(interval=PRUNE_INTERVAL_S, on_leader=True)
    async def prune_old_letters() -> None:
        try:
            pruned = await prune(pool_factory, datetime.now(UTC) - timedelta(days=kept_days))
        except DB_ERRORS as exc:
            logger.warning("old dead letters not pruned: %r", exc)
            return
        if any(pruned):
            logger.info("pruned %d dead letters and %d replays older than %d days",
                        *pruned, kept_days)  # fmt: skip
