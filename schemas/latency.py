"""Latency events: one per measured operation, the input of the SLA windows."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field

from schemas.events import Event

# The longest duration an event can carry: a year (routing runs from a lead's first message to
# its SDR, which can take weeks). An infinite or enormous one overflowed the minute's sketch, or
# its sum, and stopped the SLA agent or its timer at every restart.
MAX_DURATION_MS = 366 * 24 * 3600 * 1000.0

# The tenant of platform-wide work (the prober, a request before authentication).
NO_TENANT = "-"

# ai_message: a model call; verification: a webhook signature or payment check; routing: first
# inbound message to SDR assigned; outbound_send: a channel send; api_request: an API request.
Operation = Literal["ai_message", "verification", "routing", "outbound_send", "api_request"]


# A UUID's canonical text (what `str(uuid.UUID(...))` gives), or `NO_TENANT`. Only canonical
# text: the SLA windows are keyed by this string, and two spellings of one UUID would split a
# tenant's windows (and its violations) in two. A pattern pydantic checks in Rust, not a
# Python validator parsing a UUID for every latency event.
_CANONICAL_UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
TENANT_REF_PATTERN = rf"^(?:{re.escape(NO_TENANT)}|{_CANONICAL_UUID})$"
_TENANT_REF = re.compile(TENANT_REF_PATTERN)


def is_tenant_ref(value: str) -> bool:
    """A tenant id as every producer writes it (a UUID's canonical text), or `NO_TENANT`."""
    return _TENANT_REF.fullmatch(value) is not None


class LatencyEvent(Event):
    """Keyed by operation on the latency topic; `tenant_id` is `NO_TENANT` for platform-wide
    work.

    The tenant id becomes SLA window keys and a violation's alert recipient, so anything but a
    tenant's UUID is refused at decoding (a dead letter), not found out at the alert's store."""

    kind: Literal["latency"] = "latency"
    tenant_id: str = Field(pattern=TENANT_REF_PATTERN)
    operation: Operation
    duration_ms: float = Field(ge=0, le=MAX_DURATION_MS, allow_inf_nan=False)
    outcome: Literal["ok", "error"]
    detail: str | None = Field(None, max_length=200)
