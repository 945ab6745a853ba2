"""The dead-letter topic for operators: list what was set aside, and put it back once mended.

Every record an agent could not take (undecodable, refused by PostgreSQL, failing for a reason
of its own: streams.poison) is on the dead-letter topic with its reason, its key and its raw
bytes. `replay` produces those bytes again, under the same key, to the topic they were read
from (`source_topic`), once the cause is mended (a tenant created, a bug fixed):

- a letter a handler set aside while the topic's other readers took the record (a failed
  qualification step, a sink's refused row) goes to that handler alone: the replayed record
  carries its name (`REPLAY_FOR_HEADER`) and the other handlers skip it. Run again, they
  would repeat what they did the first time (report a leak, restart a recovery sequence);
- a letter no reader took (it did not decode) goes to them all;
- each replayed letter is marked on the dead-letter topic (`ReplayedLetter`), and a later
  replay leaves it alone unless asked `again`: a handler that does not recognise a repeated
  event would act on it twice. A record failing again is a new letter, to replay once mended;
- letters from internal topics are not replayed (a deadline record finds its deadline
  cancelled and does nothing; tenant statuses and changelogs are state the workers write),
  nor records under a key they were refused for (`wrong_key`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import BaseModel, ConfigDict, ValidationError

from flexoraa.kafka import KeyPartitioner, acknowledged_producer, back_off_failed_metadata_updates
from flexoraa.settings import Settings
from schemas.events import REPLAY_FOR_HEADER, DeadLetter
from schemas.topics import TopicNames

# Records asked of the broker per read (a dead letter is a few kilobytes at most).
_READ_BATCH = 1000
# A partition that returns nothing this long while records are left is unreadable (its leader
# is gone): said, not waited on forever.
READ_STALL_S = 30.0


class ReplayedLetter(BaseModel):
    """Written to the dead-letter topic once the letter at (partition, offset) is replayed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    replayed_partition: int
    replayed_offset: int
    replayed_at: datetime


def replayable_topics(names: TopicNames) -> set[str]:
    """The topics agents read events from: what a dead letter can be put back onto."""
    return {
        names.inbound_messages,
        names.outbound_commands,
        names.outbound_messages,
        names.delivery_status,
        names.lead_events,
        names.token_usage,
        names.token_credits,
        names.latency,
        names.notifications,
    }


@dataclass(frozen=True)
class LetterFilter:
    """Which dead letters a command takes; every given condition must hold."""

    since: datetime | None = None
    until: datetime | None = None
    # A part of the reason, any case ("unknown tenant", "DataError").
    reason: str | None = None
    # The source topic, with or without the deployment's prefix ("inbound-messages").
    source: str | None = None
    # The record's key as text (a lead or tenant id).
    key: str | None = None

    def is_empty(self) -> bool:
        return not any((self.since, self.until, self.reason, self.source, self.key))

    def matches(self, letter: DeadLetter, names: TopicNames) -> bool:
        if self.since is not None and letter.dead_lettered_at < self.since:
            return False
        if self.until is not None and letter.dead_lettered_at >= self.until:
            return False
        if self.reason and self.reason.lower() not in letter.reason.lower():
            return False
        if self.source and letter.source_topic not in (
            self.source,
            f"{names.prefix}.{self.source}",
        ):
            return False
        return not self.key or key_text(letter) == self.key


@dataclass(frozen=True)
class StoredLetter:
    """A dead letter, where it is on the dead-letter topic, and when it was replayed."""

    partition: int
    offset: int
    letter: DeadLetter
    replayed_at: datetime | None = None


def key_text(letter: DeadLetter) -> str | None:
    key = decoded_key(letter)
    return key.decode(errors="replace") if key is not None else None


def decoded_key(letter: DeadLetter) -> bytes | None:
    return base64.b64decode(letter.key_base64) if letter.key_base64 is not None else None


async def read_letters(settings: Settings, letter_filter: LetterFilter) -> list[StoredLetter]:
    """The dead letters matching `letter_filter`, up to the end of the topic when called, in
    offset order per partition, each with its replay mark if it has one. (The marks come
    after their letters: the whole range is read before any letter is returned.)"""
    names = TopicNames(settings.topic_prefix)
    matched: list[StoredLetter] = []
    replayed: dict[tuple[int, int], datetime] = {}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    back_off_failed_metadata_updates(consumer._client)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(names.dead_letters, p) for p in range(settings.kafka_partitions)
        ]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        starts = await _start_offsets(consumer, partitions, ends, letter_filter.since)
        # Known offsets, not `seek_to_beginning` and then `position`: that found nothing left to
        # read in 2 of 8 runs against a topic holding two letters, and the letters were missed.
        for tp, offset in starts.items():
            consumer.seek(tp, offset)
        remaining = {tp for tp, end in ends.items() if starts[tp] < end}
        progressed_at = time.monotonic()
        while remaining:
            fetched = await consumer.getmany(*remaining, timeout_ms=500, max_records=_READ_BATCH)
            for tp, records in fetched.items():
                progressed_at = time.monotonic()
                for record in records:
                    if record.offset >= ends[tp]:
                        break
                    _sort(record, tp.partition, letter_filter, names, matched, replayed)
            remaining = {tp for tp in remaining if await consumer.position(tp) < ends[tp]}
            if remaining and time.monotonic() - progressed_at > READ_STALL_S:
                unread = ", ".join(str(tp.partition) for tp in sorted(remaining))
                raise TimeoutError(f"{names.dead_letters}: partitions {unread} unreadable")
    finally:
        await consumer.stop()
    return [
        StoredLetter(s.partition, s.offset, s.letter, replayed.get((s.partition, s.offset)))
        for s in matched
    ]


def _sort(
    record: Any, partition: int, letter_filter: LetterFilter, names: TopicNames,
    matched: list[StoredLetter], replayed: dict[tuple[int, int], datetime],
) -> None:  # fmt: skip
    """A record of the topic: a letter (kept if it matches), a replay mark, or neither."""
    if record.value is None:
        return
    try:
        letter = DeadLetter.model_validate_json(record.value)
    except ValidationError:
        try:
            mark = ReplayedLetter.model_validate_json(record.value)
        except ValidationError:
            return
        replayed[(mark.replayed_partition, mark.replayed_offset)] = mark.replayed_at
        return
    if letter_filter.matches(letter, names):
        matched.append(StoredLetter(partition, record.offset, letter))


async def _start_offsets(
    consumer: AIOKafkaConsumer,
    partitions: list[TopicPartition],
    ends: dict[TopicPartition, int],
    since: datetime | None,
) -> dict[TopicPartition, int]:
    """Where each partition's matching letters can start: its first offset, or the first
    record produced at or after `since` (a letter is produced just after its
    `dead_lettered_at`, and its replay mark later)."""
    first: dict[TopicPartition, int] = await consumer.beginning_offsets(partitions)
    if since is None:
        return first
    since_ms = int(since.timestamp() * 1000)
    found = await consumer.offsets_for_times({tp: since_ms for tp in partitions})
    return {tp: at.offset if at is not None else ends[tp] for tp, at in found.items()}


@dataclass
class ReplayReport:
    """What a replay put back, by topic, and what it left, by why."""

    replayed: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"replayed": dict(self.replayed), "skipped": dict(self.skipped)}

    @property
    def failed(self) -> int:
        return sum(n for why, n in self.skipped.items() if why.startswith("not sent"))


def skip_reason(stored: StoredLetter, names: TopicNames, *, again: bool = False) -> str | None:
    """Why `stored` cannot be put back, or None."""
    letter = stored.letter
    if letter.source_topic not in replayable_topics(names):
        return f"not replayable: {letter.source_topic}"
    if letter.kind == "wrong_key":
        return "refused for its key"
    if stored.replayed_at is not None and not again:
        return "replayed before"
    try:
        base64.b64decode(letter.raw_base64, validate=True)
    except binascii.Error:
        return "raw bytes not base64"
    return None


async def replay(
    settings: Settings, letters: list[StoredLetter], *, dry_run: bool = False, again: bool = False
) -> ReplayReport:
    """Produces each letter's raw bytes under its key to its source topic, for the handler that
    set it aside if one did (a keyed topic's partition is the key's, as when the record was
    first produced), then marks it replayed; returns once Kafka acknowledged every record and
    mark, failed ones counted under `skipped`. Identical letters go out once. With `dry_run`,
    only counts."""
    names = TopicNames(settings.topic_prefix)
    report = ReplayReport()
    chosen: list[StoredLetter] = []
    seen: set[tuple[str, str | None, str, str | None]] = set()
    for stored in letters:
        letter = stored.letter
        reason = skip_reason(stored, names, again=again)
        identity = (letter.source_topic, letter.key_base64, letter.raw_base64, letter.consumer)
        if reason is None and identity in seen:
            reason = "same record as another letter"
        if reason is not None:
            report.skipped[reason] += 1
            continue
        seen.add(identity)
        chosen.append(stored)
    if dry_run:
        report.replayed.update(stored.letter.source_topic for stored in chosen)
        return report
    producer = acknowledged_producer(settings, linger_ms=5, partitioner=KeyPartitioner())
    await producer.start()
    try:
        for start in range(0, len(chosen), _READ_BATCH):
            await _replay_slice(producer, names, chosen[start : start + _READ_BATCH], report)
    finally:
        await producer.stop()
    return report


async def _replay_slice(
    producer: Any, names: TopicNames, chosen: list[StoredLetter], report: ReplayReport
) -> None:
    sent = await asyncio.gather(*(_put_back(producer, s) for s in chosen), return_exceptions=True)
    marks = []
    for stored, outcome in zip(chosen, sent, strict=True):
        if isinstance(outcome, BaseException):
            report.skipped[f"not sent: {type(outcome).__name__}"] += 1
            continue
        report.replayed[stored.letter.source_topic] += 1
        mark = ReplayedLetter(replayed_partition=stored.partition, replayed_offset=stored.offset,
                              replayed_at=datetime.now(UTC))  # fmt: skip
        # Under the letter's key: on its partition, after it.
        marks.append(producer.send_and_wait(
            names.dead_letters, mark.model_dump_json().encode(), key=decoded_key(stored.letter)
        ))  # fmt: skip
    # A mark that fails leaves its letter unmarked: replayed again only if asked.
    await asyncio.gather(*marks, return_exceptions=True)


async def _put_back(producer: Any, stored: StoredLetter) -> None:
    letter = stored.letter
    headers = [(REPLAY_FOR_HEADER, letter.consumer.encode())] if letter.consumer else None
    await producer.send_and_wait(
        letter.source_topic,
        base64.b64decode(letter.raw_base64),
        key=decoded_key(letter),
        headers=headers,
    )
