"""Leakage timers: an unanswered customer message becomes a leak when its deadline passes.

The leakage table holds, per lead, the first unanswered message time; its "leak" deadline
lives in the deadlines table (streams.timers). A reply (an accepted outbound message, SDR or
AI) ends the wait, leaving the reply's time, and cancels the deadline; the deadline handler
decides temperature and action.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

from faust.types import TableT, TopicT

from connectors.sdrs import SdrRouter
from connectors.tenants import TenantSettings
from flexoraa.db import while_unreachable
from schemas.ids import name_based_id
from schemas.messaging import DeadlineReached, LeadEvent, OutboundCommand, OutboundMessage
from schemas.notifications import Notification
from streams.agents.deadlines import DeadLettered, DeadlineHandler
from streams.agents.tokens import AiGate, Meter
from streams.batches import BatchLane, SourceRecord
from streams.dead_letters import decoded_inbound, decoded_record
from streams.metrics import LEAKS
from streams.rules.leakage import (
    ACTIONS,
    REENGAGEMENT_TEXT,
    after_reply,
    new_wait,
    temperature,
    with_earlier_reply,
    with_message,
    with_threshold,
)
from streams.rules.session import read_too_late
from streams.timers import Scheduler

_NAMESPACE = uuid.UUID("9d7c6b5a-4e3f-4a2b-9c1d-0e9f8a7b6c5d")


def _id(*parts: object) -> str:
    return name_based_id(_NAMESPACE, "|".join(str(p) for p in parts))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _waiting(entry: Any) -> dict[str, Any] | None:
    """A lead's wait, or None: nothing pending, or only the time of its last reply (an int).

    The reply's time is kept because the inbound messages and the sent ones are two topics,
    each handler with a queue of its own: an AI answer can be read before the message it
    answers, and that message then started a wait the answer had ended (a false leak)."""
    return entry if isinstance(entry, dict) else None


def register(
    lane: BatchLane,
    *,
    inbound: TopicT,
    outbound_messages: TopicT,
    lead_events: TopicT,
    leakage: TableT[bytes, Any],
    scheduler: Scheduler,
    tenants: TenantSettings,
    max_batch: int,
    stale_after_ms: int = 0,
) -> None:
    async def start_waiting(record: SourceRecord) -> None:
        message = decoded_inbound(record)
        if message is None:
            return
        occurred_ms = int(message.occurred_at.timestamp() * 1000)
        received_ms = int(message.received_at.timestamp() * 1000)
        if read_too_late(occurred_ms, received_ms, stale_after_ms):
            # Imported history: a wait for it would be overdue at once, a leak for every
            # sender of the mailbox's last week the moment it is connected.
            return
        key = message.lead_id.encode()
        if not _starts_wait(key, occurred_ms):
            return
        # Asked only for a wait to start (a cache miss waits for PostgreSQL, and every message
        # holding the lane for it did while it was down), and the table read again after it:
        # the replies' handler runs as a task of its own, and an answer it recorded during
        # the await was overwritten by a new wait: a false leak.
        threshold_s = await while_unreachable(tenants.leak_threshold_s, message.tenant_id)
        if not _starts_wait(key, occurred_ms):
            return
        # The lead's latest reply (the entry, when it is one): an earlier message read late
        # is answered by it.
        entry = leakage.get(key)
        wait = new_wait(occurred_ms, threshold_s, entry if isinstance(entry, int) else None)
        leakage[key] = wait
        scheduler.set(key, {"leak": wait["due_ms"]})

    def _starts_wait(key: bytes, occurred_ms: int) -> bool:
        """Whether a message of the lead starts a wait, as its entry stands now."""
        entry = leakage.get(key)
        if (waiting := _waiting(entry)) is not None:
            # Already waiting: the message joins the wait (and starts it, when earlier).
            if (changed := with_message(waiting, occurred_ms, _now_ms())) is not None:
                leakage[key] = waiting = changed
            _keep_deadline(key, waiting)
            return False
        # Answered already (its reply read first) when the entry is a later reply's time.
        return not (isinstance(entry, int) and occurred_ms <= entry)

    def _keep_deadline(key: bytes, waiting: dict[str, Any]) -> None:
        # The deadline is another table's write: a worker killed between the two kept only
        # the wait (new or moved), and its message or reply, read again, sets it right.
        if not waiting["fired"]:
            scheduler.set(key, {"leak": waiting["due_ms"]})

    lane.add_record_handler("leakage-waits", [inbound], start_waiting, max_batch=max_batch)

    async def stop_waiting(record: SourceRecord) -> None:
        sent = decoded_record(record, OutboundMessage)
        if sent is None or sent.status != "accepted":
            return
        key = sent.lead_id.encode()
        entry = leakage.get(key)
        sent_ms = int(sent.occurred_at.timestamp() * 1000)
        waiting = _waiting(entry)
        if waiting is None:
            if not isinstance(entry, int) or entry < sent_ms:
                leakage[key] = sent_ms
            return
        if sent_ms < waiting["waiting_since_ms"]:
            # Sent before the message the lead is waiting on: no answer to it, but one to any
            # earlier message read later (which then does not move the wait).
            if (changed := with_earlier_reply(waiting, sent_ms)) is not None:
                leakage[key] = waiting = changed
            _keep_deadline(key, waiting)
            return
        if (follow_up := after_reply(waiting, sent_ms)) is not None:
            # The lead wrote again after this reply, and that message was read first.
            leakage[key] = follow_up
            scheduler.set(key, {"leak": follow_up["due_ms"]})
        else:
            leakage[key] = sent_ms
            scheduler.cancel(key, "leak")
        waited_ms = sent_ms - waiting["waiting_since_ms"]
        reply = LeadEvent(
            # The reply's own id: the wait it ends can depend on the order the two topics
            # were read in (an earlier message read before or after it), the reply cannot.
            event_id=_id(sent.lead_id, "first_reply", sent.event_id),
            tenant_id=sent.tenant_id,
            occurred_at=sent.occurred_at,
            lead_id=sent.lead_id,
            type="first_reply",
            data={"waited_ms": waited_ms, "sent_by": sent.sent_by, "leaked": waiting["fired"]},
        )
        await lead_events.send(key=key, value=reply.model_dump_json().encode())
        if follow_up is not None:
            await _retime_follow_up(key, follow_up, sent.tenant_id)

    async def _retime_follow_up(key: bytes, follow_up: dict[str, Any], tenant_id: str) -> None:
        """A follow-up wait is a new one: it takes the tenant's threshold as it is now, not
        the answered wait's. Asked once the reply is applied: the lookup waits for PostgreSQL
        on a cache miss (and while it is down), and the answered wait must not leak meanwhile.
        Applied only to that same wait, still unfired and not yet due."""
        threshold_s = await while_unreachable(tenants.leak_threshold_s, tenant_id)
        current = _waiting(leakage.get(key))
        if current is None or any(
            current.get(field) != follow_up[field] for field in ("waiting_since_ms", "replied_ms")
        ):
            return  # answered or moved meanwhile: no longer the wait this reply left
        if (retimed := with_threshold(current, threshold_s, _now_ms())) is not None:
            leakage[key] = retimed
            scheduler.set(key, {"leak": retimed["due_ms"]})

    # The sent messages' sink reads them on the lane too (it dead-letters undecodable ones).
    lane.add_record_handler(
        "leakage-replies", [outbound_messages], stop_waiting, max_batch=max_batch
    )


class LeakActions:
    """What a fired leak does; built once by the composition root."""

    def __init__(
        self,
        *,
        leakage: TableT[bytes, Any],
        qualification: TableT[bytes, Any],
        router: SdrRouter,
        lead_events: TopicT,
        outbound_commands: TopicT,
        notifications: TopicT,
        gate: AiGate,
        meter: Meter,
        tenants: TenantSettings,
        scheduler: Scheduler,
        email_configured: bool = True,
    ) -> None:
        # Whether the Google OAuth client is set: without it no mailbox sends anything.
        self._email_configured = email_configured
        self._scheduler = scheduler
        self._tenants = tenants
        self._gate = gate
        self._meter = meter
        self._leakage = leakage
        self._qualification = qualification
        self._router = router
        self._lead_events = lead_events
        self._outbound_commands = outbound_commands
        self._notifications = notifications

    def handlers(self) -> dict[str, DeadlineHandler]:
        return {"leak": self.on_leak}

    def dead_lettered(self) -> dict[str, DeadLettered]:
        return {"leak": DeadLettered(settle=self.on_leak_dead_lettered)}

    def on_leak_dead_lettered(self, key: bytes, fired: DeadlineReached) -> None:
        """The wait counts as fired: its deadline failed and was dead-lettered. Left unfired,
        each later message of the lead set the past deadline again (a wait's deadline is set
        again after a crash between its two writes), and it failed again."""
        waiting = _waiting(self._leakage.get(key))
        if waiting is not None and waiting["due_ms"] == fired.due_ms and not waiting["fired"]:
            self._leakage[key] = {**waiting, "fired": True}

    async def _send(self, topic: TopicT, key: str, event: Any) -> None:
        await topic.send(key=key.encode(), value=event.model_dump_json().encode())

    async def on_leak(
        self, key: bytes, fired: DeadlineReached, session: dict[str, Any] | None
    ) -> None:
        waiting = _waiting(self._leakage.get(key))
        if waiting is None or waiting["fired"]:
            return
        if fired.due_ms != waiting["due_ms"]:
            # The wait moved (to an earlier message read late, or left for a later one a
            # reply did not answer) and the move of its deadline was lost in a crash: it is
            # reported at its own due, under that due's ids (twice under two dues otherwise).
            self._scheduler.set(key, {"leak": waiting["due_ms"]})
            return
        if session is None:
            return
        lead_id, tenant_id = fired.lead_id, session["tenant_id"]
        state = self._qualification.get(key) or {}
        followed_up = session["last_customer_message_ms"] > waiting["waiting_since_ms"]
        temp = temperature(state.get("score"), followed_up)
        action = ACTIONS[temp]
        sdr_id = state.get("sdr_id")
        details: dict[str, Any] = {"score": state.get("score"), "followed_up": followed_up}
        now = datetime.now(UTC)
        if (
            action == "ai_reengagement"
            and session["channel"] == "email"
            and not (self._email_configured and await self._tenants.mailbox_connected(tenant_id))
        ):
            # The tenant's Gmail disconnected: the message could only fail, so it is neither
            # sent nor charged. The alerts below still go.
            details["ai_skipped"] = "no_mailbox"
        elif action == "ai_reengagement" and not await self._gate.allows(tenant_id):
            # A paused tenant still gets the alerts below; only the AI message is skipped.
            details["ai_skipped"] = "tokens_exhausted"
        elif action == "ai_reengagement":
            command = OutboundCommand(
                event_id=_id(lead_id, "reengage", fired.due_ms),
                tenant_id=tenant_id,
                occurred_at=now,
                lead_id=lead_id,
                text=REENGAGEMENT_TEXT,
                sent_by="ai",
                purpose="re_engagement",
            )
            await self._send(self._outbound_commands, lead_id, command)
            details["command_id"] = command.event_id
            details["tokens"] = await self._meter.charge(
                event_id=_id(lead_id, "reengage-usage", fired.due_ms),
                tenant_id=tenant_id,
                lead_id=lead_id,
                feature="reengagement",
            )
        elif action == "reassign":
            moved = await self._router.reassign(tenant_id, lead_id, "leak", fired.event_id)
            if moved is None:
                details["reassigned"] = False
            else:
                previous = moved.from_sdr.sdr_id if moved.from_sdr else None
                details.update(reassigned=True, to_sdr_id=moved.to_sdr.sdr_id, from_sdr_id=previous)
                sdr_id = moved.to_sdr.sdr_id
                # The interview's SDR too: the lead's later leaks and interview events named
                # the SDR it was taken from. Under the lead's lock: an interview step in
                # progress would write its older copy back.
                async with self._gate.lead_lock(key):
                    if (interview := self._qualification.get(key)) is not None:
                        self._qualification[key] = {**interview, "sdr_id": sdr_id}
                await self._send(self._lead_events, lead_id, LeadEvent(
                    event_id=_id(lead_id, "reassigned", fired.due_ms), tenant_id=tenant_id,
                    occurred_at=now, lead_id=lead_id, type="reassigned",
                    data={"from_sdr_id": details["from_sdr_id"], "to_sdr_id": sdr_id,
                          "reason": "leak"},
                ))  # fmt: skip
                if moved.from_sdr is not None:
                    await self._notify(fired, tenant_id, "sdr", moved.from_sdr.sdr_id,
                                       "Lead reassigned", "A lead you did not answer in time "
                                       "was moved to another SDR.")  # fmt: skip
        await self._send(self._lead_events, lead_id, LeadEvent(
            event_id=_id(lead_id, "leak", fired.due_ms), tenant_id=tenant_id,
            occurred_at=fired.occurred_at, lead_id=lead_id, type="leak_detected",
            data={"temperature": temp, "action": action,
                  "waiting_since_ms": waiting["waiting_since_ms"], "deadline_ms": fired.due_ms,
                  # How late the action ran (the SLO: within about a second).
                  "lateness_ms": int(now.timestamp() * 1000) - fired.due_ms,
                  **details},
        ))  # fmt: skip
        LEAKS.labels(temp, action).inc()
        title = f"{temp} lead waiting without a reply"
        body = f"A {session['channel']} lead has waited past its reply deadline ({action})."
        if action == "escalate_admins" or sdr_id is None:
            await self._notify(fired, tenant_id, "admins", None, title, body)
        if sdr_id is not None:
            await self._notify(fired, tenant_id, "sdr", sdr_id, title, body)
        # Marked fired after its effects, so the changelog write waits for them (a worker
        # killed in between reports the leak again, with the same ids). A reply taken while
        # this ran ended the wait: it is not brought back, and a later wait it started is
        # not this leak's. Moved to an earlier message meanwhile, it is still this wait: its
        # moved deadline then finds it fired (a second leak otherwise).
        current = _waiting(self._leakage.get(key))
        if current is not None and current["waiting_since_ms"] <= waiting["waiting_since_ms"]:
            self._leakage[key] = {**current, "fired": True}

    async def _notify(
        self,
        fired: DeadlineReached,
        tenant_id: str,
        audience: str,
        sdr_id: str | None,
        title: str,
        body: str,
    ) -> None:
        notification = Notification(
            event_id=_id(fired.lead_id, "notify", fired.due_ms, audience, sdr_id),
            tenant_id=tenant_id,
            occurred_at=datetime.now(UTC),
            audience=audience,
            sdr_id=sdr_id,
            category="lead_leak",
            title=title,
            body=body,
            data={"lead_id": fired.lead_id},
        )
        await self._send(self._notifications, tenant_id, notification)
