"""Cold recovery: COLD leads silent for a day get a spaced sequence of AI messages.

Every customer message moves the lead's "silence" deadline; when it fires and the lead is
COLD, recovery starts and each step is a "recovery" deadline at the tenant's local hour. A
customer message during recovery ends it as a success, with the time to reply.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from faust.types import TableT, TopicT

from connectors.tenants import TenantSettings
from flexoraa.db import while_unreachable
from schemas.events import InboundMessage
from schemas.ids import name_based_id
from schemas.messaging import DeadlineReached, LeadEvent, OutboundCommand
from streams.agents.deadlines import DeadLettered, DeadlineHandler
from streams.agents.tokens import AiGate, Meter
from streams.batches import BatchLane, SourceRecord
from streams.dead_letters import decoded_inbound
from streams.metrics import RECOVERY
from streams.rules.leakage import temperature
from streams.rules.recovery import (
    STRATEGIES,
    known_zone,
    local_hour_window_start,
    next_step_due_ms,
    recovery_text,
    step_due_ms,
)
from streams.rules.sending import reachable
from streams.rules.session import read_too_late
from streams.rules.window import is_window_open
from streams.timers import Scheduler

logger = logging.getLogger(__name__)
# How long a step for an e-mail lead of a tenant without a connected mailbox waits to try again.
MAILBOX_RETRY_MS = 3_600_000
# How long after the step before it a step waits for a connected mailbox before the sequence ends.
MAILBOX_WAIT_MS = 7 * 86_400_000
_NAMESPACE = uuid.UUID("1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9")


def _id(*parts: object) -> str:
    return name_based_id(_NAMESPACE, "|".join(str(p) for p in parts))


def _attempt_id(lead_id: str, started_ms: int, step: int) -> str:
    """The id of a sequence's step's `recovery_attempt` event."""
    return _id(lead_id, "attempt", started_ms, step)


class Recovery:
    def __init__(
        self,
        *,
        table: TableT[bytes, Any],
        qualification: TableT[bytes, Any],
        scheduler: Scheduler,
        tenants: TenantSettings,
        lead_events: TopicT,
        outbound_commands: TopicT,
        silence_ms: int,
        delays_s: tuple[int, ...],
        local_hour: int | None,
        gate: AiGate,
        meter: Meter,
        template_configured: bool = False,
        stale_after_ms: int = 0,
        email_configured: bool = True,
    ) -> None:
        # Whether the Google OAuth client is set: without it no mailbox sends anything.
        self._email_configured = email_configured
        self._stale_after_ms = stale_after_ms
        # Whether a WhatsApp lead can be written to outside its 24-hour window.
        self._template_configured = template_configured
        self._gate = gate
        self._meter = meter
        gate.add_resumer("recovery", self._resume, on_dropped=self._skip_failed_step)
        self._table = table
        self._qualification = qualification
        self._scheduler = scheduler
        self._tenants = tenants
        self._lead_events = lead_events
        self._outbound_commands = outbound_commands
        self._silence_ms = silence_ms
        self._delays_s = delays_s
        self._local_hour = local_hour

    def handlers(self) -> dict[str, DeadlineHandler]:
        return {"silence": self._silent, "recovery": self._step}

    async def _event(self, lead_id: str, tenant_id: str, kind: str, data: dict[str, Any],
                     event_id: str, at: datetime) -> None:  # fmt: skip
        event = LeadEvent(event_id=event_id, tenant_id=tenant_id, occurred_at=at,
                          lead_id=lead_id, type=kind, data=data)  # fmt: skip
        await self._lead_events.send(key=lead_id.encode(), value=event.model_dump_json().encode())

    async def on_customer_message(self, message: InboundMessage) -> None:
        key = message.lead_id.encode()
        async with self._gate.lead_lock(key):
            await self._on_customer_message_held(key, message)

    async def _on_customer_message_held(self, key: bytes, message: InboundMessage) -> None:
        state = self._table.get(key)
        occurred_ms = int(message.occurred_at.timestamp() * 1000)
        # Any message after the one the lead fell silent on ends the sequence, also one that
        # occurred before the sequence started but was read after (a Gmail poll, a Meta
        # retry): compared with the start, the sequence went on to a lead who had written.
        # (Sequences started before the silence was kept: their start.)
        silent_since_ms = state.get("silent_since_ms", state["started_ms"] - 1) if state else 0
        if state is not None and occurred_ms > silent_since_ms:
            del self._table[key]
            self._scheduler.cancel(key, "recovery")
            if state["step"] == 0 or occurred_ms < state["started_ms"]:
                # Nothing sent yet, or written before the sequence began: no reply to it.
                self._move_silence_unless_stale(key, message, occurred_ms)
                return
            last_step = state["step"] - 1
            RECOVERY.labels(STRATEGIES[last_step], "replied").inc()
            await self._event(
                message.lead_id, message.tenant_id, "recovery_replied",
                {"step": last_step, "time_to_reply_ms": occurred_ms - state["last_sent_ms"],
                 # The attempt answered: a step of an earlier sequence is not this reply's.
                 "attempt_event_id": _attempt_id(message.lead_id, state["started_ms"], last_step)},
                _id(message.lead_id, "replied", state["started_ms"]), message.occurred_at,
            )  # fmt: skip
        self._move_silence_unless_stale(key, message, occurred_ms)

    def _move_silence_unless_stale(
        self, key: bytes, message: InboundMessage, occurred_ms: int
    ) -> None:
        received_ms = int(message.received_at.timestamp() * 1000)
        if not read_too_late(occurred_ms, received_ms, self._stale_after_ms):
            # Imported history sets no silence: counted from it, recovery would start at once
            # for every COLD sender of the mailbox's last week.
            self._move_silence(key, occurred_ms)

    def _move_silence(self, key: bytes, occurred_ms: int) -> None:
        # Only later: a message read late (a Meta retry, a Gmail backfill) that occurred
        # before the lead's latest one would have ended the silence early.
        silence_ends = occurred_ms + self._silence_ms
        if self._scheduler.pending(key).get("silence", 0) < silence_ends:
            self._scheduler.set(key, {"silence": silence_ends})

    async def _silent(
        self, key: bytes, fired: DeadlineReached, session: dict[str, Any] | None
    ) -> None:
        # The lead's lock: a message taken while this awaits the tenant's zone would find no
        # sequence to end, and the sequence would start after the lead wrote.
        async with self._gate.lead_lock(key):
            await self._silent_held(key, session)

    async def _silent_held(self, key: bytes, session: dict[str, Any] | None) -> None:
        if session is None or self._table.get(key) is not None:
            return
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        silence_ends = session.get("last_customer_message_ms", 0) + self._silence_ms
        if silence_ends > now_ms:
            # The lead wrote since (its message still in this handler's queue when the
            # deadline fired): silent from its latest message on, not from an older one.
            self._scheduler.set(key, {"silence": silence_ends})
            return
        score = (self._qualification.get(key) or {}).get("score")
        if temperature(score, followed_up=False) != "COLD":
            return
        time_zone = await self._tenants.time_zone(session["tenant_id"])
        if known_zone(time_zone) is None:
            logger.warning("tenant %s: unknown time zone %r; recovery runs on UTC",
                           session["tenant_id"], time_zone)  # fmt: skip
        due = step_due_ms(now_ms, 0, self._delays_s, time_zone, self._local_hour)
        silent_since_ms = session.get("last_customer_message_ms", 0)
        self._table[key] = {"step": 0, "started_ms": now_ms, "last_sent_ms": now_ms,
                            "time_zone": time_zone, "silent_since_ms": silent_since_ms}  # fmt: skip
        self._scheduler.set(key, {"recovery": due})

    async def _step(
        self, key: bytes, fired: DeadlineReached, session: dict[str, Any] | None
    ) -> None:
        # The lead's lock: a reply processed while this step awaits the producer would be
        # overwritten by the step's state, and recovery would go on after the lead answered.
        async with self._gate.lead_lock(key):
            await self._step_held(key, fired, session)

    async def _step_held(
        self, key: bytes, fired: DeadlineReached, session: dict[str, Any] | None
    ) -> None:
        state = self._table.get(key)
        if state is None or session is None:
            return
        step = state["step"]
        lead_id, tenant_id = fired.lead_id, session["tenant_id"]
        if step >= len(STRATEGIES):
            # A silence after the last step without a reply: the sequence is over, and a
            # reply months later is no recovery's success.
            del self._table[key]
            return
        now_ms = int(time.time() * 1000)
        if self._local_hour is not None:
            # Due at the hour but fired later (a worker down overnight, a step resumed after
            # a top-up at 23:00): it waits for the next one, not a 03:00 message.
            window = local_hour_window_start(now_ms, state["time_zone"], self._local_hour)
            if window > now_ms:
                self._scheduler.set(key, {"recovery": window})
                return
        window_open = is_window_open(session.get("last_customer_message_ms"), now_ms)
        if not reachable(session.get("channel", ""), window_open, self._template_configured):
            # Nothing would go out (an Instagram or Messenger window closed, WhatsApp without
            # a template, a channel without a sender): the sequence ends here, not charged for
            # messages the outbound agent can only report failed.
            logger.info("recovery of lead %s ended at step %d: %s unreachable", lead_id, step,
                        session.get("channel"))  # fmt: skip
            del self._table[key]
            return
        if session.get("channel") == "email" and not (
            self._email_configured and await self._tenants.mailbox_connected(tenant_id)
        ):
            # The tenant's Gmail disconnected (or never connected): charged, the step could only
            # fail. Tried again later (and at the local hour), as a reconnect does not start the
            # sequence anew; for a week after the step before, then it ends like any other
            # unreachable lead's (kept for good, a mailbox connected months later sent every
            # COLD lead a stale step at once).
            if now_ms - state["last_sent_ms"] > MAILBOX_WAIT_MS:
                logger.info("recovery of lead %s ended at step %d: no connected mailbox",
                            lead_id, step)  # fmt: skip
                del self._table[key]
                return
            self._scheduler.set(key, {"recovery": now_ms + MAILBOX_RETRY_MS})
            return
        if not await self._gate.allows(tenant_id):
            # No tokens: the step waits for the next top-up instead of being lost.
            self._gate.defer(key, tenant_id, "recovery", fired.model_dump(mode="json"))
            return
        now = datetime.now(UTC)
        command = OutboundCommand(
            event_id=_id(lead_id, "recovery", state["started_ms"], step),
            tenant_id=tenant_id,
            occurred_at=now,
            lead_id=lead_id,
            text=recovery_text(step, session.get("contact_name")),
            sent_by="ai",
            purpose="recovery",
        )
        await self._outbound_commands.send(key=key, value=command.model_dump_json().encode())
        tokens = await self._meter.charge(
            event_id=_id(lead_id, "recovery-usage", state["started_ms"], step),
            tenant_id=tenant_id,
            lead_id=lead_id,
            feature="recovery",
        )
        RECOVERY.labels(STRATEGIES[step], "attempt").inc()
        await self._event(
            lead_id, tenant_id, "recovery_attempt",
            {"step": step, "strategy": STRATEGIES[step], "command_id": command.event_id,
             "tokens": tokens},
            _attempt_id(lead_id, state["started_ms"], step), now,
        )  # fmt: skip
        self._advance(key, state, int(now.timestamp() * 1000))

    def _advance(self, key: bytes, state: dict[str, Any], sent_ms: int) -> None:
        """On to the step after `state`'s, due at its time. After the last, the sequence waits
        one silence for a reply, and ends."""
        step = state["step"] + 1
        if step < len(STRATEGIES):
            due = next_step_due_ms(state["started_ms"], step, sent_ms, self._delays_s,
                                   state["time_zone"], self._local_hour)  # fmt: skip
        else:
            due = sent_ms + self._silence_ms
        self._scheduler.set(key, {"recovery": due})
        self._table[key] = {**state, "step": step, "last_sent_ms": sent_ms}

    def dead_lettered(self) -> dict[str, DeadLettered]:
        # A step failing for a reason of its own is skipped: left at it, with its deadline
        # cancelled, the lead's recovery stopped there for good and a late reply still counted
        # as its success. (A failed "silence" deadline leaves nothing: the next message sets
        # it again.)
        return {"recovery": DeadLettered(settle=lambda key, _: self._skip_failed_step(key))}

    def _skip_failed_step(self, key: bytes) -> None:
        """Also when the step failed resumed after a top-up (the gate dropped it)."""
        state = self._table.get(key)
        if state is None or "recovery" in self._scheduler.pending(key):
            return  # the lead replied meanwhile, or the step was moved
        if state["step"] < len(STRATEGIES):
            self._advance(key, state, state["last_sent_ms"])

    async def _resume(
        self, key: bytes, payloads: list[Any], session: dict[str, Any] | None
    ) -> None:
        # Steps never pile up (the next is scheduled only after one is sent): run the last
        # (outside its hour, it waits for it and asks the gate again then). Called by the
        # gate with the lead's lock held.
        await self._step_held(key, DeadlineReached.model_validate(payloads[-1]), session)


def register(lane: BatchLane, *, inbound: TopicT, recovery: Recovery, max_batch: int) -> None:
    async def watch(record: SourceRecord) -> None:
        message = decoded_inbound(record)
        if message is not None:
            await while_unreachable(recovery.on_customer_message, message)

    lane.add_record_handler("recovery-watch", [inbound], watch, max_batch=max_batch)
