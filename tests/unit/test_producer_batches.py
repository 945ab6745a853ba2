"""The worker's producer batches: large enough that a busy partition does not hold its senders,
and a send that waited for one is counted."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import faust
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError
from faust.exceptions import ProducerSendError
from prometheus_client import REGISTRY

from streams.producer import produce
from tests.unit.conftest import WORKER_PRODUCER_BATCH_BYTES


def test_the_worker_batches_up_to_the_configured_bytes(worker_app: faust.App) -> None:
    assert worker_app.conf.producer_max_batch_size == WORKER_PRODUCER_BATCH_BYTES


class Producer:
    """aiokafka's `send` as the worker sees it: the record taken at once, or only after the
    partition's full batch went out."""

    def __init__(self, wait_s: float, gives_up: bool = False) -> None:
        self.wait_s = wait_s
        self.gives_up = gives_up

    async def send(self, topic: str, value: bytes | None, **_: Any) -> asyncio.Future[Any]:
        if self.wait_s:
            await asyncio.sleep(self.wait_s)
        if self.gives_up:
            raise KafkaTimeoutError()
        delivered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        return delivered


def blocked_s() -> float:
    return REGISTRY.get_sample_value("flexoraa_producer_blocked_seconds_total") or 0.0


async def test_a_send_that_waited_for_its_batch_is_counted() -> None:
    before = blocked_s()
    await produce(cast(AIOKafkaProducer, Producer(0.05)), None, "topic", b"k", b"v")
    assert blocked_s() - before >= 0.05


async def test_a_send_that_waited_and_gave_up_is_counted_too() -> None:
    before = blocked_s()
    with pytest.raises(ProducerSendError):
        await produce(cast(AIOKafkaProducer, Producer(0.05, gives_up=True)), None, "t", b"k", b"v")
    assert blocked_s() - before >= 0.05


async def test_a_send_taken_at_once_is_not() -> None:
    before = blocked_s()
    for _ in range(10):
        await produce(cast(AIOKafkaProducer, Producer(0)), None, "topic", b"k", b"v")
    assert blocked_s() == before
