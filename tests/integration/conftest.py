from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from api.main import create_app
from flexoraa.settings import Settings
from tests.conftest import free_port, settings_env
from tests.fakes.graph_api import GraphApiFake

pytestmark = pytest.mark.integration

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def api_factory(test_settings: Settings) -> ApiFactory:
    """An in-process API (lifespan and all) on this session's settings, with overrides."""

    @asynccontextmanager
    async def start(**overrides: object) -> AsyncIterator[httpx.AsyncClient]:
        settings = test_settings.model_copy(update=overrides)
        app = create_app(settings)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://api", timeout=30
            ) as client,
        ):
            yield client

    return start


@pytest.fixture
async def api(api_factory: ApiFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with api_factory() as client:
        yield client


@pytest.fixture(scope="module")
async def graph() -> AsyncIterator[GraphApiFake]:
    """A local server speaking the Graph API's send endpoints, one per test module."""
    fake = GraphApiFake()
    await fake.start(free_port())
    yield fake
    await fake.stop()


async def send_records(settings: Settings, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """Produces (key, value) records to `topic` in order, each acknowledged: what another
    producer (a replay, a broken client) could write, past the API's checks."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def read_records(settings: Settings, topics: list[str]) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of `topics` up to their end offsets at the call, in offset order per
    partition."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        # Workers may run with exactly_once: records of aborted transactions are not effects.
        isolation_level="read_committed",
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        partitions = [
            TopicPartition(topic, p) for topic in topics for p in range(settings.kafka_partitions)
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        # Up to the end offsets of now: everything produced before the call.
        ends = await consumer.end_offsets(partitions)
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                records.extend(messages)
    finally:
        await consumer.stop()
    return records


async def read_topic(
    settings: Settings, topics: list[str], tenant_id: str | None = None
) -> list[tuple[str, bytes, bytes]]:
    """Every record of `topics` (optionally one tenant's): (topic, key, value)."""
    return [
        (m.topic, m.key, m.value)
        for m in await read_records(settings, topics)
        if tenant_id is None or m.key == tenant_id.encode()
    ]


def flexoraa(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """The operator's command line, as a newcomer runs it."""
    return subprocess.run(
        [sys.executable, "-m", "flexoraa", *args],
        env=settings_env(settings), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def webhook_letters(settings: Settings, source: str) -> list[tuple[str, bytes]]:
    """The operator's view of what the API set aside from `source`: (reason, raw bytes)."""
    done = flexoraa(settings, "dead-letters", "list", "--json", "--source", f"webhook:{source}")
    assert done.returncode == 0, done.stderr
    letters = [json.loads(line) for line in done.stdout.splitlines()]
    return [(letter["reason"], base64.b64decode(letter["raw_base64"])) for letter in letters]
