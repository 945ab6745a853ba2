"""The sessions agent: one inbound message at a time into the sessions table."""

from __future__ import annotations

import time
from typing import Any

from faust.types import AppT, StreamT, TableT, TopicT
from pydantic import ValidationError

from schemas.events import InboundMessage
from streams.dead_letters import dead_letter_event, describe_validation_error
from streams.metrics import DUPLICATE_EVENTS, INBOUND_EVENTS
from streams.rules.session import apply_inbound
from streams.rules.window import window_deadlines
from streams.timers import Scheduler


def register(
    app: AppT,
    *,
    inbound: TopicT,
    dead_letters: TopicT,
    sessions: TableT[bytes, Any],
    scheduler: Scheduler,
    closing_notice_ms: int,
) -> None:
    @app.agent(inbound, name="sessions")
    async def apply_inbound_messages(stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            try:
                message = InboundMessage.model_validate_json(event.value)
            except ValidationError as exc:
                await dead_letter_event(
                    dead_letters, event, describe_validation_error(exc), "invalid_event"
                )
                continue
            lead_key = message.lead_id.encode()
            if event.key != lead_key:
                # A record on another lead's key would update state on a worker that does
                # not own the lead; refusing it keeps the tables co-partitioned.
                await dead_letter_event(
                    dead_letters, event, "record key is not the event's lead_id", "wrong_key"
                )
                continue
            updated = apply_inbound(
                sessions.get(lead_key),
                event_id=message.event_id,
                lead_id=message.lead_id,
                tenant_id=message.tenant_id,
                channel=message.channel,
                contact=message.contact,
                contact_name=message.contact_name,
                occurred_ms=int(message.occurred_at.timestamp() * 1000),
                account_id=message.channel_account_id,
            )
            if updated is None:
                DUPLICATE_EVENTS.labels("inbound").inc()
                # The window's deadlines are another table's write: a worker killed between
                # the two kept only the session, and the message read again restores them
                # (those still ahead; `set` writes nothing when they are there).
                session = sessions[lead_key]
                now_ms = int(time.time() * 1000)
                ahead = {
                    name: due_ms
                    for name, due_ms in window_deadlines(
                        session["channel"], session["last_customer_message_ms"], closing_notice_ms
                    ).items()
                    if due_ms > now_ms
                }
                scheduler.set(lead_key, ahead)
                continue
            sessions[lead_key] = updated
            # Each customer message moves the window's deadlines (if it is the latest one).
            scheduler.set(
                lead_key,
                window_deadlines(
                    updated["channel"], updated["last_customer_message_ms"], closing_notice_ms
                ),
            )
            INBOUND_EVENTS.labels(message.channel).inc()
