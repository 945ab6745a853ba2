"""The lean Faust monitor still records what the dashboards read, per topic."""

from __future__ import annotations

import asyncio
import time
from functools import partial

import faust
import pytest
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from faust.exceptions import ProducerSendError
from faust.sensors.prometheus import FaustMetrics
from faust.types.tuples import TP
from prometheus_client import CollectorRegistry

from streams.monitor import LeanPrometheusMonitor
from streams.producer import lean_monitor, produce, report_undelivered


def test_records_received_and_sent_per_topic_and_committed_offsets() -> None:
    registry = CollectorRegistry()
    monitor = LeanPrometheusMonitor(metrics=FaustMetrics.create(registry, "faust"))
    usage = TP("token-usage", 3)
    for offset in range(3):
        monitor.on_message_in(usage, offset, message=None)  # type: ignore[arg-type]
    monitor.on_send_initiated(None, "ledger", None, 0, 0)  # type: ignore[arg-type]
    monitor.on_tp_commit({usage: 3})

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("faust_messages_received_per_topic_total", topic="token-usage") == 3
    assert sample("faust_topic_messages_sent_total", topic="topic.ledger") == 1
    assert sample("faust_topic_partition_offset_commited", topic="token-usage", partition="3") == 3


def test_each_partitions_stream_is_seen_moving() -> None:
    """What Faust's check that streams are moving reads (each partition's last record in)."""
    monitor = LeanPrometheusMonitor(metrics=FaustMetrics.create(CollectorRegistry(), "faust"))
    events = TP("lead-events", 2)
    before = time.monotonic()
    monitor.on_stream_event_in(events, 7, stream=None, event=None)  # type: ignore[arg-type]
    monitor.stream_taken(TP("token-usage", 1))  # the batch lane's records
    assert set(monitor.stream_inbound_time) == {events, TP("token-usage", 1)}
    assert before <= monitor.stream_inbound_time[events] <= time.monotonic()


async def test_a_record_sent_past_fausts_path_and_not_delivered_is_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    monitor = LeanPrometheusMonitor(metrics=FaustMetrics.create(registry, "faust"))
    delivered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    delivered.add_done_callback(partial(report_undelivered, "lead-events", monitor))
    delivered.set_exception(KafkaTimeoutError("batch expired"))
    await asyncio.sleep(0)  # done callbacks run on the next turn of the loop

    assert registry.get_sample_value("faust_total_error_messages_sent_total") == 1
    assert "record to lead-events not delivered" in caplog.text


class OneShotProducer:
    """aiokafka's producer taking the first record and refusing the next before it is queued
    (as for an oversized one)."""

    def __init__(self) -> None:
        self.taken = 0

    async def send(
        self, topic: str, value: bytes | None, **options: object
    ) -> asyncio.Future[None]:
        if self.taken:
            raise MessageSizeTooLargeError()
        self.taken += 1
        return asyncio.get_running_loop().create_future()


async def test_a_record_counts_as_sent_once_aiokafka_took_it_and_as_an_error_if_it_refused() -> (
    None
):
    registry = CollectorRegistry()
    monitor = LeanPrometheusMonitor(metrics=FaustMetrics.create(registry, "faust"))
    kafka = OneShotProducer()
    await produce(kafka, monitor, "lead-events", b"k", b"{}")
    with pytest.raises(ProducerSendError):
        await produce(kafka, monitor, "lead-events", b"k", b"{}")

    sent = registry.get_sample_value(
        "faust_topic_messages_sent_total", {"topic": "topic.lead-events"}
    )
    assert sent == 1
    assert registry.get_sample_value("faust_total_error_messages_sent_total") == 1


def test_the_batch_lanes_partitions_are_seen_moving(
    worker_app: faust.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer = worker_app.consumer
    # End offsets come from a running consumer; not what this test is about.
    monkeypatch.setattr(consumer, "_track_end_offsets", lambda records: None)
    monitor = lean_monitor(worker_app)
    assert monitor is not None
    usage = TP("unit-worker.token-usage", 4)
    consumer._track_lane_fetch({usage: [object(), object()]})  # type: ignore[attr-defined]
    assert usage in monitor.stream_inbound_time
