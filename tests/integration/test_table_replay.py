"""A restarted worker rebuilds its tables from the changelogs, a fetch at a time
(streams.replay), into exactly the state the stopped worker had."""

from __future__ import annotations

import asyncio
import re
import signal
import uuid
from functools import partial
from typing import Any

import httpx
import pytest

from bench.restart import changelog_records
from flexoraa.kafka import delete_topics, ensure_topics
from flexoraa.settings import Settings
from schemas.topics import TopicNames
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


async def test_a_worker_replays_compacted_changelogs_into_the_same_tables(
    processes: StartProcess,
    test_settings: Settings,
    api_factory: ApiFactory,
    make_tenant: MakeTenant,
) -> None:
    """Compaction leaves gaps in a changelog's offsets and keeps only each key's last value:
    the replay must still end, and end in the same state."""
    settings = test_settings.model_copy(
        update={
            "topic_prefix": f"{test_settings.topic_prefix}-compacted",
            # Segments roll at the first write a second after they opened, so the cleaner
            # (every 15 s) can compact all but the newest.
            "changelog_segment_ms": 1000,
            "changelog_segment_bytes": 1024 * 1024,
        }
    )
    sessions_changelog = TopicNames(settings.topic_prefix).changelog("sessions")
    await ensure_topics(settings)
    try:
        first = start_worker(processes, settings, name="compacted-first")
        first_url = f"http://127.0.0.1:{first.ports['web']}"
        tenant = await make_tenant()
        contacts = [f"compacted-{uuid.uuid4().hex[:8]}" for _ in range(LEADS)]
        async with api_factory(topic_prefix=settings.topic_prefix) as api:
            lead_ids = [
                (await post(api, tenant, channel="webchat", contact=contact, text="hello"))[
                    "lead_id"
                ]
                for contact in contacts
            ]

            async def applied(count: int) -> Any:
                state = await table_state(first_url, lead_ids)
                if state is None:
                    return None
                done = all(lead["session"]["message_count"] == count for lead in state.values())
                return state if done else None

            for wave in range(2, 5):
                await eventually(partial(applied, wave - 1), timeout_s=60, what="a wave")
                await asyncio.sleep(1.2)  # the next wave's writes roll the segments
                for i, contact in enumerate(contacts):
                    await post(api, tenant, channel="webchat", contact=contact,
                               text=f"message {wave}, budget {i}k")  # fmt: skip
            before = await eventually(partial(applied, 4), timeout_s=60, what="every message")

        async def compacted() -> tuple[int, int] | None:
            left, written = await changelog_records(
                settings.kafka_bootstrap_servers, [sessions_changelog], settings.kafka_partitions
            )
            return (left, written) if left < written else None

        left, _ = await eventually(compacted, timeout_s=60, what="the log cleaner")
        first.stop(signal.SIGTERM)

        second = start_worker(processes, settings, name="compacted-second")
        second_url = f"http://127.0.0.1:{second.ports['web']}"
        assert await table_state(second_url, lead_ids) == before
        # At least the sessions changelog's records left (the counter covers every table).
        assert await replayed(second_url) >= left
    finally:
        await delete_topics(settings)
