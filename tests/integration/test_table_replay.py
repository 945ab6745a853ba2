"""A restarted worker rebuilds its tables from the changelogs, a fetch at a time
(streams.replay), into exactly the state the stopped worker had."""

from __future__ import annotations

import re
import signal
import uuid
from typing import Any

import httpx
import pytest

from flexoraa.settings import Settings
from tests.conftest import MakeTenant, StartProcess, start_worker
from tests.integration.conftest import ApiFactory
from tests.integration.test_pipeline import eventually, post

pytestmark = pytest.mark.integration
LEADS = 30
_REPLAYED = re.compile(r"^flexoraa_changelog_records_replayed_total (\S+)$", re.M)


async def replayed(worker_url: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{worker_url}/metrics")).text
    match = _REPLAYED.search(text)
    assert match is not None, "flexoraa_changelog_records_replayed_total is not exported"
    return float(match.group(1))


async def table_state(worker_url: str, lead_ids: list[str]) -> dict[str, Any] | None:
    """Each lead's state in the worker's tables, or None while one is not there yet."""
    async with httpx.AsyncClient() as client:
        answers = {lead_id: await client.get(f"{worker_url}/internal/leads/{lead_id}")
                   for lead_id in lead_ids}  # fmt: skip
    if any(answer.status_code == 404 for answer in answers.values()):
        return None
    assert all(answer.status_code == 200 for answer in answers.values())
    return {lead_id: answer.json() for lead_id, answer in answers.items()}


async def test_a_restarted_worker_replays_the_changelogs_into_the_same_tables(
    processes: StartProcess,
    test_settings: Settings,
    api_factory: ApiFactory,
    make_tenant: MakeTenant,
) -> None:
    first = start_worker(processes, test_settings, name="replay-first")
    first_url = f"http://127.0.0.1:{first.ports['web']}"
    tenant = await make_tenant()
    async with api_factory() as api:
        lead_ids = []
        for i in range(LEADS):
            contact = f"replay-{uuid.uuid4().hex[:8]}"
            accepted = await post(api, tenant, channel="webchat", contact=contact, text="hello")
            await post(api, tenant, channel="webchat", contact=contact, text=f"budget {i}k")
            lead_ids.append(accepted["lead_id"])

    async def applied() -> Any:
        state = await table_state(first_url, lead_ids)
        if state is None:
            return None
        done = all(lead["session"]["message_count"] == 2 and lead["qualification"]
                   for lead in state.values())  # fmt: skip
        return state if done else None

    before = await eventually(applied, timeout_s=60, what="every message applied")
    first.stop(signal.SIGTERM)

    # The first worker may have replayed too: the session's topics hold earlier tests' records.
    second = start_worker(processes, test_settings, name="replay-second")
    second_url = f"http://127.0.0.1:{second.ports['web']}"
    # Ready means recovered: the tables answer from the replayed state at once.
    after = await table_state(second_url, lead_ids)
    assert after == before
    # Through the batched replay: every lead's session record, at least, went through it.
    assert await replayed(second_url) >= LEADS
