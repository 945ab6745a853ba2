"""The qualification agent: each inbound message of a lead advances its six-turn interview."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from faust.types import TableT, TopicT

from connectors.ai import Extraction, QualificationAI, question_for
from connectors.sdrs import Assignment, SdrRouter
from connectors.tenants import TenantSettings
from flexoraa.db import while_unreachable
from flexoraa.latency import latency_tenant
from schemas.events import InboundMessage
from schemas.ids import name_based_id
from schemas.latency import MAX_DURATION_MS, LatencyEvent
from schemas.messaging import LeadEvent, OutboundCommand
from schemas.notifications import Notification, clipped_body
from streams.agents.tokens import AiGate, Meter
from streams.batches import BatchLane, SourceRecord
from streams.dead_letters import decoded_inbound
from streams.metrics import QUALIFICATION_STEPS
from streams.rules.qualification import (
    Policy,
    Step,
    advance,
    is_answer,
    likely_next_slot,
    new_state,
)
from streams.rules.session import read_too_late

logger = logging.getLogger(__name__)
_NAMESPACE = uuid.UUID("5c0e7f1a-2b3d-4c5e-8f9a-0b1c2d3e4f5a")


def derived_id(event_id: str, what: str) -> str:
    """Ids of everything one message causes are derived from it: a replay produces duplicates
    that every consumer recognises."""
    return name_based_id(_NAMESPACE, f"{event_id}|{what}")


@dataclass
class QualificationTopics:
    lead_events: TopicT
    outbound_commands: TopicT
    notifications: TopicT
    latency: TopicT


class Interviewer:
    """Applies one message: extraction, the state machine, escalation and routing effects."""

    def __init__(
        self,
        ai: QualificationAI,
        router: SdrRouter,
        policy: Policy,
        tenants: TenantSettings,
        topics: QualificationTopics,
        gate: AiGate,
        meter: Meter,
        stale_after_ms: int = 0,
        email_configured: bool = True,
    ) -> None:
        self._stale_after_ms = stale_after_ms
        self._email_configured = email_configured
        self._ai = ai
        self._router = router
        self._policy = policy
        self._tenants = tenants
        self._topics = topics
        self._gate = gate
        self._meter = meter

    async def handle(
        self, message: InboundMessage, state: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        # Event time, not the clock: "next month" means next month from when the lead said it,
        # and a replay of the topic rebuilds exactly the same interview.
        said_at = message.occurred_at
        said_ms = int(said_at.timestamp() * 1000)
        current = state or new_state(message.lead_id, message.tenant_id, said_ms)
        if current["status"] != "in_progress" or message.event_id in current["recent_event_ids"]:
            return None
        if not is_answer(message.message_type, message.text):
            return None  # a reaction, a sticker: no turn of the interview, nothing charged
        if read_too_late(said_ms, int(message.received_at.timestamp() * 1000),
                         self._stale_after_ms):  # fmt: skip
            # Days old when read (a mailbox's history imported): an interview question now
            # would answer the past; the lead's next message starts it.
            return None
        key = message.lead_id.encode()
        # A lead with kept messages keeps this one too, so answers are read in order.
        if self._gate.has_deferred(key) or not await self._gate.allows(message.tenant_id):
            self._gate.defer(
                key, message.tenant_id, "qualification", message.model_dump(mode="json")
            )
            return None
        # The model writes its question before the state machine picks the slot: for the one
        # it picks if this message answers the one asked. Told the slot just asked instead,
        # it asked the lead again what they had just answered.
        # No question for a lead nothing can reach: it failed at the send, and the model was
        # paid to write it.
        can_ask = await self._can_ask(message)
        next_slot = likely_next_slot(current) if can_ask else None  # type: ignore[arg-type]
        extraction = await self._ai.extract(
            message.text, current["asked"] or "need", said_at, next_slot
        )
        call = extraction.call
        await self._meter.charge(
            event_id=derived_id(message.event_id, "token-usage"),
            tenant_id=message.tenant_id,
            lead_id=message.lead_id,
            feature="qualification",
            model=self._ai.model if call is not None and call.reached_model else None,
            prompt_tokens=call.prompt_tokens if call is not None else 0,
            completion_tokens=call.completion_tokens if call is not None else 0,
        )
        step = advance(
            current,  # type: ignore[arg-type]
            extraction.found,
            event_id=message.event_id,
            now_ms=said_ms,
            policy=await self._policy_of(message.tenant_id),
            can_ask=can_ask,
        )
        if step is None:
            return None
        updated: dict[str, Any] = dict(step.state)
        await self._report_model_call(message, extraction)
        assignment = None
        if step.escalate or step.completed:
            reason = "escalated" if step.escalate else "qualified"
            assignment = await self._router.assign(message.tenant_id, message.lead_id, reason)
            if assignment is not None:
                updated["sdr_id"] = assignment.sdr_id
        await self._lead_event(
            message, "qualification_updated", updated, extraction.source, step, can_ask=can_ask
        )
        if step.escalate:
            await self._escalated(message, updated, assignment)
        # Also when the router had assigned the lead already but the state does not say so:
        # this message, read again after a crash between the assignment and the state's write,
        # sends the assignment's effects it never sent (their ids repeat: sent once).
        # And when the SDR differs from the state's (moved off a deactivated one, the move
        # committed before a crash): read again, the router reports it assigned already.
        if assignment is not None and (
            assignment.newly_assigned or current["sdr_id"] != assignment.sdr_id
        ):
            await self._assigned(message, updated, assignment)
        if step.question_slot is not None:
            generated = extraction.question if step.question_slot == next_slot else None
            await self._ask(message, question_for(step.question_slot, generated))
        QUALIFICATION_STEPS.labels(extraction.source, updated["status"]).inc()
        return updated

    async def _can_ask(self, message: InboundMessage) -> bool:
        """Whether a question can reach the lead: an e-mail lead needs the tenant's connected
        mailbox and the platform's Google client (the other channels' sends decide there)."""
        if message.channel != "email":
            return True
        return self._email_configured and await self._tenants.mailbox_connected(message.tenant_id)

    async def _policy_of(self, tenant_id: str) -> Policy:
        """The platform's policy with the tenant's own threshold and window, where set."""
        profile = await self._tenants.profile(tenant_id)
        return replace(
            self._policy,
            budget_threshold=profile.budget_threshold or self._policy.budget_threshold,
            escalation_days=self._policy.escalation_days
            if profile.escalation_days is None
            else profile.escalation_days,
        )

    async def _send(self, topic: TopicT, key: str, event: Any) -> None:
        await topic.send(key=key.encode(), value=event.model_dump_json().encode())

    async def _lead_event(
        self,
        message: InboundMessage,
        kind: str,
        state: dict[str, Any],
        source: str,
        step: Step,
        *,
        can_ask: bool,
    ) -> None:
        data = {
            "turn": state["turn"],
            "status": state["status"],
            "facts": state["facts"],
            "score": state["score"],
            "sdr_id": state["sdr_id"],
            "source": source,
            "asked": step.question_slot,
        }
        if not can_ask and not step.completed:
            data["question_skipped"] = "no_mailbox"
        await self._send(
            self._topics.lead_events,
            message.lead_id,
            LeadEvent(
                event_id=derived_id(message.event_id, kind),
                tenant_id=message.tenant_id,
                occurred_at=datetime.now(UTC),
                lead_id=message.lead_id,
                type=kind,
                data=data,
            ),
        )

    async def _escalated(
        self, message: InboundMessage, state: dict[str, Any], assignment: Assignment | None
    ) -> None:
        await self._send(
            self._topics.lead_events,
            message.lead_id,
            LeadEvent(
                event_id=derived_id(message.event_id, "escalated"),
                tenant_id=message.tenant_id,
                occurred_at=datetime.now(UTC),
                lead_id=message.lead_id,
                type="escalated",
                data={"score": state["score"], "facts": state["facts"],
                      "sdr_id": assignment.sdr_id if assignment else None},
            ),
        )  # fmt: skip
        await self._notify(
            message,
            "lead_escalated",
            assignment,
            title="High-value lead escalated",
            body=f"A lead on {message.channel} scored {state['score']:.0f}: "
            f"{_summary(state['facts'])}. Reply soon.",
        )

    async def _assigned(
        self, message: InboundMessage, state: dict[str, Any], assignment: Assignment
    ) -> None:
        await self._send(
            self._topics.lead_events,
            message.lead_id,
            LeadEvent(
                event_id=derived_id(message.event_id, "sdr_assigned"),
                tenant_id=message.tenant_id,
                occurred_at=datetime.now(UTC),
                lead_id=message.lead_id,
                type="sdr_assigned",
                data={"sdr_id": assignment.sdr_id, "sdr_email": assignment.email,
                      "score": state["score"]},
            ),
        )  # fmt: skip
        await self._notify(
            message,
            "lead_assigned",
            assignment,
            title="New qualified lead assigned to you",
            body=f"{_summary(state['facts'])} (score {state['score']:.0f}).",
        )
        if not assignment.newly_assigned:
            # Effects re-sent after a crash: the SLA windows count latency events by offset,
            # not id, and the duration measured now would add the outage to routing's P90.
            return
        # From the message that qualified or escalated the lead to its SDR: measured from the
        # lead's first message, it held the whole interview (hours of the lead's own replies),
        # and the 5 s routing target could never be met. Capped as the event allows.
        received_ms = message.received_at.timestamp() * 1000
        routing_ms = min(max(0.0, time.time() * 1000 - received_ms), MAX_DURATION_MS)
        await self._send(
            self._topics.latency,
            "routing",
            LatencyEvent(
                event_id=derived_id(message.event_id, "routing-latency"),
                tenant_id=latency_tenant(message.tenant_id),
                occurred_at=datetime.now(UTC),
                operation="routing",
                duration_ms=routing_ms,
                outcome="ok",
            ),
        )

    async def _notify(
        self,
        message: InboundMessage,
        category: str,
        assignment: Assignment | None,
        *,
        title: str,
        body: str,
    ) -> None:
        notification = Notification(
            event_id=derived_id(message.event_id, f"notify-{category}"),
            tenant_id=message.tenant_id,
            occurred_at=datetime.now(UTC),
            # No SDR free: the tenant's admins hear about it instead.
            audience="sdr" if assignment else "admins",
            sdr_id=assignment.sdr_id if assignment else None,
            category=category,
            title=title,
            body=clipped_body(body),
            data={"lead_id": message.lead_id},
        )
        await self._send(self._topics.notifications, message.tenant_id, notification)

    async def _ask(self, message: InboundMessage, question: str) -> None:
        await self._send(
            self._topics.outbound_commands,
            message.lead_id,
            OutboundCommand(
                event_id=derived_id(message.event_id, "question"),
                tenant_id=message.tenant_id,
                occurred_at=datetime.now(UTC),
                lead_id=message.lead_id,
                text=question,
                sent_by="ai",
                purpose="qualification",
            ),
        )

    async def _report_model_call(self, message: InboundMessage, extraction: Extraction) -> None:
        call = extraction.call
        if call is None:
            return
        await self._send(
            self._topics.latency,
            "ai_message",
            LatencyEvent(
                event_id=derived_id(message.event_id, "ai-latency"),
                tenant_id=latency_tenant(message.tenant_id),
                occurred_at=datetime.now(UTC),
                operation="ai_message",
                duration_ms=call.duration_ms,
                outcome="ok" if call.ok else "error",
                detail=call.error,
            ),
        )


def _summary(facts: dict[str, Any]) -> str:
    parts = []
    if (budget := facts.get("budget")) is not None:
        parts.append(f"budget {budget.get('text') or budget.get('max') or budget.get('min')}")
    if (timeline := facts.get("timeline")) is not None:
        parts.append(f"timeline {timeline.get('text')}")
    if (authority := facts.get("authority")) is not None:
        parts.append("decision maker" if authority.get("decision_maker") else "needs approval")
    return ", ".join(parts) or "no facts yet"


def register(
    lane: BatchLane,
    *,
    inbound: TopicT,
    qualification: TableT[bytes, Any],
    interviewer: Interviewer,
    gate: AiGate,
    max_batch: int,
) -> None:
    async def process(message: InboundMessage) -> None:
        key = message.lead_id.encode()
        updated = await while_unreachable(interviewer.handle, message, qualification.get(key))
        if updated is not None:
            qualification[key] = updated

    async def resume(key: bytes, payloads: list[Any], session: dict[str, Any] | None) -> None:
        for payload in payloads:
            await process(InboundMessage.model_validate(payload))

    gate.add_resumer("qualification", resume)

    async def interview(record: SourceRecord) -> None:
        message = decoded_inbound(record)
        if message is not None:
            async with gate.lead_lock(message.lead_id.encode()):
                await process(message)

    lane.add_record_handler("qualification", [inbound], interview, max_batch=max_batch)
