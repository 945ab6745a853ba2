"""Latency events: one per measured operation, the input of the SLA windows."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.events import Event

# ai_message: a model call; verification: a webhook signature or payment check; routing: first
# inbound message to SDR assigned; outbound_send: a channel send; api_request: an API request.
Operation = Literal["ai_message", "verification", "routing", "outbound_send", "api_request"]


class LatencyEvent(Event):
    """Keyed by operation on the latency topic; `tenant_id` is "" for platform-wide work."""

    kind: Literal["latency"] = "latency"
    operation: Operation
    duration_ms: float = Field(ge=0)
    outcome: Literal["ok", "error"]
    detail: str | None = Field(None, max_length=200)
