"""The PostgreSQL sinks: idempotent batches, and a refused row does not block the others."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from flexoraa.db import create_pool
from flexoraa.settings import Settings
from schemas.events import InboundMessage
from schemas.messaging import LeadEvent
from streams.rules.identity import lead_id_for
from streams.sink import InboundMessageSink, LeadEventSink
from tests.conftest import MakeTenant

pytestmark = pytest.mark.integration


@pytest.fixture
async def sink(test_settings: Settings) -> AsyncIterator[InboundMessageSink]:
    pool = await create_pool(test_settings)

    async def pool_factory() -> asyncpg.Pool:
        return pool

    yield InboundMessageSink(pool_factory)
    await pool.close()


def message(tenant_id: str, contact: str, minute: int, text: str = "hi") -> InboundMessage:
    at = datetime(2026, 11, 24, 10, 0, tzinfo=UTC) + timedelta(minutes=minute)
    return InboundMessage(
        event_id=str(uuid.uuid4()),
        tenant_id=tenant_id,
        occurred_at=at,
        lead_id=lead_id_for(tenant_id, "sms", contact),
        channel="sms",
        contact=contact,
        text=text,
        received_at=at,
    )


async def test_a_replayed_batch_changes_nothing(
    sink: InboundMessageSink, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    tenant = await make_tenant()
    batch = [message(tenant.tenant_id, "5554000001", m) for m in (2, 0, 1)]
    batch.append(message(tenant.tenant_id, "5554000002", 5))
    assert await sink.write(batch) == []
    before = await db.fetch(
        "SELECT lead_id, first_seen_at, last_activity_at FROM leads WHERE tenant_id = $1 "
        "ORDER BY lead_id",
        tenant.tenant_id,
    )
    assert await sink.write(batch) == []
    assert await sink.write(list(reversed(batch))) == []
    after = await db.fetch(
        "SELECT lead_id, first_seen_at, last_activity_at FROM leads WHERE tenant_id = $1 "
        "ORDER BY lead_id",
        tenant.tenant_id,
    )
    assert after == before
    count = await db.fetchval(
        "SELECT count(*) FROM messages WHERE tenant_id = $1", tenant.tenant_id
    )
    assert count == 4
    first = next(row for row in after if str(row["lead_id"]) == batch[0].lead_id)
    assert first["first_seen_at"] == batch[1].occurred_at
    assert first["last_activity_at"] == batch[0].occurred_at


async def test_a_row_postgres_refuses_is_returned_and_the_rest_is_written(
    sink: InboundMessageSink, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    tenant = await make_tenant()
    good = message(tenant.tenant_id, "5554000003", 0)
    orphan = message(str(uuid.uuid4()), "5554000004", 0)  # no such tenant
    rejected = await sink.write([good, orphan])
    assert [r.message.event_id for r in rejected] == [orphan.event_id]
    assert "database refused" in rejected[0].reason
    assert rejected[0].kind == "sink_rejected"
    assert (
        await db.fetchval("SELECT count(*) FROM messages WHERE event_id = $1", good.event_id) == 1
    )


def lead_event(tenant_id: str, lead_id: str, type_: str, minute: int, **data: object) -> LeadEvent:
    at = datetime(2026, 11, 24, 10, 0, tzinfo=UTC) + timedelta(minutes=minute)
    return LeadEvent(event_id=str(uuid.uuid4()), tenant_id=tenant_id, occurred_at=at,
                     lead_id=lead_id, type=type_, data=data)  # fmt: skip


async def test_lead_events_fill_the_seed_history_tables_once(
    test_settings: Settings, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    tenant = await make_tenant()
    lead = lead_id_for(tenant.tenant_id, "sms", "5554000009")
    sdr_a, sdr_b = str(uuid.uuid4()), str(uuid.uuid4())
    deadline_ms = int(datetime(2026, 11, 24, 10, 5, tzinfo=UTC).timestamp() * 1000)
    batch = [
        lead_event(tenant.tenant_id, lead, "qualification_updated", 0, turn=2,
                   status="in_progress", facts={"budget": "5000"}, score=42.5, sdr_id=None,
                   source="builtin"),
        lead_event(tenant.tenant_id, lead, "leak_detected", 5, temperature="WARM",
                   action="ai_reengagement", waiting_since_ms=deadline_ms - 60_000,
                   deadline_ms=deadline_ms, lateness_ms=12),
        lead_event(tenant.tenant_id, lead, "reassigned", 6, from_sdr_id=sdr_a, to_sdr_id=sdr_b,
                   reason="leak"),
        # An attempt and the reply to it in one batch: the reply is applied after the insert.
        lead_event(tenant.tenant_id, lead, "recovery_attempt", 7, step=1, strategy="nudge",
                   tokens=3),
        lead_event(tenant.tenant_id, lead, "recovery_replied", 8, step=1),
        lead_event(tenant.tenant_id, lead, "recovery_replied", 9, step=1),
    ]  # fmt: skip
    pool = await create_pool(test_settings)

    async def pool_factory() -> asyncpg.Pool:
        return pool

    sink = LeadEventSink(pool_factory)
    try:
        for _ in range(2):  # a replayed batch adds nothing
            assert await sink.write(batch) == []
    finally:
        await pool.close()

    async def rows(query: str) -> list[dict[str, object]]:
        return [dict(row) for row in await db.fetch(query, tenant.tenant_id)]

    assert len(await rows("SELECT 1 FROM lead_events WHERE tenant_id = $1")) == 6
    assert await rows(
        "SELECT turn, status, facts->>'budget' AS budget, score::float AS score, source"
        " FROM lead_qualification_state WHERE tenant_id = $1"
    ) == [{"turn": 2, "status": "in_progress", "budget": "5000", "score": 42.5,
           "source": "builtin"}]  # fmt: skip
    leaks = await rows(
        "SELECT temperature, action, deadline_at, waiting_since, details"
        " FROM lead_leakage_events WHERE tenant_id = $1"
    )
    assert len(leaks) == 1
    assert leaks[0]["temperature"] == "WARM"
    assert leaks[0]["deadline_at"] == datetime(2026, 11, 24, 10, 5, tzinfo=UTC)
    assert leaks[0]["waiting_since"] == datetime(2026, 11, 24, 10, 4, tzinfo=UTC)
    assert json.loads(str(leaks[0]["details"])) == batch[1].data
    assert await rows(
        "SELECT from_sdr_id::text AS f, to_sdr_id::text AS t, reason FROM lead_reassignment_log"
        " WHERE tenant_id = $1"
    ) == [{"f": sdr_a, "t": sdr_b, "reason": "leak"}]
    assert await rows(
        "SELECT step, strategy, status, tokens_spent, replied_at FROM lead_recovery_log"
        " WHERE tenant_id = $1"
    ) == [{"step": 1, "strategy": "nudge", "status": "replied", "tokens_spent": 3,
           "replied_at": batch[4].occurred_at}]  # fmt: skip


async def test_a_recovery_reply_marks_the_attempt_it_answered_not_earlier_sequences(
    test_settings: Settings, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    # Marked by lead and step, a reply to a second sequence's first step also marked the
    # first sequence's, weeks older and never answered.
    tenant = await make_tenant()
    lead = lead_id_for(tenant.tenant_id, "sms", "5554000010")
    older = lead_event(tenant.tenant_id, lead, "recovery_attempt", 0, step=0, strategy="soft")
    newer = lead_event(tenant.tenant_id, lead, "recovery_attempt", 60, step=0, strategy="soft")
    replied = lead_event(tenant.tenant_id, lead, "recovery_replied", 61, step=0,
                         attempt_event_id=newer.event_id)  # fmt: skip
    pool = await create_pool(test_settings)

    async def pool_factory() -> asyncpg.Pool:
        return pool

    try:
        assert await LeadEventSink(pool_factory).write([older, newer, replied]) == []
    finally:
        await pool.close()
    statuses = await db.fetch("SELECT event_id::text, status FROM lead_recovery_log"
                              " WHERE tenant_id = $1", tenant.tenant_id)  # fmt: skip
    assert {r["event_id"]: r["status"] for r in statuses} == {
        older.event_id: "sent",
        newer.event_id: "replied",
    }


async def test_a_lead_event_its_history_table_cannot_take_is_returned_and_the_rest_written(
    test_settings: Settings, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    """A row the statement cannot even be built from (a field missing) failed the whole batch,
    and the worker with it, at every restart."""
    tenant = await make_tenant()
    lead = lead_id_for(tenant.tenant_id, "sms", "5554000010")
    good = lead_event(tenant.tenant_id, lead, "recovery_attempt", 0, step=1, strategy="nudge")
    no_turn = lead_event(tenant.tenant_id, lead, "qualification_updated", 1, status="done")
    bad_step = lead_event(tenant.tenant_id, lead, "recovery_replied", 2, step=[1])
    pool = await create_pool(test_settings)

    async def pool_factory() -> asyncpg.Pool:
        return pool

    try:
        rejected = await LeadEventSink(pool_factory).write([no_turn, good, bad_step])
    finally:
        await pool.close()
    assert {r.message.event_id: r.reason.split(":")[0] for r in rejected} == {
        no_turn.event_id: "row not writable",
        bad_step.event_id: "row not writable",
    }
    assert "KeyError" in rejected[0].reason
    # Counted as a failed processing, not a refusal of the data: the PoisonRecords alert fires.
    assert {r.kind for r in rejected} == {"processing_failed"}
    written = await db.fetch(
        "SELECT event_id FROM lead_events WHERE tenant_id = $1", tenant.tenant_id
    )
    assert [str(row["event_id"]) for row in written] == [good.event_id]
