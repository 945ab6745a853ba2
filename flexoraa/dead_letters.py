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
- each replayed letter is marked on a topic of its own (`ReplayedLetter`), and a
  later replay leaves it, and the letters of the same record, alone unless asked `again`: a
  handler that does not recognise a repeated event would act on it twice. A record failing
  again is a new letter for the same handler, to replay once mended;
- a letter of an older worker, which does not name its handler, is put back only when asked
  (`to_all_readers`): it would reach every reader of its topic;
- letters from internal topics are not replayed (a deadline record finds its deadline
  cancelled and does nothing; tenant statuses and changelogs are state the workers write),
  nor records under a key they were refused for (`wrong_key`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import heapq
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from flexoraa.kafka import KeyPartitioner, acknowledged_producer, back_off_failed_metadata_updates
from flexoraa.settings import Settings
from schemas.events import REPLAY_FOR_HEADER, DeadLetter, ReplayedLetter
from schemas.topics import TopicNames

# Records asked of the broker per read (a dead letter is a few kilobytes at most).
_READ_BATCH = 1000
# A partition that returns nothing this long while records are left is unreadable (its leader
# is gone): said, not waited on forever.
READ_STALL_S = 30.0


class MissingTopic(RuntimeError):
    """A topic the replay needs does not exist."""


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


# How far out of order a partition's letters may arrive: several workers and API processes,
# each on its own clock, write to one partition, and a send retried after an outage lands
# after letters set aside later.
SET_ASIDE_SKEW = timedelta(minutes=5)


def _aware(at: datetime) -> datetime:
    """A letter's time with a zone (letters of older versions may have none: UTC)."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


async def read_letters(
    settings: Settings, letter_filter: LetterFilter, limit: int | None = None
) -> list[StoredLetter]:
    """The dead letters matching `letter_filter`, up to the end of the topic when called, in
    offset order per partition, each with when it was replayed, if it was.

    With `limit`, the `limit` oldest of them (by when they were set aside), oldest first. A
    partition's letters come about in the order they were set aside (within SET_ASIDE_SKEW),
    so a partition is read only until its letters are that far past the `limit`-th oldest
    found so far, not to its end: a month of letters is not read to print a few."""
    names = TopicNames(settings.topic_prefix)
    matched: list[StoredLetter] = []
    # The `limit` oldest times matched so far, negated: the latest of them on top.
    oldest: list[float] = []
    latest_read: dict[int, datetime] = {}
    replayed: dict[tuple[int, int, datetime], datetime] = {}

    def take(topic: str, partition: int, offset: int, value: bytes | None) -> None:
        if value is None:
            return
        if topic == names.dead_letters_replayed:
            with contextlib.suppress(ValidationError):
                mark = ReplayedLetter.model_validate_json(value)
                position = (mark.replayed_partition, mark.replayed_offset, mark.dead_lettered_at)
                replayed[position] = mark.replayed_at
            return
        try:
            letter = DeadLetter.model_validate_json(value)
        except ValidationError:
            return
        at = _aware(letter.dead_lettered_at)
        latest_read[partition] = max(at, latest_read.get(partition, at))
        if letter_filter.matches(letter, names):
            matched.append(StoredLetter(partition, offset, letter))
            if limit is not None:
                heapq.heappush(oldest, -at.timestamp())
                if len(oldest) > limit:
                    heapq.heappop(oldest)

    def enough(tp: TopicPartition) -> bool:
        # The marks are read whole: any letter listed may have one.
        if limit is None or tp.topic != names.dead_letters or len(oldest) < limit:
            return False
        latest = latest_read.get(tp.partition)
        past = -oldest[0] + SET_ASIDE_SKEW.total_seconds()
        return latest is not None and latest.timestamp() > past

    await _read_to_end(
        settings,
        {names.dead_letters: letter_filter.since, names.dead_letters_replayed: None},
        take,
        enough,
    )
    if limit is not None:
        matched.sort(key=lambda s: (_aware(s.letter.dead_lettered_at), s.partition, s.offset))
        matched = matched[:limit]
    return [
        StoredLetter(s.partition, s.offset, s.letter,
                     replayed.get((s.partition, s.offset, s.letter.dead_lettered_at)))
        for s in matched
    ]  # fmt: skip


async def _read_to_end(
    settings: Settings,
    topics: dict[str, datetime | None],
    take: Callable[[str, int, int, bytes | None], None],
    enough: Callable[[TopicPartition], bool] = lambda tp: False,
) -> None:
    """Every record of `topics` (each from its first record, or from the first produced at or
    after its time) up to their ends when called, to `take`, in offset order per partition;
    a partition is left as soon as `enough` says so."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        # A start that retention deleted meanwhile: the records after it, not the topic's end.
        auto_offset_reset="earliest",
    )
    back_off_failed_metadata_updates(consumer._client)
    await consumer.start()
    try:
        # A topic an upgrade added and `flexoraa topics create` did not make yet (the marks')
        # has nothing to read; asked for, its offsets would time out after 40 s.
        existing = await consumer.topics()
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            if topic in existing
            for p in range(settings.kafka_partitions)
        ]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        starts = await _start_offsets(consumer, partitions, ends, topics)
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
                    if record.offset >= ends[tp] or enough(tp):
                        break
                    take(tp.topic, tp.partition, record.offset, record.value)
            remaining = {
                tp for tp in remaining if not enough(tp) and await consumer.position(tp) < ends[tp]
            }
            if remaining and time.monotonic() - progressed_at > READ_STALL_S:
                unread = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(remaining))
                raise TimeoutError(f"unreadable: {unread}")
    finally:
        await consumer.stop()


async def _start_offsets(
    consumer: AIOKafkaConsumer,
    partitions: list[TopicPartition],
    ends: dict[TopicPartition, int],
    since: dict[str, datetime | None],
) -> dict[TopicPartition, int]:
    """Where each partition's records of interest start: its first offset, or the first record
    produced at or after its topic's time (a letter is produced just after its
    `dead_lettered_at`)."""
    starts: dict[TopicPartition, int] = await consumer.beginning_offsets(partitions)
    timed = {tp: since[tp.topic] for tp in partitions if since[tp.topic] is not None}
    if timed:
        found = await consumer.offsets_for_times(
            {tp: int(at.timestamp() * 1000) for tp, at in timed.items() if at is not None}
        )
        starts |= {tp: at.offset if at is not None else ends[tp] for tp, at in found.items()}
    return starts


@dataclass
class ReplayReport:
    """What a replay put back, by topic, what it left, by why, and letters put back whose
    mark could not be written (a later replay would put them back again)."""

    replayed: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    unmarked: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"replayed": dict(self.replayed), "skipped": dict(self.skipped),
                "unmarked": self.unmarked}  # fmt: skip

    @property
    def failed(self) -> bool:
        return self.unmarked > 0 or any(why.startswith("not sent") for why in self.skipped)


def skip_reason(
    letter: DeadLetter, names: TopicNames, *, to_all_readers: bool = False
) -> str | None:
    """Why `letter` cannot be put back, or None."""
    if letter.source_topic not in replayable_topics(names):
        return f"not replayable: {letter.source_topic}"
    if letter.kind == "wrong_key" or letter.reason.startswith("record key is not"):
        return "refused for its key"
    if letter.kind is None and not letter.reason.startswith("invalid event") and not to_all_readers:
        # An older worker's letter does not say which handler set it aside: put back, it would
        # reach every reader of its topic, and those that took it the first time act again.
        return "handler not named (an older worker's letter; --to-all-readers)"
    try:
        base64.b64decode(letter.raw_base64, validate=True)
    except binascii.Error:
        return "raw bytes not base64"
    return None


def _replayed_before(copies: list[StoredLetter]) -> bool:
    """Whether the record was put back after every copy of it was set aside: a copy set aside
    later (the replay failed again, before the fix reached every worker) goes back."""
    marks = [stored.replayed_at for stored in copies if stored.replayed_at is not None]
    return bool(marks) and all(
        stored.letter.dead_lettered_at <= max(marks)
        for stored in copies
        if stored.replayed_at is None
    )


def _command_id(letter: DeadLetter) -> str | None:
    """The id of the outbound command a letter holds (a scheduled message's id too)."""
    try:
        command = orjson.loads(base64.b64decode(letter.raw_base64))
    except (ValueError, binascii.Error):
        return None
    if not isinstance(command, dict) or command.get("kind") != "outbound_command":
        return None
    event_id = command.get("event_id")
    try:
        return str(uuid.UUID(event_id)) if isinstance(event_id, str) else None
    except ValueError:
        return None


async def cancelled_scheduled_messages(settings: Settings, letters: list[DeadLetter]) -> set[str]:
    """The scheduled messages among `letters`' commands that were cancelled (`DELETE
    /api/scheduled-messages/{id}`) after they were set aside. The worker remembers a cancel
    too, but only among a lead's last ids; the database's status is for good."""
    commands = [command_id for letter in letters if (command_id := _command_id(letter)) is not None]
    if not commands:
        return set()
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT scheduled_id::text FROM scheduled_messages"
            " WHERE scheduled_id = ANY($1::uuid[]) AND status = 'cancelled'",
            commands,
        )
    finally:
        await conn.close()
    return {row["scheduled_id"] for row in rows}


def _identity(letter: DeadLetter) -> tuple[str, str | None, str, str | None]:
    """Letters of one record for one handler (set aside again after a restart, or replayed
    and failing again)."""
    return (letter.source_topic, letter.key_base64, letter.raw_base64, letter.consumer)


def _charges_tokens(topic: str, names: TopicNames) -> bool:
    """Whether a record of `topic` put back can charge or credit tokens: its AI actions and
    token events are recognised by id only for TOKEN_SEEN_KEPT_DAYS."""
    return topic in {names.inbound_messages, names.token_usage, names.token_credits}


async def replay(
    settings: Settings, letters: list[StoredLetter], *, dry_run: bool = False,
    again: bool = False, to_all_readers: bool = False, past_token_dedup: bool = False,
) -> ReplayReport:  # fmt: skip
    """Produces each letter's raw bytes under its key to its source topic, for the handler that
    set it aside if one did (a keyed topic's partition is the key's, as when the record was
    first produced), then marks it replayed; returns once Kafka acknowledged every record and
    mark, failed ones counted under `skipped`. Identical letters are one record: put back
    once, all marked, and none again once one is marked (unless `again`). With `dry_run`,
    only counts."""
    names = TopicNames(settings.topic_prefix)
    report = ReplayReport()
    copies: dict[tuple[str, str | None, str, str | None], list[StoredLetter]] = {}
    # Older, a letter whose handling charged before it failed (a qualification step) was
    # charged again: the workers had forgotten the usage's id (letters are kept 30 days).
    dedup_from = datetime.now(UTC) - timedelta(days=settings.token_seen_kept_days)
    for stored in letters:
        reason = skip_reason(stored.letter, names, to_all_readers=to_all_readers)
        if (
            reason is None
            and not past_token_dedup
            and stored.letter.dead_lettered_at < dedup_from
            and _charges_tokens(stored.letter.source_topic, names)
        ):
            reason = (
                "older than TOKEN_SEEN_KEPT_DAYS: tokens could be charged or credited twice "
                "(--past-token-dedup)"
            )
        if reason is not None:
            report.skipped[reason] += 1
        else:
            copies.setdefault(_identity(stored.letter), []).append(stored)
    chosen: list[list[StoredLetter]] = []
    cancelled = await cancelled_scheduled_messages(settings, [g[0].letter for g in copies.values()])
    for group in copies.values():
        if not again and _replayed_before(group):
            report.skipped["replayed before"] += len(group)
            continue
        if _command_id(group[0].letter) in cancelled:
            report.skipped["a scheduled message cancelled since"] += len(group)
            continue
        report.skipped["same record as another letter"] += len(group) - 1
        chosen.append(group)
    if not report.skipped["same record as another letter"]:
        del report.skipped["same record as another letter"]
    if dry_run:
        report.replayed.update(group[0].letter.source_topic for group in chosen)
        return report
    producer = acknowledged_producer(settings, linger_ms=5, partitioner=KeyPartitioner())
    await producer.start()
    try:
        cluster = await producer.client.fetch_all_metadata()
        if names.dead_letters_replayed not in cluster.topics():
            # Put back unmarked, they would be put back again by the next replay.
            raise MissingTopic(
                f"{names.dead_letters_replayed} does not exist: run `flexoraa topics create`"
            )
        for start in range(0, len(chosen), _READ_BATCH):
            await _replay_slice(producer, names, chosen[start : start + _READ_BATCH], report)
    finally:
        await producer.stop()
    return report


async def _replay_slice(
    producer: Any, names: TopicNames, groups: list[list[StoredLetter]], report: ReplayReport
) -> None:
    sent = await asyncio.gather(*(_put_back(producer, g[0]) for g in groups),
                                return_exceptions=True)  # fmt: skip
    marks = []
    for group, outcome in zip(groups, sent, strict=True):
        if isinstance(outcome, BaseException):
            report.skipped[f"not sent: {type(outcome).__name__}"] += len(group)
            continue
        report.replayed[group[0].letter.source_topic] += 1
        replayed_at = datetime.now(UTC)
        for stored in group:
            mark = ReplayedLetter(
                replayed_partition=stored.partition,
                replayed_offset=stored.offset,
                dead_lettered_at=stored.letter.dead_lettered_at,
                replayed_at=replayed_at,
            )
            marks.append(producer.send_and_wait(
                names.dead_letters_replayed, mark.model_dump_json().encode(),
                key=f"{stored.partition}:{stored.offset}".encode(),
            ))  # fmt: skip
    outcomes = await asyncio.gather(*marks, return_exceptions=True)
    report.unmarked += sum(isinstance(outcome, BaseException) for outcome in outcomes)


async def _put_back(producer: Any, stored: StoredLetter) -> None:
    letter = stored.letter
    headers = [(REPLAY_FOR_HEADER, letter.consumer.encode())] if letter.consumer else None
    await producer.send_and_wait(
        letter.source_topic,
        base64.b64decode(letter.raw_base64),
        key=decoded_key(letter),
        headers=headers,
    )
