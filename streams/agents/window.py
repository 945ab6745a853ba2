"""Window deadlines: a "closing" notice before the 24-hour window ends and "expired" at its end."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from faust.types import TopicT

from schemas.messaging import DeadlineReached, LeadEvent
from streams.agents.deadlines import DeadlineHandler
from streams.rules.window import window_closes_at_ms


def handlers(lead_events: TopicT) -> dict[str, DeadlineHandler]:
    async def window_event(
        key: bytes, fired: DeadlineReached, session: dict[str, Any] | None
    ) -> None:
        if session is None:
            return
        closes_at_ms = window_closes_at_ms(session["last_customer_message_ms"])
        if fired.deadline == "window_closing" and closes_at_ms <= fired.fired_at.timestamp() * 1000:
            # Its message read after the window ended (Meta's retries after an outage): a
            # "closing" notice for a window closed already would say it is still open.
            return
        event = LeadEvent(
            event_id=fired.event_id,
            tenant_id=session["tenant_id"],
            occurred_at=fired.occurred_at,
            lead_id=fired.lead_id,
            type=fired.deadline,
            data={
                "channel": session["channel"],
                "closes_at": datetime.fromtimestamp(closes_at_ms / 1000, tz=UTC).isoformat(),
                "lateness_ms": int((fired.fired_at - fired.occurred_at).total_seconds() * 1000),
            },
        )
        await lead_events.send(key=key, value=event.model_dump_json().encode())

    return {"window_closing": window_event, "window_expired": window_event}
