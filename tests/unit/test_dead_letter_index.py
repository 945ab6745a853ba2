"""The dead-letter index: which tenant a letter is shown to, what it stores, and that it never
sets anything aside itself (a letter about a letter would come back to it)."""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import pytest

from schemas.events import DeadLetter, ReplayedLetter
from streams.agents.dead_letter_index import (
    DeadLetterIndex,
    letter_row,
    record_tenant,
    replay_row,
)
from streams.metrics import DEAD_LETTERS_UNINDEXED

TENANT = str(uuid.uuid4())
LETTERS = "acme.dead-letters"
MARKS = "acme.dead-letters-replayed"


@dataclass(frozen=True)
class Record:
    value: bytes | None
    topic: str = LETTERS
    partition: int = 3
    offset: int = 41
    key: bytes | None = None


def letter(
    raw: bytes,
    reason: str = "processing failed: boom",
    key: bytes | None = b"k",
    source_topic: str = "acme.lead-events",
) -> bytes:
    return DeadLetter(
        source_topic=source_topic, partition=1, offset=7, reason=reason,
        raw_base64=base64.b64encode(raw).decode(),
        key_base64=base64.b64encode(key).decode() if key is not None else None,
        dead_lettered_at=datetime.now(UTC), kind="processing_failed", consumer="sink-lead-events",
    ).model_dump_json().encode()  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "tenant"),
    [
        (b'{"tenant_id": "%s", "lead_id": "x"}' % TENANT.encode(), TENANT),
        (b'{"tenant_id": "%s"}' % TENANT.upper().encode(), None),  # not as producers write it
        (b'{"tenant_id": "%s\\n"}' % TENANT.encode(), None),
        (b'{"tenant_id": 7}', None),
        (b'{"lead_id": "x"}', None),
        (b'["%s"]' % TENANT.encode(), None),
        (b'\x00{"tenant_id": "%s"}' % TENANT.encode(), None),  # not JSON
        (b"", None),
    ],
)
def test_a_letter_is_the_tenants_its_record_names(raw: bytes, tenant: str | None) -> None:
    assert record_tenant(raw) == tenant


def test_a_webhooks_letter_is_no_tenants_whatever_it_names() -> None:
    # Anyone holding a channel's app secret signs what the webhook carries.
    raw = b'{"tenant_id": "%s"}' % TENANT.encode()
    row = letter_row(Record(letter(raw, source_topic="webhook:whatsapp_business_account")))
    assert row is not None
    assert (row.tenant_id, row.record) == (None, raw)


def test_a_letters_row_keeps_its_place_record_and_key_and_no_nul() -> None:
    raw = b'{"tenant_id": "%s"}' % TENANT.encode()
    row = letter_row(Record(letter(raw, reason="database refused the row: \x00 in text")))
    assert row is not None
    assert (row.partition, row.offset) == (3, 41)
    assert (row.source_topic, row.source_partition, row.source_offset) == ("acme.lead-events", 1, 7)
    assert (row.tenant_id, row.record, row.key) == (TENANT, raw, b"k")
    assert (row.kind, row.consumer) == ("processing_failed", "sink-lead-events")
    assert row.reason == "database refused the row: \\0 in text"
    assert letter_row(Record(letter(raw, key=None))).key is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "value",
    [b"not json", b"{}", letter(b"x").replace(b'"raw_base64":"eA=="', b'"raw_base64":"e!=="')],
)
def test_a_record_that_is_no_letter_has_no_row(value: bytes) -> None:
    assert letter_row(Record(value)) is None


def test_a_marks_row() -> None:
    at, replayed = datetime.now(UTC), datetime.now(UTC)
    mark = ReplayedLetter(replayed_partition=3, replayed_offset=41, dead_lettered_at=at,
                          replayed_at=replayed).model_dump_json().encode()  # fmt: skip
    row = replay_row(Record(mark, topic=MARKS))
    assert row is not None
    assert (row.partition, row.offset, row.dead_lettered_at, row.replayed_at) == (
        3, 41, at, replayed,
    )  # fmt: skip
    assert replay_row(Record(b'{"replayed_partition": 1}', topic=MARKS)) is None


class Pool:
    """Refuses a statement carrying any of `refused`, as PostgreSQL refuses a batch for one row."""

    def __init__(self, refused: set[object]) -> None:
        self.refused = refused
        self.stored: list[list[tuple[Any, ...]]] = []
        self.failure: Exception | None = None

    async def execute(self, statement: str, *columns: list[Any]) -> str:
        if self.failure is not None:
            raise self.failure
        if any(value in self.refused for column in columns for value in column):
            raise asyncpg.DataError("refused")
        self.stored.append(list(zip(*columns, strict=True)))
        return f"INSERT 0 {len(columns[0])}"


def index_with(pool: Pool) -> DeadLetterIndex:
    async def factory() -> asyncpg.Pool:
        return cast(asyncpg.Pool, pool)

    return DeadLetterIndex(factory, letters_topic=LETTERS, marks_topic=MARKS)


def unindexed(reason: str) -> float:
    value: float = DEAD_LETTERS_UNINDEXED.labels(reason)._value.get()
    return value


async def test_a_refused_row_is_counted_and_the_others_stored_nothing_raised() -> None:
    pool = Pool(refused={b"bad"})
    before = unindexed("refused")
    await index_with(pool).write([
        Record(letter(b"good"), offset=1), Record(letter(b"bad"), offset=2),
        Record(letter(b"fine"), offset=3),
    ])  # fmt: skip
    stored = [row for statement in pool.stored for row in statement]
    assert [row[1] for row in stored] == [1, 3]
    assert unindexed("refused") == before + 1


async def test_a_record_that_is_no_letter_or_mark_is_counted_not_stored() -> None:
    pool = Pool(refused=set())
    before = unindexed("undecodable")
    await index_with(pool).write([
        Record(b"garbage"), Record(letter(b"x"), topic=MARKS), Record(None),
    ])  # fmt: skip
    assert pool.stored == []
    assert unindexed("undecodable") == before + 2


async def test_a_failing_index_is_counted_and_stops_nothing() -> None:
    # Workers started before `flexoraa migrate`: raised, it would stop every handler of the
    # lane (the inbound path too) at every restart.
    pool = Pool(refused=set())
    pool.failure = asyncpg.UndefinedTableError('relation "dead_letters" does not exist')
    before = unindexed("failed")
    await index_with(pool).write([Record(letter(b"x"), offset=1), Record(letter(b"y"), offset=2)])
    assert unindexed("failed") == before + 2


def test_a_time_without_a_zone_is_utc() -> None:
    # Not the zone of whichever worker stores it (asyncpg's reading of a naive time): a letter
    # and its mark are matched on it.
    naive = datetime(2026, 12, 4, 21, 0)
    raw = base64.b64encode(b"x").decode()
    old = DeadLetter(source_topic="acme.lead-events", partition=1, offset=7, reason="boom",
                     raw_base64=raw, dead_lettered_at=naive).model_dump_json().encode()  # fmt: skip
    mark = ReplayedLetter(replayed_partition=3, replayed_offset=41, dead_lettered_at=naive,
                          replayed_at=naive).model_dump_json().encode()  # fmt: skip
    letter_at = letter_row(Record(old))
    replay = replay_row(Record(mark, topic=MARKS))
    assert letter_at is not None
    assert replay is not None
    assert letter_at.dead_lettered_at == naive.replace(tzinfo=UTC) == replay.dead_lettered_at
    assert replay.replayed_at.tzinfo is not None
