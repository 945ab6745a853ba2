"""The worker's effects go to the real broker through aiokafka's producer, past Faust's send path.

`streams.producer.DirectTopic` keeps Faust's path for anything it does not handle itself; both
paths must deliver, in order, and count the record on the worker's /metrics page.
"""

from __future__ import annotations

from typing import Any, cast

import faust
import pytest
from faust.types.tuples import FutureMessage
from prometheus_client import REGISTRY

from flexoraa.settings import Settings
from schemas.topics import TopicNames
from streams.app import create_worker_app
from tests.integration.conftest import read_records

pytestmark = pytest.mark.integration


def _sent(topic: str) -> float:
    labels = {"topic": f"topic.{topic}"}
    return REGISTRY.get_sample_value("faust_topic_messages_sent_total", labels) or 0.0


async def test_effects_skip_fausts_send_path_and_arrive_in_order_and_counted(
    test_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    through_faust: list[bytes] = []
    publish_message = faust.Topic.publish_message

    async def counted(self: faust.Topic, fut: FutureMessage, wait: bool = False) -> Any:
        through_faust.append(cast(bytes, fut.message.value))
        return await publish_message(self, fut, wait=wait)

    monkeypatch.setattr(faust.Topic, "publish_message", counted)
    app = create_worker_app(test_settings)
    name = TopicNames(test_settings.topic_prefix).lead_events
    topic = app.topic(
        name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    key = b"direct-topic-lead"
    # As the app does when it starts: its monitor sees what goes through Faust's path.
    app.sensors.add(app.monitor)
    before = _sent(name)
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
    assert _sent(name) == before + 2
