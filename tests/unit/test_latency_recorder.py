"""The latency recorder's hot path: O(1) appends, bounded buffer, outcomes of measured blocks,
and how a flush counts what it produced."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from flexoraa.latency import (
    LATENCY_EVENTS_DROPPED,
    LATENCY_EVENTS_SENT,
    LATENCY_EVENTS_UNATTRIBUTED,
    LatencyRecorder,
)
from flexoraa.settings import Settings
from schemas.latency import NO_TENANT, LatencyEvent


def _recorder(**overrides: object) -> LatencyRecorder:
    settings = Settings(environment="test", **overrides)  # type: ignore[arg-type]
    return LatencyRecorder(settings, "test.latency")


def test_the_buffer_is_bounded_and_drops_the_oldest_counting_them() -> None:
    recorder = _recorder(latency_buffer_max=3)
    before = LATENCY_EVENTS_DROPPED.labels("buffer_full")._value.get()
    for i in range(5):
        recorder.record("api_request", float(i))
    assert len(recorder) == 3
    assert [item.duration_ms for item in recorder._buffer] == [2.0, 3.0, 4.0]
    assert LATENCY_EVENTS_DROPPED.labels("buffer_full")._value.get() - before == 2


TENANT = "5d1b8a52-3c4e-4f0a-9b7d-2e6f8c1a0b93"


def test_measure_records_ok_failed_and_raised_blocks() -> None:
    recorder = _recorder()
    with recorder.measure("verification", tenant_id=TENANT):
        pass
    with recorder.measure("verification") as measured:
        measured.fail("signature check unavailable")
    with pytest.raises(ValueError, match="boom"), recorder.measure("verification"):
        raise ValueError("boom")
    items = list(recorder._buffer)
    assert [item.ok for item in items] == [True, False, False]
    assert [item.tenant_id for item in items] == [TENANT, NO_TENANT, NO_TENANT]
    assert items[1].detail == "signature check unavailable"
    assert items[2].detail == "ValueError"
    assert all(item.duration_ms >= 0 for item in items)


def test_a_tenant_id_that_is_not_a_tenants_uuid_is_recorded_platform_wide_and_counted() -> None:
    recorder = _recorder()
    before = LATENCY_EVENTS_UNATTRIBUTED._value.get()
    for tenant_id in ("t1", TENANT.upper(), "latency-1", TENANT):
        recorder.record("api_request", 1.0, tenant_id=tenant_id)
    assert [item.tenant_id for item in recorder._buffer] == [NO_TENANT] * 3 + [TENANT]
    assert LATENCY_EVENTS_UNATTRIBUTED._value.get() - before == 3
    # Every queued event is one the SLA agent will accept.
    for item in recorder._buffer:
        LatencyEvent.model_validate_json(recorder._encode(item))


async def test_measure_works_as_an_async_context_manager() -> None:
    recorder = _recorder()
    async with recorder.measure("ai_message", tenant_id=TENANT):
        pass
    assert recorder._buffer[0].operation == "ai_message"


def test_nothing_is_buffered_when_sla_monitoring_is_off() -> None:
    recorder = _recorder(enable_sla_monitoring=False)
    recorder.record("api_request", 1.0)
    assert len(recorder) == 0


class _Batch:
    """Takes `room` records, then is full (aiokafka's BatchBuilder answers None)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.records: list[bytes] = []

    def append(self, *, key: bytes, value: bytes, timestamp: None) -> object | None:
        if len(self.records) == self.room:
            return None
        self.records.append(value)
        return object()


class _Producer:
    """Two partitions; the Nth batch handed over is acknowledged, refused or never answered,
    as `outcomes[N]` says."""

    def __init__(self, room: int, outcomes: list[str]) -> None:
        self.room = room
        self.outcomes = outcomes
        self.handed: list[tuple[int, _Batch, asyncio.Future[object]]] = []
        self.stopped = False

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1}

    def create_batch(self) -> _Batch:
        return _Batch(self.room)

    async def send_batch(
        self, batch: _Batch, topic: str, *, partition: int
    ) -> asyncio.Future[object]:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        outcome = self.outcomes[len(self.handed)]
        if outcome == "acknowledged":
            future.set_result(object())
        elif outcome == "refused":
            future.set_exception(KafkaError("refused"))
        self.handed.append((partition, batch, future))
        return future

    async def stop(self) -> None:
        self.stopped = True


def _counts() -> tuple[float, float]:
    return (
        LATENCY_EVENTS_SENT.labels("api_request")._value.get(),
        LATENCY_EVENTS_DROPPED.labels("kafka")._value.get(),
    )


async def test_a_flush_counts_each_batch_by_its_own_outcome() -> None:
    recorder = _recorder(kafka_produce_timeout_ms=100)
    # 4 + 4 + 2 events, all on api_request's partition: the first batch is acknowledged, the
    # second refused, the third never answered (the flush gives up after 100 ms).
    producer = _Producer(room=4, outcomes=["acknowledged", "refused", "unanswered"])
    recorder._producer = cast(AIOKafkaProducer, producer)
    for i in range(10):
        recorder.record("api_request", float(i))
    sent_before, dropped_before = _counts()
    await recorder.flush()
    assert [len(batch.records) for _, batch, _ in producer.handed] == [4, 4, 2]
    assert len({partition for partition, _, _ in producer.handed}) == 1
    sent_after, dropped_after = _counts()
    assert sent_after - sent_before == 4
    assert dropped_after - dropped_before == 6
    assert producer.stopped  # a flush that timed out starts a new producer next time
    assert recorder._producer is None
    assert len(recorder) == 0
