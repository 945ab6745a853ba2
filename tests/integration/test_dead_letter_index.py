"""The dead-letter index on the real PostgreSQL: letters and marks stored once however often
they are read, what PostgreSQL cannot hold in a text made storable, and old letters pruned."""

from __future__ import annotations

import base64
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from flexoraa.settings import Settings
from schemas.events import DeadLetter, ReplayedLetter
from streams.agents.dead_letter_index import DeadLetterIndex, prune

pytestmark = pytest.mark.integration
LETTERS = "idx.dead-letters"
MARKS = "idx.dead-letters-replayed"


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None


@pytest.fixture
async def pool(test_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(test_settings.database_url, min_size=1, max_size=2)
    try:
        yield created
    finally:
        await created.close()


async def test_letters_and_marks_are_stored_once_and_old_ones_pruned(pool: asyncpg.Pool) -> None:
    async def factory() -> asyncpg.Pool:
        return pool

    index = DeadLetterIndex(factory, letters_topic=LETTERS, marks_topic=MARKS)
    tenant = str(uuid.uuid4())
    # Far past the offsets of the session's real dead-letter topic, which workers index too.
    offset = random.randrange(10**12, 10**13)
    now = datetime.now(UTC)
    old, naive = now - timedelta(days=40), datetime(2026, 12, 1, 9, 30)
    raw = b'{"tenant_id": "%s", "lead_id": "x"}' % tenant.encode()

    def letter(at: datetime, reason: str) -> bytes:
        return DeadLetter(source_topic="idx.lead-events", partition=1, offset=9, reason=reason,
                          raw_base64=base64.b64encode(raw).decode(), dead_lettered_at=at,
                          kind="sink_rejected").model_dump_json().encode()  # fmt: skip

    def mark(position: int, at: datetime) -> bytes:
        replayed = ReplayedLetter(replayed_partition=2, replayed_offset=position,
                                  dead_lettered_at=at, replayed_at=now)  # fmt: skip
        return replayed.model_dump_json().encode()

    records = [
        Record(LETTERS, 2, offset, letter(now, "database refused the row: \x00 in text")),
        Record(LETTERS, 2, offset + 1, letter(old, "old")),
        Record(LETTERS, 2, offset + 2, letter(naive, "no zone")),
        Record(MARKS, 0, 5, mark(offset + 1, old)),
        Record(MARKS, 0, 6, mark(offset + 2, naive)),
    ]
    await index.write(records)
    await index.write(records)  # read again after a restart
    rows = await pool.fetch(
        "SELECT letter_offset - $1 AS n, tenant_id::text, reason, dead_lettered_at, record"
        " FROM dead_letters WHERE letter_offset >= $1 ORDER BY letter_offset", offset,
    )  # fmt: skip
    assert [(r["n"], r["tenant_id"], r["record"]) for r in rows] == [
        (0, tenant, raw), (1, tenant, raw), (2, tenant, raw)
    ]  # fmt: skip
    assert rows[0]["reason"] == "database refused the row: \\0 in text"
    assert rows[2]["dead_lettered_at"] == naive.replace(tzinfo=UTC)
    replays = await pool.fetch(
        "SELECT r.letter_offset - $1 AS n FROM dead_letter_replays r JOIN dead_letters d"
        " USING (letter_partition, letter_offset, dead_lettered_at)"
        " WHERE r.letter_offset >= $1 ORDER BY 1", offset,
    )  # fmt: skip
    assert [r["n"] for r in replays] == [1, 2]  # matched to their letters, once each

    letters, marks = await prune(factory, now - timedelta(days=30))
    assert (letters, marks) >= (1, 1)
    left = await pool.fetch(
        "SELECT letter_offset - $1 AS n FROM dead_letters WHERE letter_offset >= $1 ORDER BY 1",
        offset,
    )
    assert [r["n"] for r in left] == [0, 2]
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM dead_letter_replays WHERE letter_offset = $1", offset + 1
        )
        == 0
    )
