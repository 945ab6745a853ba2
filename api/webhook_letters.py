"""Signed webhook content the API cannot read, kept on the dead-letter topic.

The sender signed it, so retrying would fail the same way: the webhook is acknowledged, and the
unreadable part is kept whole, with the reason, for `flexoraa dead-letters list --source
webhook:…`. It names no topic, so `replay` leaves it alone; once the parser is mended, the sender
can resend it (Meta's and Razorpay's dashboards both can).
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter

from schemas.events import WEBHOOK_SOURCE_PREFIX, DeadLetter

KIND = "malformed_webhook"

# outcome="malformed": content set aside here (the MalformedWebhooks alert).
WEBHOOK_RECORDS = Counter(
    "flexoraa_webhook_records", "Messages and statuses received by webhooks", ["channel", "outcome"]
)
# At zero from the start: the alert's increase() sees the first one (a series born at 1 did
# not count, and a one-off malformed payment webhook never alerted).
for _source in ("meta", "whatsapp_business_account", "instagram", "page", "razorpay"):
    WEBHOOK_RECORDS.labels(_source, "malformed")


def webhook_letter(source: str, raw: bytes, reason: str) -> bytes:
    """The dead-letter record of `raw`, a webhook's body or one item of it, from `source`."""
    letter = DeadLetter(
        source_topic=WEBHOOK_SOURCE_PREFIX + source,
        partition=None,
        offset=None,
        reason=reason[:500],
        raw_base64=base64.b64encode(raw).decode(),
        dead_lettered_at=datetime.now(UTC),
        kind=KIND,
        consumer=None,
    )
    return letter.model_dump_json().encode()


def item_bytes(item: Any) -> bytes:
    """An item of a parsed body, as JSON again (its own bytes are inside the signed body)."""
    # ASCII escapes: a lone surrogate (half an emoji) has no UTF-8 bytes, and encoding it
    # raised here, a 500 for the whole batch.
    return json.dumps(item, separators=(",", ":")).encode()
