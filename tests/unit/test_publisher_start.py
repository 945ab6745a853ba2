"""The API's publisher makes one start attempt at a time while Kafka is unreachable.

A broker host that accepts connections and never answers (as one that drops packets, or a
wedged broker) makes each attempt wait out the produce timeout. Each caller used to make its
own attempt behind a lock, so the Nth of N concurrent requests waited N timeouts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from flexoraa.kafka import EventPublisher, PublishUnavailable
from flexoraa.settings import Settings


class Tarpit:
    """A TCP server that accepts connections and never answers; it counts them."""

    def __init__(self) -> None:
        self.connections = 0
        self._held: list[asyncio.StreamWriter] = []

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._held.append(writer)

    def close(self) -> None:
        for writer in self._held:
            writer.close()


@pytest.fixture
async def tarpit() -> AsyncIterator[tuple[Tarpit, int]]:
    pit = Tarpit()
    server = await asyncio.start_server(pit.accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield pit, port
    finally:
        pit.close()
        server.close()
        await server.wait_closed()


async def publish_all(publisher: EventPublisher, count: int) -> list[BaseException | None]:
    return await asyncio.gather(
        *(publisher.publish("t", b"k", b"v") for _ in range(count)), return_exceptions=True
    )


@pytest.fixture
async def publisher(tarpit: tuple[Tarpit, int]) -> AsyncIterator[EventPublisher]:
    _, port = tarpit
    publisher = EventPublisher(
        Settings(kafka_bootstrap_servers=f"127.0.0.1:{port}", kafka_produce_timeout_ms=300)
    )
    try:
        yield publisher
    finally:
        await publisher.close()


async def test_concurrent_requests_share_one_start_attempt(
    tarpit: tuple[Tarpit, int], publisher: EventPublisher
) -> None:
    pit, _ = tarpit
    # What one attempt costs the broker: its connections.
    [alone] = await publish_all(publisher, 1)
    assert isinstance(alone, PublishUnavailable)
    one_attempt = pit.connections
    assert one_attempt > 0
    # Within START_RETRY_S of it, refused without an attempt.
    [refused] = await publish_all(publisher, 1)
    assert isinstance(refused, PublishUnavailable)
    assert pit.connections == one_attempt
    await asyncio.sleep(EventPublisher.START_RETRY_S + 0.05)
    # Twenty at once, once the next attempt is due: one attempt, twenty refusals.
    outcomes = await publish_all(publisher, 20)
    assert all(isinstance(outcome, PublishUnavailable) for outcome in outcomes)
    assert pit.connections == 2 * one_attempt


async def test_a_caller_that_gives_up_leaves_the_attempt_to_finish(
    tarpit: tuple[Tarpit, int], publisher: EventPublisher
) -> None:
    """A readiness probe gives up before the start timeout: the attempt goes on, and its
    failure still holds the next callers back."""
    pit, _ = tarpit
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(publisher.is_reachable(), 0.1)
    attempted = pit.connections
    assert attempted > 0
    await asyncio.sleep(0.5)  # the attempt times out (300 ms)
    assert await publisher.is_reachable() is False
    assert pit.connections == attempted


def failing() -> float:
    value = REGISTRY.get_sample_value("flexoraa_kafka_clients_failing")
    assert value is not None
    return value


async def test_a_publisher_that_cannot_start_counts_as_failing(
    tarpit: tuple[Tarpit, int], publisher: EventPublisher
) -> None:
    """Its failed producer is closed, so the publisher itself shows the outage (the alert
    KafkaUnreachable) until it starts one or closes."""
    before = failing()
    await publish_all(publisher, 3)
    assert failing() == before + 1
    await asyncio.sleep(EventPublisher.START_RETRY_S + 0.05)
    await publish_all(publisher, 1)  # fails again: still one
    assert failing() == before + 1
    await publisher.close()
    assert failing() == before
