"""The worker's effects and table writes go to the real broker through aiokafka's producer,
past Faust's send path.

`streams.producer.DirectTopic` keeps Faust's path for anything it does not handle itself; both
paths must deliver, in order, and count the record on the worker's /metrics page.
`streams.producer.HeldChangelogTable` writes changelog records Faust's recovery reads back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

import faust
import pytest
from faust.sensors.prometheus import FaustMetrics
from faust.types.tuples import FutureMessage, Message
from prometheus_client import CollectorRegistry

from flexoraa.settings import Settings
from schemas.topics import TopicNames
from streams.batches import SourceRecord, one_record_at_a_time
from streams.monitor import LeanPrometheusMonitor
from streams.producer import DirectTopic, HeldChangelogTable, WorkerApp, put_in_partition
from tests.integration.conftest import read_records

pytestmark = pytest.mark.integration


async def test_effects_skip_fausts_send_path_and_arrive_in_order_and_counted(
    test_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    through_faust: list[bytes] = []
    publish_message = faust.Topic.publish_message

    async def counted(self: faust.Topic, fut: FutureMessage, wait: bool = False) -> Any:
        through_faust.append(cast(bytes, fut.message.value))
        return await publish_message(self, fut, wait=wait)

    monkeypatch.setattr(faust.Topic, "publish_message", counted)
    # The worker's app classes, with a monitor of its own (the worker's metric families are
    # created once per process).
    app = WorkerApp(
        "direct-topic-test",
        broker=f"kafka://{test_settings.kafka_bootstrap_servers}",
        autodiscover=False,
        producer_acks=-1,
        Topic=DirectTopic,
    )
    registry = CollectorRegistry()
    app.monitor = LeanPrometheusMonitor(metrics=FaustMetrics.create(registry, "faust"))
    name = TopicNames(test_settings.topic_prefix).lead_events
    topic = app.topic(
        name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    key = b"direct-topic-lead"
    # As the app does when it starts: its monitor sees what goes through Faust's path.
    app.sensors.add(app.monitor)
    await app.producer.start()
    try:
        direct = await topic.send(key=key, value=b'{"n": 1}')
        # An option the direct path does not handle goes through Faust's send, as before.
        with_headers = await topic.send(key=key, value=b'{"n": 2}', headers={"origin": b"t"})
        await direct
        await with_headers
    finally:
        await app.producer.stop()

    records = [r for r in await read_records(test_settings, [name]) if r.key == key]
    assert [r.value for r in records] == [b'{"n": 1}', b'{"n": 2}']
    assert dict(records[1].headers) == {"origin": b"t"}
    assert through_faust == [b'{"n": 2}']
    sent = registry.get_sample_value("faust_topic_messages_sent_total", {"topic": f"topic.{name}"})
    assert sent == 2


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes


async def test_table_writes_skip_fausts_send_path_and_recover_as_faust_would(
    test_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`HeldChangelogTable`: a write goes to its changelog as a record (partition, key and
    Faust's serialisation of the value), a round sends a key's last value, a delete is a
    tombstone, and Faust's recovery reads the records back into the same table."""
    through_faust: list[Any] = []
    publish_message = faust.Topic.publish_message

    async def counted(self: faust.Topic, fut: FutureMessage, wait: bool = False) -> Any:
        through_faust.append(fut.message.key)
        return await publish_message(self, fut, wait=wait)

    monkeypatch.setattr(faust.Topic, "publish_message", counted)
    partitions = test_settings.kafka_partitions

    def worker_app() -> WorkerApp:
        app = WorkerApp(
            f"{test_settings.topic_prefix}-held-table",
            broker=f"kafka://{test_settings.kafka_bootstrap_servers}",
            autodiscover=False,
            producer_acks=-1,
            Topic=DirectTopic,
            Table=HeldChangelogTable,
        )
        app.monitor = LeanPrometheusMonitor(
            metrics=FaustMetrics.create(CollectorRegistry(), "faust")
        )
        return app

    app = worker_app()
    table = app.Table("accounts", key_type=bytes, partitions=partitions)
    assert isinstance(table, HeldChangelogTable)

    async def write(record: SourceRecord) -> None:
        table[b"lead-a"] = {"n": 1}
        table[b"lead-a"] = {"n": 2}
        table[b"lead-b"] = {"n": 1}
        del table[b"lead-b"]

    await app.producer.start()
    try:
        await table.changelog_topic.maybe_declare()
        # Written with a source record as the current event, as an agent on the batch lane does.
        await one_record_at_a_time(write)([Record("held-table-source", 1, 0, b"", b"")])
        # Written on a partition of its own, as the token fold does.
        put_in_partition(table, 2, b"lead-c", {"m": 1})
        await app.producer.flush()
    finally:
        await app.producer.stop()

    name = table.changelog_topic.get_topic_name()
    records = sorted(
        await read_records(test_settings, [name]), key=lambda r: (r.partition, r.offset)
    )
    assert [(r.partition, r.key, r.value and json.loads(r.value)) for r in records] == [
        (1, b"lead-a", {"n": 2}),
        (1, b"lead-b", None),
        (2, b"lead-c", {"m": 1}),
    ]
    assert through_faust == []

    fresh = worker_app().Table("accounts", key_type=bytes, partitions=partitions)
    events = [
        await fresh.changelog_topic.decode(
            Message(r.topic, r.partition, r.offset, r.timestamp / 1000, 0, [], r.key, r.value, None)
        )
        for r in records
    ]
    fresh.apply_changelog_batch(events)
    assert dict(fresh.items()) == {b"lead-a": {"n": 2}, b"lead-c": {"m": 1}}
