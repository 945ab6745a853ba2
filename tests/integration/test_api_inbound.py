"""`POST /api/events/inbound` against the real broker: acks, validation, auth, Kafka down."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from flexoraa.settings import Settings
from schemas.events import InboundMessage
from schemas.topics import TopicNames
from streams.rules.identity import lead_id_for
from tests.conftest import MakeTenant, free_port
from tests.integration.conftest import ApiFactory

pytestmark = pytest.mark.integration


async def read_inbound(settings: Settings, lead_id: str) -> list[InboundMessage]:
    """Every record of the lead's partition, read from the broker."""
    topic = TopicNames(settings.topic_prefix).inbound_messages
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = [
                TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []
            ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning()
        end = await consumer.end_offsets(partitions)
        found: list[InboundMessage] = []

        async def behind() -> bool:
            return any([await consumer.position(tp) < end[tp] for tp in partitions])

        while await behind():
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    if record.key == lead_id.encode():
                        found.append(InboundMessage.model_validate_json(record.value))
        return found
    finally:
        await consumer.stop()


async def test_accepted_message_is_on_the_topic_keyed_by_lead(
    api: Any, make_tenant: MakeTenant, test_settings: Settings
) -> None:
    tenant = await make_tenant()
    response = await api.post(
        "/api/events/inbound",
        headers=tenant.headers,
        json={
            "channel": "whatsapp",
            "contact": "+91 98000 00001",
            "contact_name": "Asha",
            "text": "Hi, what does the Pro plan cost?",
            "occurred_at": "2026-11-24T10:00:00+05:30",
        },
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["lead_id"] == lead_id_for(tenant.tenant_id, "whatsapp", "919800000001")
    records = await read_inbound(test_settings, body["lead_id"])
    assert len(records) == 1
    record = records[0]
    assert record.event_id == body["event_id"]
    assert record.tenant_id == tenant.tenant_id
    assert record.contact == "919800000001"
    assert record.text == "Hi, what does the Pro plan cost?"
    assert record.occurred_at.isoformat() == "2026-11-24T04:30:00+00:00"


async def test_a_repeated_channel_message_id_gets_the_same_event_id(
    api: Any, make_tenant: MakeTenant
) -> None:
    tenant = await make_tenant()
    body = {
        "channel": "email",
        "contact": "a@example.com",
        "text": "hi",
        "channel_message_id": "m1",
    }
    first = await api.post("/api/events/inbound", headers=tenant.headers, json=body)
    second = await api.post("/api/events/inbound", headers=tenant.headers, json=body)
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "missing API key"),
        ({"Authorization": "Basic abc"}, "missing API key"),
        ({"Authorization": "Bearer fxk_not-a-real-key"}, "invalid or revoked"),
    ],
)
async def test_requests_without_a_valid_key_are_refused(
    api: Any, headers: dict[str, str], detail: str
) -> None:
    response = await api.post(
        "/api/events/inbound",
        headers=headers,
        json={"channel": "sms", "contact": "5550001111", "text": "x"},
    )
    assert response.status_code == 401
    assert detail in response.json()["detail"]
    assert response.headers["www-authenticate"] == "Bearer"


async def test_a_revoked_key_is_refused(
    api_factory: ApiFactory, make_tenant: MakeTenant, db: Any
) -> None:
    tenant = await make_tenant()
    await db.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE tenant_id = $1", tenant.tenant_id
    )
    async with api_factory() as client:
        response = await client.get("/api/leads", headers=tenant.headers)
    assert response.status_code == 401


VALID = {"channel": "whatsapp", "contact": "919800000001", "text": "hello"}


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        (b'{"channel": "whatsapp", "contact": ', 400, "malformed JSON"),
        (b"not json at all", 400, "malformed JSON"),
        (json.dumps({**VALID, "text": 42}).encode(), 422, "text"),
        (json.dumps({**VALID, "channel": "pigeon"}).encode(), 422, "channel"),
        (json.dumps({"channel": "whatsapp", "text": "x"}).encode(), 422, "contact"),
        (json.dumps({**VALID, "contact": "call me"}).encode(), 422, "contact"),
        (json.dumps({**VALID, "occurred_at": "2026-11-24T10:00:00"}).encode(), 422, "occurred_at"),
        (json.dumps({**VALID, "occurred_at": "2999-01-01T00:00:00Z"}).encode(), 422, "occurred_at"),
        (json.dumps({**VALID, "occurred_at": "1969-12-31T23:59:59Z"}).encode(), 422, "occurred_at"),
        (json.dumps({**VALID, "surprise": 1}).encode(), 422, "surprise"),
        (b'{"channel": "whatsapp", "contact": "919800000001", "text": "\xff\xfe"}', 400, "UTF-8"),
        (json.dumps({**VALID, "text": "x" * 70_000}).encode(), 413, "larger than 65536"),
    ],
    ids=[
        "truncated-json",
        "not-json",
        "wrong-type",
        "unknown-channel",
        "missing-field",
        "bad-contact",
        "naive-time",
        "future-time",
        "before-1970",
        "extra-field",
        "not-utf8",
        "too-large",
    ],
)
async def test_bad_input_gets_a_4xx_naming_the_problem(
    api: Any, make_tenant: MakeTenant, test_settings: Settings, body: bytes, status: int, names: str
) -> None:
    tenant = await make_tenant()
    response = await api.post(
        "/api/events/inbound",
        headers={**tenant.headers, "Content-Type": "application/json"},
        content=body,
    )
    assert response.status_code == status, response.text
    assert names in response.json()["detail"]
    lead = json.loads(json.dumps(VALID))
    assert (
        await read_inbound(
            test_settings, lead_id_for(tenant.tenant_id, lead["channel"], lead["contact"])
        )
        == []
    )


async def test_an_oversized_body_without_content_length_is_refused(
    api: Any, make_tenant: MakeTenant
) -> None:
    tenant = await make_tenant()

    async def chunks() -> Any:
        for _ in range(100):
            yield b"x" * 1024

    response = await api.post("/api/events/inbound", headers=tenant.headers, content=chunks())
    assert response.status_code == 413


async def test_kafka_down_is_a_503_and_nothing_is_accepted(
    api_factory: ApiFactory, make_tenant: MakeTenant
) -> None:
    tenant = await make_tenant()
    dead_broker = f"127.0.0.1:{free_port()}"
    async with api_factory(
        kafka_bootstrap_servers=dead_broker, kafka_produce_timeout_ms=1500
    ) as client:
        response = await client.post(
            "/api/events/inbound",
            headers=tenant.headers,
            json={"channel": "sms", "contact": "5550001111", "text": "x"},
        )
        assert response.status_code == 503
        assert "Kafka is unavailable" in response.json()["detail"]
        assert response.headers["retry-after"] == "5"
        ready = await client.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["checks"] == {"kafka": False, "postgres": True}
    assert "kafka" in ready.json()["detail"]


async def test_ready_and_health(api: Any) -> None:
    assert (await api.get("/health")).json() == {"status": "ok"}
    ready = await api.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"kafka": True, "postgres": True}


async def test_postgres_down_makes_ready_fail_naming_it(
    api_factory: ApiFactory, test_settings: Settings
) -> None:
    unreachable = f"postgresql://flexoraa@127.0.0.1:{free_port()}/nowhere"
    async with api_factory(database_url=unreachable) as client:
        ready = await client.get("/ready")
        listed = await client.get("/api/leads", headers={"Authorization": "Bearer fxk_x"})
    assert ready.status_code == 503
    assert ready.json()["checks"]["postgres"] is False
    assert "postgres" in ready.json()["detail"]
    assert listed.status_code == 503
