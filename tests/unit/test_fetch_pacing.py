"""A worker fetch asks the broker for about WORKER_FETCH_PACING_MS of what it has been reading."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import faust
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import BrokerMetadata, ConsumerRecord

from streams.pacing import FetchPacer, record_bytes


def _record(key: bytes | None, value: bytes | None) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="t",
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=-1 if key is None else len(key),
        serialized_value_size=-1 if value is None else len(value),
        headers=(),
    )


def test_a_fetch_counts_key_and_value_bytes_and_nothing_for_a_missing_one() -> None:
    records = {
        TopicPartition("t", 0): [_record(b"k" * 3, b"v" * 100), _record(None, b"v" * 7)],
        TopicPartition("t", 1): [_record(b"k" * 5, None)],
    }
    assert record_bytes(records) == 3 + 100 + 7 + 5


def test_the_minimum_is_the_interval_s_share_of_the_last_window_s_rate() -> None:
    pacer = FetchPacer(interval_s=0.010, max_bytes=1_000_000)
    # 100 reads of 10,000 bytes over one second: 1 MB/s, so 10 ms of it is 10,000 bytes.
    changes = [pacer.read(10_000, now=i / 100) for i in range(100)]
    assert changes == [None] * 100  # the first window has not ended
    assert pacer.read(0, now=1.0) == 10_000
    assert pacer.min_bytes == 10_000


def test_a_steady_rate_leaves_the_minimum_alone() -> None:
    pacer = FetchPacer(interval_s=0.010, max_bytes=1_000_000)
    pacer.read(0, now=0.0)
    assert pacer.read(500_000, now=1.0) == 5_000
    # The same rate in the next window: no change to apply.
    assert pacer.read(500_000, now=2.0) is None
    assert pacer.min_bytes == 5_000


def test_a_backlog_asks_at_most_the_cap() -> None:
    pacer = FetchPacer(interval_s=0.010, max_bytes=64_000)
    pacer.read(0, now=0.0)
    assert pacer.read(500_000_000, now=1.0) == 64_000


def test_a_worker_gone_quiet_asks_for_a_byte_again() -> None:
    pacer = FetchPacer(interval_s=0.010, max_bytes=1_000_000)
    pacer.read(0, now=0.0)
    assert pacer.read(2_000_000, now=1.0) == 20_000
    # Empty fetches count: a window of nothing brings the minimum back to one byte.
    assert pacer.read(0, now=2.5) == 1


def test_a_trickle_asks_for_a_byte() -> None:
    pacer = FetchPacer(interval_s=0.010, max_bytes=1_000_000)
    pacer.read(0, now=0.0)
    # 50 bytes a second: 10 ms of it is half a byte, and a fetch asks at least one.
    assert pacer.read(50, now=1.0) is None
    assert pacer.min_bytes == 1


@pytest.mark.parametrize(
    ("interval_s", "max_bytes", "window_s"), [(-0.01, 10, 1.0), (0.01, 0, 1.0), (0.01, 10, 0.0)]
)
def test_nonsense_pacing_is_refused(interval_s: float, max_bytes: int, window_s: float) -> None:
    with pytest.raises(ValueError, match="required"):
        FetchPacer(interval_s, max_bytes, window_s)


class _Subscriptions:
    @contextlib.contextmanager
    def fetch_context(self) -> Iterator[None]:
        yield


class _Fetcher:
    """What Faust's fetch step uses of aiokafka's fetcher; each call returns `records`."""

    def __init__(self, records: dict[TopicPartition, list[Any]]) -> None:
        self.records = records
        self._closed = False
        self._subscriptions = _Subscriptions()
        self._fetch_min_bytes = 1

    async def fetched_records(self, partitions: Any, **_: Any) -> Any:
        return self.records


class _Clock:
    """The monotonic clock the worker's consumer thread reads, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr("streams.producer.time.monotonic", fake)
    return fake


async def _fetch_for(
    thread: Any,
    consumer: AIOKafkaConsumer,
    fetcher: _Fetcher,
    clock: _Clock,
    *,
    seconds: float,
    per_second: int,
) -> None:
    consumer._fetcher = fetcher
    for _ in range(round(seconds * per_second)):
        assert await thread._fetch_records(consumer, set(), timeout=0) == fetcher.records
        clock.now += 1 / per_second


async def test_the_worker_consumer_asks_its_fetches_for_its_recent_reading(
    worker_app: faust.App, clock: _Clock
) -> None:
    thread = worker_app.consumer._thread  # type: ignore[attr-defined]
    consumer = thread._create_worker_consumer(worker_app.transport)
    try:
        # 200 fetches a second of 2,000 bytes: 400 kB/s, so 4,000 bytes per 10 ms.
        busy = _Fetcher({TopicPartition("t", 0): [_record(b"k" * 10, b"v" * 1_990)]})
        await _fetch_for(thread, consumer, busy, clock, seconds=2.5, per_second=200)
        assert busy._fetch_min_bytes == pytest.approx(4_000, rel=0.01)
        # A quiet worker: two windows later it asks for a byte again.
        quiet = _Fetcher({})
        quiet._fetch_min_bytes = busy._fetch_min_bytes
        await _fetch_for(thread, consumer, quiet, clock, seconds=2.5, per_second=40)
        assert quiet._fetch_min_bytes == 1
    finally:
        consumer._fetcher = None
        await consumer.stop()


async def test_each_broker_is_asked_its_share(worker_app: faust.App, clock: _Clock) -> None:
    thread = worker_app.consumer._thread  # type: ignore[attr-defined]
    consumer = thread._create_worker_consumer(worker_app.transport)
    try:
        # aiokafka sends each broker a fetch of its own partitions, each with the minimum.
        consumer._client.cluster._brokers = {
            node: BrokerMetadata(node, "127.0.0.1", 9092 + node, None) for node in (1, 2)
        }
        busy = _Fetcher({TopicPartition("t", 0): [_record(b"k" * 10, b"v" * 1_990)]})
        await _fetch_for(thread, consumer, busy, clock, seconds=1.5, per_second=200)
        assert busy._fetch_min_bytes == pytest.approx(2_000, rel=0.01)
    finally:
        consumer._fetcher = None
        await consumer.stop()


async def test_no_pacing_leaves_the_fetch_minimum_to_aiokafka(
    worker_app: faust.App, clock: _Clock
) -> None:
    thread = worker_app.consumer._thread  # type: ignore[attr-defined]
    pacing_s, pacer = worker_app.fetch_pacing_s, thread._pacer  # type: ignore[attr-defined]
    worker_app.fetch_pacing_s = 0.0  # type: ignore[attr-defined]
    try:
        consumer = thread._create_worker_consumer(worker_app.transport)
        assert thread._pacer is None
        # What a paced worker would ask 4,000 bytes for (the test above).
        busy = _Fetcher({TopicPartition("t", 0): [_record(b"k" * 10, b"v" * 1_990)]})
        await _fetch_for(thread, consumer, busy, clock, seconds=2.5, per_second=200)
        assert busy._fetch_min_bytes == 1
        consumer._fetcher = None
        await consumer.stop()
    finally:
        worker_app.fetch_pacing_s = pacing_s  # type: ignore[attr-defined]
        thread._pacer = pacer
