"""A tenant without tokens: a HOT leak still alerts and reassigns, only the AI message is
skipped (and recorded as skipped)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from flexoraa.settings import Settings
from streams.rules.leakage import REENGAGEMENT_TEXT
from tests.conftest import MakeTenant, ManagedProcess, StartProcess, start_worker
from tests.integration.conftest import ApiFactory
from tests.integration.test_pipeline import eventually, post

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def worker(processes: StartProcess, test_settings: Settings) -> ManagedProcess:
    return start_worker(
        processes, test_settings, name="paused-worker", LEAK_THRESHOLD_S="2", TIMER_TICK_MS="100"
    )


@pytest.fixture
async def api(api_factory: ApiFactory, worker: ManagedProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with api_factory(worker_url=f"http://127.0.0.1:{worker.ports['web']}") as client:
        yield client


async def test_a_hot_leak_of_a_paused_tenant_alerts_but_skips_the_ai_message(
    api: httpx.AsyncClient, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    # One token: the first interview step spends it and the tenant is paused.
    tenant = await make_tenant(tokens=1)
    sdr = (await api.post("/api/sdrs", headers=tenant.headers,
                          json={"name": "Asha", "email": "asha@example.com"})).json()  # fmt: skip
    text = "Budget is $8k, we want it live in 2 weeks and I'm the founder"
    accepted = await post(api, tenant, channel="webchat", contact=f"p-{uuid.uuid4().hex[:8]}",
                          text=text)  # fmt: skip
    lead_id = accepted["lead_id"]

    async def leak() -> Any:
        return await db.fetchrow("SELECT * FROM lead_leakage_events WHERE lead_id = $1", lead_id)

    row = await eventually(leak, what="the leak of the HOT lead")
    details = json.loads(row["details"])
    assert row["temperature"] == "HOT"
    assert row["action"] == "ai_reengagement"
    assert details["ai_skipped"] == "tokens_exhausted"
    assert "command_id" not in details

    async def alerted() -> Any:
        return await db.fetchval(
            "SELECT count(*) FROM notifications WHERE tenant_id = $1 AND kind = 'lead_leak'"
            " AND recipient = $2",
            tenant.tenant_id,
            f"sdr:{sdr['sdr_id']}",
        )

    assert await eventually(alerted, what="the SDR's leak alert") >= 1
    reengagements = await db.fetchval(
        "SELECT count(*) FROM messages WHERE lead_id = $1 AND body = $2",
        uuid.UUID(lead_id),
        REENGAGEMENT_TEXT,
    )
    assert reengagements == 0
    balance = (await api.get("/api/tokens/balance", headers=tenant.headers)).json()
    assert balance["paused"] is True
    assert balance["balance"] == 0
