"""A worker fetch waits at the broker at most WORKER_FETCH_MAX_WAIT_MS, not Faust's 1.5 s."""

from __future__ import annotations

import faust
from aiokafka import AIOKafkaConsumer

from tests.unit.conftest import WORKER_FETCH_MAX_WAIT_MS


async def test_the_worker_consumer_fetches_with_the_configured_wait(worker_app: faust.App) -> None:
    thread = worker_app.consumer._thread  # type: ignore[attr-defined]
    # Built, not started: no connection is made.
    consumer = thread._create_worker_consumer(worker_app.transport)
    assert isinstance(consumer, AIOKafkaConsumer)
    # What aiokafka hands its fetcher when the consumer starts (Faust's own is 1,500).
    assert consumer._fetch_max_wait_ms == WORKER_FETCH_MAX_WAIT_MS
    await consumer.stop()
