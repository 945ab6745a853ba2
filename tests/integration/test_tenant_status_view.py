"""The workers' tenant-status reader against the real broker: loaded means everything written
before it started has been read (a worker answers /ready only then: test_worker_readiness)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from flexoraa.settings import Settings
from schemas.tokens import TenantStatus
from streams.agents.tokens import TenantStatusView


@pytest.fixture
async def status_topic(test_settings: Settings) -> AsyncIterator[str]:
    """A fresh topic of the lead topics' partition count, deleted afterwards."""
    name = f"{test_settings.topic_prefix}.statuses-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=test_settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, test_settings.kafka_partitions, 1)])
        yield name
        await admin.delete_topics([name])
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def reading(view: TenantStatusView) -> AsyncIterator[None]:
    task = asyncio.create_task(view.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def write_statuses(settings: Settings, topic: str, statuses: list[TenantStatus]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        for status in statuses:
            await producer.send(
                topic, key=status.tenant_id.encode(), value=status.model_dump_json().encode()
            )
        await producer.flush()
    finally:
        await producer.stop()


async def test_an_empty_topic_is_loaded(test_settings: Settings, status_topic: str) -> None:
    view = TenantStatusView(
        test_settings.kafka_bootstrap_servers, status_topic, test_settings.kafka_partitions
    )
    assert not view.is_loaded()
    async with reading(view):
        await asyncio.wait_for(view.wait_loaded(), 30)
        assert view.is_loaded()


async def test_loaded_once_every_earlier_status_is_read(
    test_settings: Settings, status_topic: str
) -> None:
    tenants = [str(uuid.uuid4()) for _ in range(40)]
    now = datetime.now(UTC)
    await write_statuses(test_settings, status_topic, [
        TenantStatus(tenant_id=tenant_id, balance=i, paused=i % 2 == 0, updated_at=now)
        for i, tenant_id in enumerate(tenants)
    ])  # fmt: skip

    view = TenantStatusView(
        test_settings.kafka_bootstrap_servers, status_topic, test_settings.kafka_partitions
    )
    async with reading(view):
        await asyncio.wait_for(view.wait_loaded(), 30)
        assert view.is_loaded()
        # Loaded is set only once the reader's position passed every partition's end offset
        # as it was when the reader started: all forty are there.
        assert [view.status(t) is not None for t in tenants] == [True] * len(tenants)
        assert [view.is_paused(t) for t in tenants] == [i % 2 == 0 for i in range(len(tenants))]


async def test_a_restarted_reader_goes_on_from_where_it_was(
    test_settings: Settings, status_topic: str
) -> None:
    # It read the topic from the beginning again, keeping what it knew: the older statuses
    # in the uncompacted head set the tenant back (paused after its top-up) until it caught up.
    tenant_id = str(uuid.uuid4())
    await write_statuses(test_settings, status_topic, [
        TenantStatus(tenant_id=tenant_id, balance=balance, paused=paused,
                     updated_at=datetime.now(UTC))
        for balance, paused in ((0, True), (500, False))
    ])  # fmt: skip
    view = TenantStatusView(
        test_settings.kafka_bootstrap_servers, status_topic, test_settings.kafka_partitions
    )
    async with reading(view):
        await asyncio.wait_for(view.wait_loaded(), 30)
    assert not view.is_paused(tenant_id)
    seen: list[bool] = []
    view.on_change(lambda status: seen.append(status.paused))
    async with reading(view):  # the reader's restart after a failure
        await asyncio.sleep(2)
    assert seen == []
    assert not view.is_paused(tenant_id)
