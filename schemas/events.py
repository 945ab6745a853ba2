"""Events carried on the topics.

Every event has `event_id` (unique; effects are deduplicated on it), `tenant_id` and
`occurred_at` (event time, UTC). Models are strict and frozen: an event that does not validate is
a dead letter, never a half-read record.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

Channel = Literal["whatsapp", "email", "instagram", "facebook", "sms", "webchat"]
CHANNELS: tuple[str, ...] = ("whatsapp", "email", "instagram", "facebook", "sms", "webchat")

MAX_TEXT_CHARS = 16_384
MAX_NAME_CHARS = 200

# Times an event can carry. Rules add days and months to them (deadlines, the extractor's "by
# January", a minute's window), and an event of year 1 or 9999 overflowed Python's datetime
# inside an agent or a timer, at every restart; Kafka's timestamps start at 1970 anyway.
EARLIEST_EVENT_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_EVENT_TIME = datetime(2200, 1, 1, tzinfo=UTC)


def is_supported_time(value: datetime) -> bool:
    return EARLIEST_EVENT_TIME <= value < LATEST_EVENT_TIME


# Pydantic's own bounds, not an AfterValidator: a Python call per time field cost 0.9 us of
# the 2 us an event's time took to validate, and a worker validates a dozen per message.
EventTime = Annotated[AwareDatetime, Field(ge=EARLIEST_EVENT_TIME, lt=LATEST_EVENT_TIME)]


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: str = Field(min_length=1, max_length=64)
    tenant_id: str = Field(min_length=1, max_length=64)
    occurred_at: EventTime


class InboundMessage(Event):
    """A customer's message from any channel, normalised."""

    kind: Literal["inbound_message"] = "inbound_message"
    lead_id: str = Field(min_length=1, max_length=64)
    channel: Channel
    contact: str = Field(min_length=1, max_length=320)
    contact_name: str | None = Field(None, max_length=MAX_NAME_CHARS)
    text: str = Field(max_length=MAX_TEXT_CHARS)
    message_type: str = Field("text", max_length=32)
    channel_message_id: str | None = Field(None, max_length=256)
    # The business account that received it: WhatsApp phone_number_id, Instagram or page id.
    channel_account_id: str | None = Field(None, max_length=64)
    received_at: EventTime


class DeadLetter(BaseModel):
    """An undecodable or rejected record, kept with the reason and its raw bytes."""

    model_config = ConfigDict(frozen=True)

    source_topic: str
    partition: int | None
    offset: int | None
    reason: str
    raw_base64: str
    key_base64: str | None = None
    dead_lettered_at: datetime
    # Why, as counted in flexoraa_dead_letters_total: invalid_event, processing_failed, …
    kind: str | None = None
    # The handler that set the record aside while the topic's other readers took it: a replay
    # is for it alone (`REPLAY_FOR_HEADER`). None: every reader, none of which took it.
    consumer: str | None = None


# The source of a dead letter the API set aside from a signed webhook (no topic's record).
WEBHOOK_SOURCE_PREFIX = "webhook:"


def is_webhook_source(source_topic: str) -> bool:
    return source_topic.startswith(WEBHOOK_SOURCE_PREFIX)


class ReplayedLetter(BaseModel):
    """Written to the marks topic once the letter at (partition, offset) is replayed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    replayed_partition: int
    replayed_offset: int
    # The letter's own time: a dead-letter topic deleted and made again reuses its positions.
    dead_lettered_at: datetime
    replayed_at: datetime


# A replayed record's header naming the one handler it is for (`DeadLetter.consumer`); the
# topic's other readers already took the record and skip it.
REPLAY_FOR_HEADER = "flexoraa-replay-for"
