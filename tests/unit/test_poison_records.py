"""Poison records: a record failing for what it carries is dead-lettered and the agent goes on;
a failure of Kafka or an unreachable PostgreSQL (or a stopping worker) still stops the worker."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field
from typing import cast

import asyncpg
import pytest
from aiokafka.errors import KafkaConnectionError
from faust.types import TopicT

from schemas.events import REPLAY_FOR_HEADER, DeadLetter, InboundMessage
from streams.batches import SourceRecord, current_handler, one_record_at_a_time
from streams.dead_letters import decoded_record
from streams.poison import REASON_MAX_CHARS, PoisonPolicy, PoisonRecords, is_poison


@dataclass(frozen=True)
class Record:
    topic: str = "acme.inbound-messages"
    partition: int = 3
    offset: int = 0
    key: bytes = b"lead-key"
    value: bytes = b"{}"


@dataclass
class DeadLetters:
    sent: list[tuple[bytes, DeadLetter]] = field(default_factory=list)

    async def send(self, *, key: bytes, value: bytes) -> None:
        self.sent.append((key, DeadLetter.model_validate_json(value)))


def poison_records(
    policy: PoisonPolicy = "dead_letter", stopping: bool = False
) -> tuple[PoisonRecords, DeadLetters]:
    letters = DeadLetters()
    guard = PoisonRecords(cast(TopicT, letters), policy=policy, is_stopping=lambda: stopping)
    return guard, letters


@pytest.mark.parametrize(
    ("exc", "poison"),
    [
        (ValueError("year 10000 is out of range"), True),
        (KeyError("turn"), True),
        (TypeError("Integer exceeds 64-bit range"), True),
        (AttributeError("'list' object has no attribute 'get'"), True),
        (OverflowError("cannot convert float infinity to integer"), True),
        # Data PostgreSQL refuses: SQLSTATE classes 22 and 23.
        (asyncpg.DataError("invalid UUID 'acme'"), True),
        (asyncpg.CharacterNotInRepertoireError("invalid byte sequence: 0x00"), True),
        (asyncpg.ForeignKeyViolationError("no such tenant"), True),
        # The platform's or the deployment's, not the record's: read again after a restart.
        (KafkaConnectionError(), False),
        (ConnectionRefusedError(), False),
        (TimeoutError(), False),
        (asyncpg.CannotConnectNowError("starting up"), False),
        (asyncpg.TooManyConnectionsError(), False),
        (asyncpg.AdminShutdownError("terminating connection"), False),
        (asyncpg.ReadOnlySQLTransactionError("read-only after a failover"), False),
        (asyncpg.DeadlockDetectedError("deadlock detected"), False),
        (asyncpg.SerializationError("could not serialize access"), False),
        (asyncpg.QueryCanceledError("statement timeout"), False),
        (asyncpg.DiskFullError("no space left"), False),
        (asyncpg.InvalidPasswordError("password authentication failed"), False),
        (asyncpg.UndefinedTableError('relation "sdrs" does not exist'), False),
        (asyncpg.InterfaceError("connection is closed"), False),
        (RuntimeError("Event loop is closed"), False),
        (asyncio.CancelledError(), False),
    ],
)
def test_what_counts_as_the_records_own_failure(exc: BaseException, poison: bool) -> None:
    assert is_poison(exc) is poison


async def test_a_failing_record_is_dead_lettered_with_the_error_and_the_next_is_handled() -> None:
    guard, letters = poison_records()
    handled: list[int] = []

    async def handle(record: SourceRecord) -> None:
        if record.offset == 1:
            raise ValueError("year 10000 is out of range")
        handled.append(record.offset)

    records = [Record(offset=o, value=f"record {o}".encode()) for o in range(3)]
    await one_record_at_a_time(handle, guard.handle)(records)

    assert handled == [0, 2]
    [(key, letter)] = letters.sent
    assert key == b"lead-key"
    assert (letter.source_topic, letter.partition, letter.offset) == ("acme.inbound-messages", 3, 1)
    assert base64.b64decode(letter.raw_base64) == b"record 1"
    assert letter.reason == "processing failed: ValueError: year 10000 is out of range"


async def test_only_the_failed_part_can_be_dead_lettered() -> None:
    guard, letters = poison_records()
    deadlines = Record(key=None, value=b"two deadlines")  # type: ignore[arg-type]
    await guard.dead_letter(deadlines, KeyError("x"), raw=b"one deadline", key=b"its lead")
    [(key, letter)] = letters.sent
    assert (key, base64.b64decode(letter.raw_base64)) == (b"its lead", b"one deadline")
    assert base64.b64decode(letter.key_base64 or "") == b"its lead"


async def test_a_long_reason_is_cut() -> None:
    guard, letters = poison_records()

    async def handle(record: SourceRecord) -> None:
        raise ValueError("x" * 10_000)

    await guard.handle(handle, Record())
    assert len(letters.sent[0][1].reason) == REASON_MAX_CHARS


@pytest.mark.parametrize(
    ("policy", "stopping", "exc"),
    [
        ("dead_letter", False, KafkaConnectionError()),
        ("dead_letter", False, asyncpg.CannotConnectNowError("starting up")),
        ("dead_letter", True, ValueError("the producer is stopped")),
        ("stop", False, ValueError("year 10000 is out of range")),
    ],
)
async def test_the_worker_stops_on_the_platforms_failures_when_stopping_or_when_told_to(
    policy: PoisonPolicy, stopping: bool, exc: Exception
) -> None:
    guard, letters = poison_records(policy, stopping)

    async def handle(record: SourceRecord) -> None:
        raise exc

    with pytest.raises(type(exc)):
        await guard.handle(handle, Record())
    assert letters.sent == []


@dataclass(frozen=True)
class ReplayedRecord(Record):
    headers: tuple[tuple[str, bytes], ...] = ((REPLAY_FOR_HEADER, b"qualification"),)


async def test_a_letter_names_the_lane_handler_and_a_replay_failing_again_keeps_its_own() -> None:
    guard, letters = poison_records()

    async def failing(record: SourceRecord) -> None:
        raise ValueError("still broken")

    async def in_lane(name: str, record: SourceRecord) -> None:
        token = current_handler.set(name)
        try:
            await guard.handle(failing, record)
        finally:
            current_handler.reset(token)

    await in_lane("recovery-watch", Record())
    # Only its handler takes a replayed record; failing again, it stays that handler's.
    await in_lane("qualification", ReplayedRecord())
    await guard.handle(failing, Record())  # a Faust agent, its topic's one reader
    assert [letter.consumer for _, letter in letters.sent] == [
        "recovery-watch", "qualification", None,
    ]  # fmt: skip
    assert {letter.kind for _, letter in letters.sent} == {"processing_failed"}


async def test_a_replay_its_handler_cannot_decode_is_set_aside_again_not_dropped() -> None:
    # The topic's other readers skip a targeted replay: a handler that passes over records it
    # cannot decode (another reader dead-letters those) would drop it without a letter.
    guard, letters = poison_records()

    async def qualification(record: SourceRecord) -> None:
        if decoded_record(record, InboundMessage) is None:
            return

    token = current_handler.set("qualification")
    try:
        await guard.handle(qualification, Record(value=b"{}"))  # not a replay: another's
        await guard.handle(qualification, ReplayedRecord(value=b"{}"))
    finally:
        current_handler.reset(token)
    [(key, letter)] = letters.sent
    assert (key, letter.kind, letter.consumer) == (
        b"lead-key",
        "processing_failed",
        "qualification",
    )
    assert "ValidationError" in letter.reason
    assert base64.b64decode(letter.raw_base64) == b"{}"


async def test_past_the_breaker_a_failing_record_stops_the_worker() -> None:
    """A release that cannot read its traffic: three records set aside, then the worker stops
    on the fourth and the records wait in their topic for the fix."""
    now = [0.0]
    letters = DeadLetters()
    guard = PoisonRecords(cast(TopicT, letters), policy="dead_letter", is_stopping=lambda: False,
                          breaker_records=3, breaker_window_s=60, clock=lambda: now[0])  # fmt: skip

    async def handle(record: SourceRecord) -> None:
        raise AttributeError("'NoneType' object has no attribute 'tenant_id'")

    for offset in range(3):
        now[0] += 10
        await guard.handle(handle, Record(offset=offset))
    with pytest.raises(AttributeError):
        await guard.handle(handle, Record(offset=3))
    assert [letter.offset for _, letter in letters.sent] == [0, 1, 2]
    # A minute later the window holds none of them: one failing record is its own again.
    now[0] += 61
    await guard.handle(handle, Record(offset=4))
    assert [letter.offset for _, letter in letters.sent] == [0, 1, 2, 4]


async def test_without_a_breaker_every_failing_record_is_set_aside() -> None:
    letters = DeadLetters()
    guard = PoisonRecords(cast(TopicT, letters), policy="dead_letter", is_stopping=lambda: False,
                          breaker_records=0)  # fmt: skip

    async def handle(record: SourceRecord) -> None:
        raise ValueError("bad")

    for offset in range(500):
        await guard.handle(handle, Record(offset=offset))
    assert len(letters.sent) == 500


async def test_the_breaker_counts_records_not_the_parts_set_aside_of_one() -> None:
    letters = DeadLetters()
    guard = PoisonRecords(cast(TopicT, letters), policy="dead_letter", is_stopping=lambda: False,
                          breaker_records=2, breaker_window_s=60, clock=lambda: 0.0)  # fmt: skip
    deadlines = Record(offset=7)
    for part in range(5):  # five deadlines of one record
        assert guard.should_dead_letter(KeyError("x"))
        await guard.dead_letter(deadlines, KeyError("x"), raw=f"{part}".encode(), key=b"lead")
    assert guard.should_dead_letter(KeyError("x"))
    await guard.dead_letter(Record(offset=8), KeyError("x"))
    assert not guard.should_dead_letter(KeyError("x"))
    # A batch's parts after the batch was let through are not stopped halfway.
    assert guard.should_dead_letter(KeyError("x"), breaker=False)
