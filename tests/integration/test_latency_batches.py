"""The latency recorder's batches on the real broker: every event arrives once, on the partition
Kafka's default partitioner gives its operation, and is counted as sent."""

from __future__ import annotations

import uuid

from flexoraa.kafka import partition_of
from flexoraa.latency import LATENCY_EVENTS_DROPPED, LATENCY_EVENTS_SENT, LatencyRecorder
from flexoraa.settings import Settings
from schemas.latency import LatencyEvent
from schemas.topics import TopicNames
from tests.integration.conftest import read_records


def _sent(operation: str) -> float:
    return float(LATENCY_EVENTS_SENT.labels(operation)._value.get())


async def test_a_flush_delivers_every_event_once_on_its_operations_partition(
    test_settings: Settings,
) -> None:
    topic = TopicNames(test_settings.topic_prefix).latency
    recorder = LatencyRecorder(test_settings, topic)
    tenant = str(uuid.uuid4())
    # More than one record batch's worth (16 KiB) for api_request, a few for another operation.
    recorded = [("api_request", float(i)) for i in range(600)]
    recorded += [("verification", float(i)) for i in range(7)]
    sent_before = {operation: _sent(operation) for operation in ("api_request", "verification")}
    dropped_before = LATENCY_EVENTS_DROPPED.labels("kafka")._value.get()
    for operation, duration_ms in recorded:
        recorder.record(operation, duration_ms, tenant_id=tenant, ok=duration_ms != 3.0)  # type: ignore[arg-type]
    try:
        await recorder.flush()
    finally:
        await recorder.close()

    ours = [
        (record, LatencyEvent.model_validate_json(record.value))
        for record in await read_records(test_settings, [topic])
        if tenant.encode() in record.value
    ]
    assert len(ours) == len(recorded)
    assert len({event.event_id for _, event in ours}) == len(recorded)
    for record, event in ours:
        assert record.key == event.operation.encode()
        assert record.partition == partition_of(record.key, test_settings.kafka_partitions)
    # Each operation's events in the order they were recorded, and their outcomes.
    api_requests = [event for _, event in ours if event.operation == "api_request"]
    assert [event.duration_ms for event in api_requests] == [float(i) for i in range(600)]
    assert [event.outcome for event in api_requests].count("error") == 1
    assert _sent("api_request") - sent_before["api_request"] == 600
    assert _sent("verification") - sent_before["verification"] == 7
    assert LATENCY_EVENTS_DROPPED.labels("kafka")._value.get() == dropped_before
