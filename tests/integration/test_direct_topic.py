"""The worker's effects go to the real broker through aiokafka's producer, past Faust's send path.

`streams.producer.DirectTopic` keeps Faust's path for anything it does not handle itself; both
paths must deliver, in order, and count the record on the worker's /metrics page.
"""

from __future__ import annotations

from typing import Any, cast

import faust
import pytest
from faust.sensors.prometheus import FaustMetrics
from faust.types.tuples import FutureMessage
from prometheus_client import CollectorRegistry

from flexoraa.settings import Settings
from schemas.topics import TopicNames
from streams.monitor import LeanPrometheusMonitor
from streams.producer import DirectTopic, WorkerApp
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
