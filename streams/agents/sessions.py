"""The sessions agent: one inbound message at a time into the sessions table (on the batch
lane: it reads the inbound topic's fetches record by record, as do the other inbound agents)."""

from __future__ import annotations

import time
from typing import Any

from faust.types import TableT, TopicT

from schemas.events import InboundMessage
from streams.batches import BatchLane, SourceRecord
from streams.dead_letters import dead_letter_record, decode_or_dead_letter
from streams.metrics import DUPLICATE_EVENTS, INBOUND_EVENTS
from streams.rules.session import apply_inbound
from streams.rules.window import window_deadlines
from streams.timers import Scheduler


def register(
    lane: BatchLane,
    *,
    inbound: TopicT,
    dead_letters: TopicT,
    sessions: TableT[bytes, Any],
    scheduler: Scheduler,
    closing_notice_ms: int,
    max_batch: int,
) -> None:
    async def apply_inbound_message(record: SourceRecord) -> None:
        message = await decode_or_dead_letter(
            InboundMessage.model_validate_json, record, dead_letters
        )
        if message is None:
            return
        lead_key = message.lead_id.encode()
        if record.key != lead_key:
            # A record on another lead's key would update state on a worker that does
            # not own the lead; refusing it keeps the tables co-partitioned.
            await dead_letter_record(
                dead_letters, record, "record key is not the event's lead_id", "wrong_key"
            )
            return
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
            return
        sessions[lead_key] = updated
        # Each customer message moves the window's deadlines (if it is the latest one).
        scheduler.set(
            lead_key,
            window_deadlines(
                updated["channel"], updated["last_customer_message_ms"], closing_notice_ms
            ),
        )
        INBOUND_EVENTS.labels(message.channel).inc()

    lane.add_record_handler("sessions", [inbound], apply_inbound_message, max_batch=max_batch)
