"""Deadlines survive a killed worker: overdue ones fire once on the first tick after recovery."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from flexoraa.settings import Settings
from tests.conftest import MakeTenant, StartProcess, free_port, start_worker
from tests.integration.conftest import ApiFactory
from tests.integration.test_pipeline import eventually, post

pytestmark = pytest.mark.integration
THRESHOLD_S = 3
LEADS = 40


@pytest.fixture
async def api(api_factory: ApiFactory) -> AsyncIterator[httpx.AsyncClient]:
    # Only POSTs go through this API (they need no worker); state is read from PostgreSQL.
    async with api_factory() as client:
        yield client


async def test_deadlines_pending_when_a_worker_is_killed_fire_once_after_restart(
    processes: StartProcess,
    test_settings: Settings,
    api: httpx.AsyncClient,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    port = free_port()
    env = {
        "LEAK_THRESHOLD_S": str(THRESHOLD_S),
        "TIMER_TICK_MS": "200",
        "ENABLE_AI_QUALIFICATION": "false",
        "ENABLE_COLD_RECOVERY": "false",
    }
    first = start_worker(processes, test_settings, name="timers-first", web_port=port, **env)
    tenant = await make_tenant()
    lead_ids = [
        (await post(api, tenant, channel="webchat", contact=f"t-{uuid.uuid4().hex[:8]}",
                    text="hello?"))["lead_id"]
        for _ in range(LEADS)
    ]  # fmt: skip

    async def all_sunk() -> Any:
        count = await db.fetchval(
            "SELECT count(*) FROM leads WHERE tenant_id = $1", tenant.tenant_id
        )
        return count == LEADS

    await eventually(all_sunk, what="every lead processed before the kill")
    await asyncio.sleep(1)  # let the changelogs (deadlines included) be committed
    first.stop(signal.SIGKILL)
    # Every deadline passes while no worker runs.
    await asyncio.sleep(THRESHOLD_S + 2)
    assert (
        await db.fetchval(
            "SELECT count(*) FROM lead_leakage_events WHERE tenant_id = $1", tenant.tenant_id
        )
        == 0
    )
    start_worker(processes, test_settings, name="timers-second", web_port=free_port(), **env)

    async def fired() -> Any:
        rows = await db.fetch(
            "SELECT lead_id, count(*) AS n FROM lead_leakage_events WHERE tenant_id = $1"
            " GROUP BY lead_id",
            tenant.tenant_id,
        )
        return rows if len(rows) == LEADS else None

    await eventually(fired, timeout_s=60, what="every overdue deadline to fire after restart")
    await asyncio.sleep(2)
    rows = await db.fetch(
        "SELECT lead_id, count(*) AS n FROM lead_leakage_events WHERE tenant_id = $1"
        " GROUP BY lead_id",
        tenant.tenant_id,
    )
    assert {str(row["lead_id"]) for row in rows} == set(lead_ids)
    assert all(row["n"] == 1 for row in rows)  # none fired twice
