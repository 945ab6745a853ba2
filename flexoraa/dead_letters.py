"""The dead-letter topic for operators: list what was set aside, and put it back once mended.

Every record an agent could not take (undecodable, refused by PostgreSQL, failing for a reason
of its own: streams.poison) is on the dead-letter topic with its reason, its key and its raw
bytes. `replay` produces those bytes again, under the same key, to the topic they were read
from (`source_topic`), so the pipeline takes them once the cause is mended: a tenant created,
a bug fixed. Replaying is safe to repeat: every agent recognises an event id it has applied,
and every sink writes a row once.

Letters from internal topics are not replayed: a deadline record finds its deadline cancelled
and does nothing, and tenant statuses and changelogs are state the workers write themselves.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from flexoraa.kafka import KeyPartitioner, acknowledged_producer, back_off_failed_metadata_updates
from flexoraa.settings import Settings
from schemas.events import DeadLetter
from schemas.topics import TopicNames

# Records asked of the broker per read (a dead letter is a few kilobytes at most).
_READ_BATCH = 1000


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

    def matches(self, letter: DeadLetter, names: TopicNames) -> bool:
        if self.since is not None and letter.dead_lettered_at < self.since:
            return False
        if self.until is not None and letter.dead_lettered_at >= self.until:
            return False
        if self.reason is not None and self.reason.lower() not in letter.reason.lower():
            return False
        if self.source is not None and letter.source_topic not in (
            self.source,
            f"{names.prefix}.{self.source}",
        ):
            return False
        return self.key is None or key_text(letter) == self.key


@dataclass(frozen=True)
class StoredLetter:
    """A dead letter and where it is on the dead-letter topic."""

    partition: int
    offset: int
    letter: DeadLetter


def key_text(letter: DeadLetter) -> str | None:
    key = decoded_key(letter)
    return key.decode(errors="replace") if key is not None else None


def decoded_key(letter: DeadLetter) -> bytes | None:
    return base64.b64decode(letter.key_base64) if letter.key_base64 is not None else None


async def read_letters(
    settings: Settings, letter_filter: LetterFilter
) -> AsyncIterator[StoredLetter]:
    """The dead letters matching `letter_filter`, up to the end of the topic when called, in
    offset order per partition. A record that is no dead letter is left out."""
    names = TopicNames(settings.topic_prefix)
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
        starts = await _start_offsets(consumer, partitions, letter_filter.since)
        # Known offsets, not `seek_to_beginning` and then `position`: that found nothing left to
        # read in 2 of 8 runs against a topic holding two letters, and the letters were missed.
        for tp, offset in starts.items():
            consumer.seek(tp, offset)
        remaining = {tp for tp, end in ends.items() if starts[tp] < end}
        while remaining:
            fetched = await consumer.getmany(*remaining, timeout_ms=500, max_records=_READ_BATCH)
            for tp, records in fetched.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        break
                    letter = _decoded(record.value)
                    if letter is not None and letter_filter.matches(letter, names):
                        yield StoredLetter(tp.partition, record.offset, letter)
            remaining = {tp for tp in remaining if await consumer.position(tp) < ends[tp]}
    finally:
        await consumer.stop()


async def _start_offsets(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition], since: datetime | None
) -> dict[TopicPartition, int]:
    """Where each partition's matching letters can start: its first offset, or the first
    record produced at or after `since` (a letter is produced just after its
    `dead_lettered_at`)."""
    first: dict[TopicPartition, int] = await consumer.beginning_offsets(partitions)
    if since is None:
        return first
    since_ms = int(since.timestamp() * 1000)
    found = await consumer.offsets_for_times({tp: since_ms for tp in partitions})
    ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
    return {tp: at.offset if at is not None else ends[tp] for tp, at in found.items()}


def _decoded(value: bytes | None) -> DeadLetter | None:
    if value is None:
        return None
    try:
        return DeadLetter.model_validate_json(value)
    except ValidationError:
        return None


@dataclass
class ReplayReport:
    """What a replay put back, by topic, and what it left, by why."""

    replayed: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"replayed": dict(self.replayed), "skipped": dict(self.skipped)}


def skip_reason(letter: DeadLetter, names: TopicNames) -> str | None:
    """Why `letter` cannot be put back, or None."""
    if letter.source_topic not in replayable_topics(names):
        return f"not replayable: {letter.source_topic}"
    try:
        base64.b64decode(letter.raw_base64, validate=True)
    except binascii.Error:
        return "raw bytes not base64"
    return None


async def replay(
    settings: Settings, letters: AsyncIterator[StoredLetter], *, dry_run: bool = False
) -> ReplayReport:
    """Produces each letter's raw bytes under its key to its source topic (a keyed topic's
    partition is the key's, as when the record was first produced); returns once Kafka
    acknowledged every one, failed ones counted under `skipped`. With `dry_run`, only counts."""
    names = TopicNames(settings.topic_prefix)
    report = ReplayReport()
    if dry_run:
        async for stored in letters:
            _count(report, stored.letter, skip_reason(stored.letter, names))
        return report
    producer = acknowledged_producer(settings, linger_ms=5, partitioner=KeyPartitioner())
    await producer.start()
    try:
        sending: list[tuple[DeadLetter, asyncio.Future[Any]]] = []
        async for stored in letters:
            letter = stored.letter
            reason = skip_reason(letter, names)
            if reason is not None:
                _count(report, letter, reason)
                continue
            raw = base64.b64decode(letter.raw_base64)
            delivery = await producer.send(letter.source_topic, raw, key=decoded_key(letter))
            sending.append((letter, delivery))
            if len(sending) >= _READ_BATCH:
                await _settle(report, sending)
        await _settle(report, sending)
    finally:
        await producer.stop()
    return report


def _count(report: ReplayReport, letter: DeadLetter, skipped: str | None) -> None:
    if skipped is None:
        report.replayed[letter.source_topic] += 1
    else:
        report.skipped[skipped] += 1


async def _settle(
    report: ReplayReport, sending: list[tuple[DeadLetter, asyncio.Future[Any]]]
) -> None:
    outcomes = await asyncio.gather(*(delivery for _, delivery in sending), return_exceptions=True)
    for (letter, _), outcome in zip(sending, outcomes, strict=True):
        failed = (
            f"not acknowledged: {type(outcome).__name__}"
            if isinstance(outcome, BaseException)
            else None
        )
        _count(report, letter, failed)
    sending.clear()
