"""Outbound commands and messages, delivery statuses, lead events and timer commands."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import MAX_TEXT_CHARS, Event, EventTime

Sender = Literal["sdr", "ai"]
DeliveryState = Literal["sent", "delivered", "read", "failed"]


class OutboundCommand(Event):
    """ "Send this to the lead": an SDR's reply or an AI action. Keyed by lead."""

    kind: Literal["outbound_command"] = "outbound_command"
    lead_id: str
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    sent_by: Sender = "sdr"
    purpose: str = Field("reply", max_length=64, description="reply, re-engagement, recovery…")
    # Scheduled messages: held by the outbound agent until send_at, on the timer mechanism.
    send_at: EventTime | None = None
    # WhatsApp's approved template only, whatever the window: a free-form message Meta took
    # and failed later with 131047 (the window was closed by its clock) is sent again so.
    # Left out of the JSON when false: workers of the version before it refuse unknown fields,
    # and during a rolling deploy they would have dead-lettered every command.
    template_only: bool = Field(False, exclude_if=lambda value: not value)


class ResendAsTemplate(Event):
    """Send the free-form message Meta knows as `channel_message_id` again as the template: it
    reported the message failed (131047) after taking it. Keyed by lead, on the commands'
    topic: the outbound agent, which may wait, finds the message and sends it."""

    kind: Literal["resend_as_template"] = "resend_as_template"
    lead_id: str
    channel: str
    channel_message_id: str = Field(min_length=1, max_length=256)


class CancelScheduled(Event):
    """Cancel a scheduled message that has not gone out yet. Keyed by lead."""

    kind: Literal["cancel_scheduled"] = "cancel_scheduled"
    lead_id: str
    command_id: str


class OutboundMessage(Event):
    """What one send attempt did: accepted by the channel (with its id) or failed."""

    kind: Literal["outbound_message"] = "outbound_message"
    lead_id: str
    command_id: str
    attempt: int = Field(ge=1)
    channel: str
    send_kind: Literal["freeform", "template"] | None
    status: Literal["accepted", "retrying", "failed"]
    channel_message_id: str | None = None
    text: str
    sent_by: Sender
    error_code: str | None = None
    error_message: str | None = Field(None, max_length=1000)


class DeliveryStatus(Event):
    """A channel's report on a message it sent. Keyed by lead."""

    kind: Literal["delivery_status"] = "delivery_status"
    lead_id: str
    channel: str
    channel_message_id: str
    status: DeliveryState
    error_code: str | None = None
    error_title: str | None = Field(None, max_length=500)


class LeadEvent(Event):
    """Something that happened to a lead: window closing/expired, later qualification etc."""

    kind: Literal["lead_event"] = "lead_event"
    lead_id: str
    type: str = Field(min_length=1, max_length=64)
    data: dict[str, Any] = Field(default_factory=dict)


class DeadlineReached(Event):
    """Internal: a worker's timer found a lead's deadline due. Keyed by lead, co-partitioned."""

    kind: Literal["deadline_reached"] = "deadline_reached"
    lead_id: str
    deadline: str
    due_ms: int
    fired_at: EventTime


class DeadlinesReached(BaseModel):
    """Internal: the deadlines one timer tick found due for the leads of one partition, sent to
    that partition as one record (a leak storm is hundreds of deadlines a second, and a record
    per lead cost a produce and a consume each)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["deadlines_reached"] = "deadlines_reached"
    partition: int = Field(ge=0)
    deadlines: list[DeadlineReached] = Field(min_length=1)
