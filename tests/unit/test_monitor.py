"""The lean Faust monitor still records what the dashboards read, per topic."""

from __future__ import annotations

import asyncio
from functools import partial

import pytest
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from faust.exceptions import ProducerSendError
from faust.sensors.prometheus import FaustMetrics
from faust.types.tuples import TP
from prometheus_client import CollectorRegistry

from streams.monitor import LeanPrometheusMonitor
from streams.producer import produce, report_undelivered


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
