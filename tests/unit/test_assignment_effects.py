"""An assignment's effects (its lead event, the SDR's notification) go out even when the message
is read again after a crash between the assignment, committed in PostgreSQL, and the interview
state's write: the router then says "already assigned". Its routing latency goes out once."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import orjson

from connectors.ai import QualificationAI
from connectors.sdrs import Assignment
from connectors.tenants import TenantProfile
from flexoraa.settings import Settings
from schemas.events import InboundMessage
from streams.agents.qualification import Interviewer, QualificationTopics
from streams.rules.qualification import Policy, new_state

TENANT = str(uuid.uuid4())
SDR = str(uuid.uuid4())


@dataclass
class Topic:
    sent: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, *, key: bytes, value: bytes) -> None:
        self.sent.append(orjson.loads(value))


@dataclass
class Router:
    newly_assigned: bool

    async def assign(self, tenant_id: str, lead_id: str, reason: str) -> Assignment:
        return Assignment(SDR, "Priya", "priya@acme.test", self.newly_assigned)


class Tenants:
    def __init__(self, mailbox_connected: bool = True) -> None:
        self.connected = mailbox_connected

    async def profile(self, tenant_id: str) -> TenantProfile:
        return TenantProfile(1800, "UTC", None, None)

    async def mailbox_connected(self, tenant_id: str) -> bool:
        return self.connected


class Gate:
    def has_deferred(self, key: bytes) -> bool:
        return False

    async def allows(self, tenant_id: str) -> bool:
        return True


class Meter:
    async def charge(self, **usage: Any) -> int:
        return 1


async def interview(
    newly_assigned: bool, state: dict[str, Any] | None, latency: Topic | None = None
) -> Topic:
    """One message escalating a lead; `state` None: its first."""
    events = Topic()
    topics = QualificationTopics(
        lead_events=cast(Any, events), outbound_commands=cast(Any, Topic()),
        notifications=cast(Any, Topic()), latency=cast(Any, latency or Topic()),
    )  # fmt: skip
    interviewer = Interviewer(
        QualificationAI(Settings(openai_api_key=None)), cast(Any, Router(newly_assigned)),
        Policy(budget_threshold=10_000, budget_currency="USD", escalation_days=30),
        cast(Any, Tenants()), topics, cast(Any, Gate()), cast(Any, Meter()),
    )  # fmt: skip
    lead = str(uuid.uuid4())
    text = "We need a CRM, budget $50,000, to start next week"  # escalated: high value, soon
    message = InboundMessage(event_id=str(uuid.uuid4()), tenant_id=TENANT,
                             occurred_at=datetime.now(UTC), lead_id=lead, channel="whatsapp",
                             contact="+919800000003", text=text,
                             received_at=datetime.now(UTC))  # fmt: skip
    await interviewer.handle(message, state)
    return events


async def test_an_escalated_lead_the_router_had_assigned_before_a_crash_is_announced() -> None:
    events = await interview(newly_assigned=False, state=None)  # the state never written
    assert "sdr_assigned" in [event["type"] for event in events.sent]


async def test_a_new_assignment_is_announced_once() -> None:
    events = await interview(newly_assigned=True, state=None)
    assert [event["type"] for event in events.sent].count("sdr_assigned") == 1


async def test_the_routing_latency_is_measured_once_not_again_after_a_crash() -> None:
    # Measured again at the replay, it counted twice (the SLA windows tell records apart by
    # offset) and added the outage to routing's P90.
    first, again = Topic(), Topic()
    await interview(newly_assigned=True, state=None, latency=first)
    await interview(newly_assigned=False, state=None, latency=again)
    assert [event["operation"] for event in first.sent] == ["routing"]
    assert again.sent == []


async def test_routing_is_timed_from_the_message_that_qualified_the_lead() -> None:
    # Timed from the lead's first message, it held the whole interview (hours of the lead's
    # own replies): the 5 s routing target could never be met.
    latency = Topic()
    a_day_ago_ms = int(datetime.now(UTC).timestamp() * 1000) - 86_400_000
    earlier = new_state(str(uuid.uuid4()), TENANT, a_day_ago_ms)
    await interview(newly_assigned=True, state=cast(dict[str, Any], earlier), latency=latency)
    (routing,) = latency.sent
    assert routing["duration_ms"] < 60_000


async def test_a_lead_moved_to_another_sdr_before_a_crash_announces_the_move() -> None:
    # Moved off a deactivated SDR, the move committed, then a crash: read again, the router
    # reports it assigned already, and the new SDR never heard of the lead.
    earlier = {**new_state(str(uuid.uuid4()), TENANT, 0), "sdr_id": str(uuid.uuid4())}
    events = await interview(newly_assigned=False, state=cast(dict[str, Any], earlier))
    assert "sdr_assigned" in [event["type"] for event in events.sent]
