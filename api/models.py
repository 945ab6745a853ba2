"""Request and response bodies of the public API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, SecretStr, field_validator

from schemas.events import MAX_TEXT_CHARS, Channel, EventTime


class RequestBody(BaseModel):
    """A request's body: no unknown field, no NUL in any text and no infinite number.
    PostgreSQL's text refuses
    NUL, so one let through here failed later: a 500, or a message accepted (202) whose row
    the sink could never write."""

    # No infinity or NaN either (JSON's 1e309 reads as infinity): no rule can use one, and
    # PostgreSQL's jsonb refuses it (the audit entry of a settings change: a 500).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str) and "\x00" in text:
            raise ValueError("must not contain NUL (\\u0000)")
        return value


class InboundMessageRequest(RequestBody):
    """A customer message from a channel connector that is not built in."""

    model_config = ConfigDict(extra="forbid")

    channel: Channel
    contact: str = Field(min_length=1, max_length=320, description="phone, e-mail or channel id")
    text: str = Field(max_length=MAX_TEXT_CHARS)
    # Within the times an event can carry: a 422 here, not a 500 building the event.
    occurred_at: EventTime | None = Field(
        None, description="when the customer sent it (ISO 8601 with a time zone); default now"
    )
    channel_message_id: str | None = Field(
        None, min_length=1, max_length=256, description="the channel's id; repeats are ignored"
    )
    contact_name: str | None = Field(None, max_length=200)


class InboundAccepted(BaseModel):
    event_id: str
    lead_id: str


class WindowView(BaseModel):
    applies: bool = Field(description="whether the channel has a 24-hour customer-service window")
    open: bool
    closes_at: datetime | None


class QualificationView(BaseModel):
    status: str
    turn: int
    facts: dict[str, Any]
    score: float
    escalated: bool
    sdr_id: str | None


class QualificationStepView(BaseModel):
    turn: int
    status: str
    facts: dict[str, Any]
    score: float
    sdr_id: str | None
    source: str = Field(description="model or builtin")
    occurred_at: datetime


class LeadView(BaseModel):
    lead_id: str
    channel: str
    contact: str
    contact_name: str | None
    first_message_at: datetime
    last_customer_message_at: datetime
    message_count: int
    window: WindowView
    qualification: QualificationView | None = None
    ai_actions_waiting_for_tokens: int = Field(
        0, description="AI actions for this lead kept until the tenant's tokens are topped up"
    )


class LeadSummary(BaseModel):
    lead_id: str
    channel: str
    contact: str
    contact_name: str | None
    first_seen_at: datetime
    last_activity_at: datetime


class LeadPage(BaseModel):
    items: list[LeadSummary]
    next_cursor: str | None


class MessageView(BaseModel):
    event_id: str
    direction: str
    channel: str
    message_type: str
    text: str
    channel_message_id: str | None
    occurred_at: datetime
    send_kind: str | None = Field(None, description="outbound: freeform or template")
    sent_by: str | None = Field(None, description="outbound: sdr or ai")
    status: str | None = Field(
        None, description="outbound: accepted/failed, then sent/delivered/read/failed"
    )
    status_at: datetime | None = None
    error_code: str | None = None
    error: str | None = None


class SendRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=4096)
    send_at: AwareDatetime | None = Field(
        None, description="schedule for later (ISO 8601 with a time zone); default: now"
    )


class CloseRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")

    outcome: Literal["won", "lost", "disqualified"]


class LeadClosed(BaseModel):
    lead_id: str
    sdr_id: str
    outcome: str
    closed_at: datetime


class SendAccepted(BaseModel):
    command_id: str
    lead_id: str
    send_at: datetime | None = None


class ScheduledMessageView(BaseModel):
    scheduled_id: str
    lead_id: str
    text: str
    send_at: datetime
    status: str = Field(description="scheduled, sent, failed or cancelled")
    error: str | None
    created_at: datetime


class MessagePage(BaseModel):
    items: list[MessageView]
    next_cursor: str | None
