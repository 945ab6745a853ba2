"""A metadata update that reaches no broker returns only after the client's retry backoff.

aiokafka's producer asks for a new update the moment a failed one returns while it holds
batches for a partition without a known leader: with the broker down, a worker under load made
5,000 to 7,000 attempts a second and spent a core on them. The clients the worker builds back
off, longer with each failure up to a second as Kafka's Java client does, and each counts as
failing until an update succeeds or it closes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import faust
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.client import AIOKafkaClient
from prometheus_client import REGISTRY

from flexoraa.kafka import (
    RETRY_BACKOFF_JITTER,
    RETRY_BACKOFF_MAX_S,
    RetryBackoff,
    acknowledged_producer,
    back_off_failed_metadata_updates,
)
from flexoraa.settings import Settings


def sample(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    assert value is not None, name
    return value


def failures() -> float:
    return sample("flexoraa_kafka_metadata_failures_total")


def failing() -> float:
    return sample("flexoraa_kafka_clients_failing")


def unstarted_client(backoff_ms: int) -> AIOKafkaClient:
    """A client that was never started: it knows no broker, so an update fails at once."""
    return AIOKafkaClient(bootstrap_servers="127.0.0.1:1", retry_backoff_ms=backoff_ms)


async def failed_update_duration(client: AIOKafkaClient) -> float:
    """Seconds one failed metadata update took; it is counted."""
    before = failures()
    started = time.monotonic()
    updated = await client._metadata_update(client.cluster, set())
    elapsed = time.monotonic() - started
    assert updated is False
    assert failures() == before + 1
    return elapsed


# The shortest first wait a client with this retry backoff makes, jitter included.
def shortest_first_wait(backoff_s: float) -> float:
    return backoff_s * (1 - RETRY_BACKOFF_JITTER)


def test_the_backoff_doubles_up_to_its_maximum() -> None:
    backoff = RetryBackoff(first_s=0.1, max_s=1.0)
    waits = [backoff.next_wait(0.0) for _ in range(7)]
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_a_success_starts_the_backoff_again() -> None:
    backoff = RetryBackoff(first_s=0.1, max_s=1.0)
    for _ in range(5):
        backoff.next_wait(0.0)
    backoff.reset()
    assert backoff.next_wait(0.0) == pytest.approx(0.1)


def test_jitter_moves_a_wait_either_way_but_never_above_the_maximum() -> None:
    backoff = RetryBackoff(first_s=0.1, max_s=1.0)
    assert backoff.next_wait(-1.0) == pytest.approx(0.1 * (1 - RETRY_BACKOFF_JITTER))
    assert backoff.next_wait(1.0) == pytest.approx(0.2 * (1 + RETRY_BACKOFF_JITTER))
    assert backoff.next_wait(5.0) == pytest.approx(0.4 * (1 + RETRY_BACKOFF_JITTER))  # clamped
    for _ in range(3):
        backoff.next_wait(0.0)
    assert backoff.next_wait(1.0) == 1.0
    assert backoff.next_wait(-1.0) == pytest.approx(1.0 - RETRY_BACKOFF_JITTER)


def test_a_long_outage_does_not_overflow_the_backoff() -> None:
    backoff = RetryBackoff(first_s=0.1, max_s=1.0)
    for _ in range(5_000):
        assert backoff.next_wait(0.0) <= 1.0


def test_a_backoff_that_ends_before_it_starts_is_refused() -> None:
    with pytest.raises(ValueError, match="backoff from"):
        RetryBackoff(first_s=2.0, max_s=1.0)
    with pytest.raises(ValueError, match="backoff from"):
        RetryBackoff(first_s=-0.1, max_s=1.0)


async def test_a_failed_update_waits_out_the_retry_backoff() -> None:
    client = back_off_failed_metadata_updates(unstarted_client(backoff_ms=300))
    assert await failed_update_duration(client) >= shortest_first_wait(0.3)
    await client.close()


async def test_each_failure_in_a_row_waits_longer() -> None:
    # 100 ms, then 200, then 400: the third wait is at least 0.4 * 0.8 s, where a fixed backoff
    # would wait 0.1 s again.
    client = back_off_failed_metadata_updates(unstarted_client(backoff_ms=100))
    await failed_update_duration(client)
    await failed_update_duration(client)
    assert await failed_update_duration(client) >= 0.4 * (1 - RETRY_BACKOFF_JITTER)
    await client.close()


async def test_a_retry_backoff_above_the_maximum_is_used_as_it_is() -> None:
    backoff_s = RETRY_BACKOFF_MAX_S + 0.5
    client = back_off_failed_metadata_updates(unstarted_client(backoff_ms=int(backoff_s * 1000)))
    assert await failed_update_duration(client) >= shortest_first_wait(backoff_s)
    await client.close()


async def test_wrapping_twice_backs_off_once() -> None:
    client = unstarted_client(backoff_ms=1000)
    back_off_failed_metadata_updates(back_off_failed_metadata_updates(client))
    # One backoff waits at most 1.2 s with its jitter; two would wait at least 1.6 s.
    assert await failed_update_duration(client) < 1.6
    await client.close()


async def test_a_client_counts_as_failing_until_an_update_succeeds() -> None:
    client = unstarted_client(backoff_ms=10_000)
    outcomes = iter([False, False, True])

    async def update(cluster: Any, topics: Any) -> bool:
        return next(outcomes)

    client._metadata_update = update  # what aiokafka's update answers, in turn
    back_off_failed_metadata_updates(client)
    before = failing()
    first = asyncio.create_task(client._metadata_update(client.cluster, set()))
    await asyncio.sleep(0.05)
    assert failing() == before + 1  # counted at once, before the backoff
    first.cancel()  # the client closing during its backoff
    second = asyncio.create_task(client._metadata_update(client.cluster, set()))
    await asyncio.sleep(0.05)
    assert failing() == before + 1  # one client, however many failures
    second.cancel()
    # A success returns without the backoff (10 s here) and clears the client.
    assert await asyncio.wait_for(client._metadata_update(client.cluster, set()), 5) is True
    assert failing() == before


async def test_a_failing_client_asks_for_another_update_after_its_backoff() -> None:
    client = back_off_failed_metadata_updates(unstarted_client(backoff_ms=1))
    assert client._md_update_fut is None  # nothing asked for an update
    await client._metadata_update(client.cluster, set())
    await asyncio.sleep(0)  # the request is made once the failed update has ended
    assert client._md_update_fut is not None
    await client.close()


async def test_a_failing_client_that_closes_no_longer_counts() -> None:
    client = back_off_failed_metadata_updates(unstarted_client(backoff_ms=1))
    before = failing()
    await client._metadata_update(client.cluster, set())
    assert failing() == before + 1
    await client.close()
    assert failing() == before


async def test_the_workers_consumer_and_producer_back_off(worker_app: faust.App) -> None:
    thread: Any = worker_app.consumer._thread  # type: ignore[attr-defined]
    # Built, not started: no connection is made.
    consumer = thread._create_worker_consumer(worker_app.transport)
    assert isinstance(consumer, AIOKafkaConsumer)
    producer = worker_app.producer._new_producer()  # type: ignore[attr-defined]
    assert isinstance(producer, AIOKafkaProducer)
    try:
        for client in (consumer._client, producer.client):
            assert client._retry_backoff > 0
            assert await failed_update_duration(client) >= shortest_first_wait(
                client._retry_backoff
            )
    finally:
        await consumer.stop()
        await producer.client.close()


async def test_the_apis_producers_back_off() -> None:
    # The publisher's (API, Gmail poller, SLA prober) and the latency recorder's.
    producer = acknowledged_producer(Settings(), linger_ms=0)
    try:
        backoff_s = producer.client._retry_backoff
        assert backoff_s > 0
        assert await failed_update_duration(producer.client) >= shortest_first_wait(backoff_s)
    finally:
        await producer.client.close()
