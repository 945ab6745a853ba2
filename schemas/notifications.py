"""Notifications: alerts for a tenant's admins or one SDR, in-app and by e-mail.

Any agent produces a `Notification` on the notifications topic (keyed by tenant id); the
notifications agent stores it in PostgreSQL (`notifications`, the in-app inbox) and e-mails it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from schemas.events import Event

Audience = Literal["admins", "sdr"]
BODY_MAX_CHARS = 4000
Delivery = Literal["in_app", "email"]


class Notification(Event):
    kind: Literal["notification"] = "notification"
    audience: Audience
    # The SDR's id when audience == "sdr"; admins are the tenant's `tenant_admins`.
    sdr_id: str | None = None
    category: str = Field(min_length=1, max_length=64, description="e.g. token_threshold")
    title: str = Field(min_length=1, max_length=200)
    body: str = Field(max_length=BODY_MAX_CHARS)
    data: dict[str, Any] = Field(default_factory=dict)
    deliveries: tuple[Delivery, ...] = ("in_app", "email")


def clipped_body(text: str) -> str:
    """`text` cut to fit a notification's body: one made of what a lead wrote (a "budget" of
    thousands of digits) must not fail the agent that alerts about it."""
    return text if len(text) <= BODY_MAX_CHARS else text[: BODY_MAX_CHARS - 1] + "…"
