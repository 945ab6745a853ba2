"""Per-lead timers at scale: thousands of deadlines survive kill -9, and deadlines pending
during a rebalance between two workers fire exactly once.

"Fired" is counted on the lead-events topic (every `leak_detected` record), not in PostgreSQL,
whose unique keys would hide a second firing.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaProducer

from flexoraa.settings import Settings
from schemas.events import InboundMessage
from schemas.messaging import LeadEvent
from schemas.topics import TopicNames
from streams.rules.identity import lead_id_for
from tests.conftest import MakeTenant, StartProcess, free_port, http_get_json, start_worker
from tests.integration.conftest import read_topic
from tests.integration.test_pipeline import eventually

pytestmark = pytest.mark.integration
ENV = {
    "TIMER_TICK_MS": "200",
    "ENABLE_AI_QUALIFICATION": "false",
    "ENABLE_COLD_RECOVERY": "false",
    "ENABLE_SLA_MONITORING": "false",
}


async def produce_leads(settings: Settings, tenant_id: str, count: int) -> list[str]:
    """One unanswered message per lead, straight to the inbound topic (as the API would)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all",
                                linger_ms=10)  # fmt: skip
    await producer.start()
    topic = TopicNames(settings.topic_prefix).inbound_messages
    leads: list[str] = []
    try:
        for i in range(count):
            contact = f"scale-{uuid.uuid4().hex[:10]}@example.com"
            lead_id = lead_id_for(tenant_id, "webchat", contact)
            now = datetime.now(UTC)
            message = InboundMessage(
                event_id=str(uuid.uuid4()), tenant_id=tenant_id, occurred_at=now,
                lead_id=lead_id, channel="webchat", contact=contact, text=f"hello {i}?",
                received_at=now,
            )  # fmt: skip
            await producer.send(
                topic, key=lead_id.encode(), value=message.model_dump_json().encode()
            )
            leads.append(lead_id)
        await producer.flush()
    finally:
        await producer.stop()
    return leads


async def leaks_fired(settings: Settings, leads: list[str]) -> Counter[str]:
    wanted = set(leads)
    records = await read_topic(settings, [TopicNames(settings.topic_prefix).lead_events])
    fired: Counter[str] = Counter()
    for _, key, value in records:
        if key.decode() in wanted:
            event = LeadEvent.model_validate_json(value)
            if event.type == "leak_detected":
                fired[event.lead_id] += 1
    return fired


async def test_thousands_of_deadlines_survive_kill_9_none_missed_none_twice(
    processes: StartProcess, test_settings: Settings, make_tenant: MakeTenant
) -> None:
    tenant = await make_tenant()
    threshold_s = 20
    env = {**ENV, "LEAK_THRESHOLD_S": str(threshold_s)}
    first = start_worker(processes, test_settings, name="scale-first", web_port=free_port(), **env)
    leads = await produce_leads(test_settings, tenant.tenant_id, 3000)

    async def all_waiting() -> bool:
        # Every lead's message applied (the sessions changelog is written with the deadline).
        url = f"http://127.0.0.1:{first.ports['web']}/internal/leads"
        return all(http_get_json(f"{url}/{lead}")[0] == 200 for lead in leads[-20:])

    await eventually(all_waiting, timeout_s=60, what="the last leads applied")
    await asyncio.sleep(2)  # changelog writes flushed
    first.stop(signal.SIGKILL)
    assert await leaks_fired(test_settings, leads) == Counter()  # nothing was due yet
    await asyncio.sleep(threshold_s)  # every deadline passes while no worker runs
    start_worker(processes, test_settings, name="scale-second", web_port=free_port(), **env)

    async def every_lead_fired() -> Counter[str] | None:
        fired = await leaks_fired(test_settings, leads)
        return fired if len(fired) == len(leads) else None

    await eventually(every_lead_fired, timeout_s=120, what="all 3000 overdue deadlines")
    await asyncio.sleep(3)
    fired = await leaks_fired(test_settings, leads)
    assert set(fired) == set(leads)
    assert set(fired.values()) == {1}


async def test_deadlines_pending_during_a_rebalance_fire_exactly_once(
    processes: StartProcess, test_settings: Settings, make_tenant: MakeTenant
) -> None:
    tenant = await make_tenant()
    threshold_s = 25
    env = {**ENV, "LEAK_THRESHOLD_S": str(threshold_s)}
    start_worker(processes, test_settings, name="rebalance-a", web_port=free_port(), **env)
    leads = await produce_leads(test_settings, tenant.tenant_id, 500)
    # A second worker joins while every deadline is pending: half the partitions (and their
    # deadlines) move to it.
    start_worker(processes, test_settings, name="rebalance-b", web_port=free_port(), **env)

    async def every_lead_fired() -> Counter[str] | None:
        fired = await leaks_fired(test_settings, leads)
        return fired if len(fired) == len(leads) else None

    await eventually(every_lead_fired, timeout_s=threshold_s + 60, what="all 500 deadlines")
    await asyncio.sleep(3)
    fired = await leaks_fired(test_settings, leads)
    assert set(fired) == set(leads)
    assert set(fired.values()) == {1}
