"""The PostgreSQL sink: idempotent batches, and a refused row does not block the others."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from flexoraa.db import create_pool
from flexoraa.settings import Settings
from schemas.events import InboundMessage
from streams.rules.identity import lead_id_for
from streams.sink import InboundMessageSink
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
    assert (
        await db.fetchval("SELECT count(*) FROM messages WHERE event_id = $1", good.event_id) == 1
    )
