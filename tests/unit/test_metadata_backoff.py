"""A metadata update that reaches no broker returns only after the client's retry backoff.

aiokafka's producer asks for a new update the moment a failed one returns while it holds
batches for a partition without a known leader: with the broker down, a worker under load made
7,000 attempts a second and spent a core on them. The clients the worker builds back off.
"""

from __future__ import annotations

import time
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.client import AIOKafkaClient

from flexoraa.kafka import METADATA_FAILURES, back_off_failed_metadata_updates


async def failed_update_duration(client: AIOKafkaClient) -> float:
    """Seconds one metadata update took; the client was never started, so it knows no broker
    and the update fails at once (before the backoff)."""
    failures = METADATA_FAILURES._value.get()
    started = time.monotonic()
    updated = await client._metadata_update(client.cluster, set())
    elapsed = time.monotonic() - started
    assert updated is False
    assert METADATA_FAILURES._value.get() == failures + 1
    return elapsed


async def test_a_failed_update_waits_out_the_retry_backoff() -> None:
    client = AIOKafkaClient(bootstrap_servers="127.0.0.1:1", retry_backoff_ms=300)
    back_off_failed_metadata_updates(client)
    assert await failed_update_duration(client) >= 0.3


async def test_the_workers_consumer_and_producer_back_off(worker_app: faust.App) -> None:
    thread: Any = worker_app.consumer._thread  # type: ignore[attr-defined]
    # Built, not started: no connection is made.
    consumer = thread._create_worker_consumer(worker_app.transport)
    assert isinstance(consumer, AIOKafkaConsumer)
    producer = worker_app.producer._new_producer()  # type: ignore[attr-defined]
    assert isinstance(producer, AIOKafkaProducer)
    try:
        for client in (consumer._client, producer.client):
            assert await failed_update_duration(client) >= client._retry_backoff > 0
    finally:
        await consumer.stop()
