"""Dead letters: an undecodable or rejected record is kept with the reason and its raw bytes."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from faust.types import EventT, TopicT
from pydantic import BaseModel, ValidationError

from schemas.events import DeadLetter, InboundMessage
from streams.batches import SourceRecord, current_handler, replayed_for
from streams.metrics import DEAD_LETTERS


def describe_validation_error(exc: ValidationError) -> str:
    """A one-line reason naming each failing field, short enough for a log line."""
    parts = []
    for error in exc.errors()[:5]:
        location = ".".join(str(part) for part in error["loc"]) or "record"
        parts.append(f"{location}: {error['msg']}")
    return "invalid event: " + "; ".join(parts)


def for_replay_to(kind: str) -> str | None:
    """The handler a replay of a letter set aside now is for: the lane handler running, which
    took the record while the topic's other readers took it too; None, every reader, for an
    undecodable record (none of them took it) or outside the lane (a Faust agent, its topic's
    one reader)."""
    return None if kind == "invalid_event" else current_handler.get()


async def send_dead_letter(
    topic: TopicT,
    *,
    source_topic: str,
    partition: int | None,
    offset: int | None,
    key: bytes | None,
    raw: bytes,
    reason: str,
    kind: str,
    consumer: str | None,
) -> None:
    """`consumer`: the handler a replay of the letter is for (`for_replay_to`)."""
    letter = DeadLetter(
        source_topic=source_topic,
        partition=partition,
        offset=offset,
        reason=reason,
        raw_base64=base64.b64encode(raw).decode(),
        key_base64=base64.b64encode(key).decode() if key is not None else None,
        dead_lettered_at=datetime.now(UTC),
        kind=kind,
        consumer=consumer,
    )
    await topic.send(key=key, value=letter.model_dump_json().encode())
    DEAD_LETTERS.labels(kind).inc()


async def dead_letter_record(
    topic: TopicT,
    record: SourceRecord,
    reason: str,
    kind: str,
    *,
    raw: bytes | None = None,
    key: bytes | None = None,
    source_topic: str | None = None,
) -> None:
    """Dead-letters `record`, or only `raw`, the part of it that failed, under that part's own
    `key` if given; a part read from another topic (a scheduled command held until its
    deadline) names it as `source_topic`, without the record's partition and offset."""
    record_key = record.key if isinstance(record.key, bytes) else None
    # A replayed record failing again stays its handler's: the topic's others took it once.
    target = replayed_for(record)
    record_value = record.value if isinstance(record.value, bytes) else b""
    elsewhere = source_topic is not None and source_topic != record.topic
    await send_dead_letter(
        topic,
        source_topic=source_topic if source_topic is not None else record.topic,
        partition=None if elsewhere else record.partition,
        offset=None if elsewhere else record.offset,
        key=key if key is not None else record_key,
        raw=raw if raw is not None else record_value,
        reason=reason,
        kind=kind,
        consumer=target if target is not None else for_replay_to(kind),
    )


T = TypeVar("T")


async def decode_or_dead_letter(
    decode: Callable[[bytes], T], record: SourceRecord, dead_letters: TopicT
) -> T | None:
    """`decode(record.value)`; None once an undecodable record is dead-lettered (for the one
    agent of a topic that reports bad records)."""
    try:
        return decode(record.value)
    except ValidationError as exc:
        await dead_letter_record(
            dead_letters, record, describe_validation_error(exc), "invalid_event"
        )
        return None


async def dead_letter_event(topic: TopicT, event: EventT[bytes], reason: str, kind: str) -> None:
    await dead_letter_record(topic, event.message, reason, kind)


M = TypeVar("M", bound=BaseModel)


def decoded_record(record: SourceRecord, model: type[M]) -> M | None:
    """The record as `model`, or None if it is undecodable (for handlers sharing a topic with
    one that dead-letters bad records).

    Raised instead for a replay addressed to the handler running: the topic's other readers
    skip it, so nobody else would set it aside, and the guard of the handler dead-letters it
    again, still its handler's, instead of it being dropped without a word."""
    try:
        return model.model_validate_json(record.value)
    except ValidationError:
        if replayed_for(record) is not None:
            raise
        return None


def decoded_inbound(record: SourceRecord) -> InboundMessage | None:
    """`decoded_record` as an inbound message, and None too for one under another key than its
    lead's: the sessions handler dead-letters those, and state written for one landed on a
    partition that does not own the lead (a wait no session's worker fired, every tick)."""
    message = decoded_record(record, InboundMessage)
    if message is None or record.key != message.lead_id.encode():
        return None
    return message
