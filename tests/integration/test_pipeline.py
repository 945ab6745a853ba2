"""The inbound path end to end on the real broker: API → Kafka → worker tables → API reads,
and the sink → PostgreSQL → history reads."""

from __future__ import annotations

import asyncio
import base64
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from flexoraa.kafka import partition_of
from flexoraa.settings import PROJECT_ROOT, Settings
from schemas.events import DeadLetter, InboundMessage
from schemas.messaging import LeadEvent
from schemas.topics import TopicNames
from tests.conftest import MakeTenant, ManagedProcess, StartProcess, Tenant, free_port, start_worker
from tests.integration.conftest import ApiFactory, flexoraa, send_records

pytestmark = pytest.mark.integration
DASHBOARDS = PROJECT_ROOT / "dashboards"


@pytest.fixture(scope="module")
def worker(processes: StartProcess, test_settings: Settings) -> ManagedProcess:
    # The foundation's inbound path alone: no AI questions adding outbound messages.
    return start_worker(processes, test_settings, ENABLE_AI_QUALIFICATION="false")


@pytest.fixture
async def api(api_factory: ApiFactory, worker: ManagedProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with api_factory(worker_url=f"http://127.0.0.1:{worker.ports['web']}") as client:
        yield client


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout_s: float = 15.0, what: str = "condition"
) -> Any:
    """Polls until `check` returns a truthy value (state arrives asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def post(api: httpx.AsyncClient, tenant: Tenant, **body: Any) -> dict[str, str]:
    response = await api.post("/api/events/inbound", headers=tenant.headers, json=body)
    assert response.status_code == 202, response.text
    result: dict[str, str] = response.json()
    return result


async def lead_state(api: httpx.AsyncClient, tenant: Tenant, lead_id: str, count: int) -> Any:
    async def check() -> Any:
        response = await api.get(f"/api/leads/{lead_id}", headers=tenant.headers)
        if response.status_code == 200 and response.json()["message_count"] >= count:
            return response.json()
        return None

    return await eventually(check, what=f"lead {lead_id} with {count} messages")


async def messages(api: httpx.AsyncClient, tenant: Tenant, lead_id: str, count: int) -> Any:
    async def check() -> Any:
        response = await api.get(f"/api/leads/{lead_id}/messages", headers=tenant.headers)
        if response.status_code == 200 and len(response.json()["items"]) >= count:
            return response.json()["items"]
        return None

    return await eventually(check, what=f"{count} messages of lead {lead_id} in PostgreSQL")


async def test_live_state_reflects_inbound_messages(
    api: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    tenant = await make_tenant()
    sent_at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
    accepted = await post(
        api,
        tenant,
        channel="whatsapp",
        contact="+91 98000 00011",
        contact_name="Asha",
        text="Hi, what does the Pro plan cost?",
        occurred_at=sent_at.isoformat(),
    )
    state = await lead_state(api, tenant, accepted["lead_id"], 1)
    assert state["channel"] == "whatsapp"
    assert state["contact"] == "919800000011"
    assert state["contact_name"] == "Asha"
    assert datetime.fromisoformat(state["last_customer_message_at"]) == sent_at
    assert state["window"] == {
        "applies": True,
        "open": True,
        "closes_at": (sent_at + timedelta(hours=24)).isoformat().replace("+00:00", "Z"),
    }


async def test_a_window_older_than_24_hours_is_closed(
    api: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    tenant = await make_tenant()
    old = datetime.now(UTC) - timedelta(hours=24, seconds=1)
    accepted = await post(
        api, tenant, channel="instagram", contact="1784", text="hi", occurred_at=old.isoformat()
    )
    state = await lead_state(api, tenant, accepted["lead_id"], 1)
    assert state["window"]["applies"] is True
    assert state["window"]["open"] is False


async def test_messages_are_listed_in_order_and_duplicates_are_dropped(
    api: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    tenant = await make_tenant()
    base = datetime.now(UTC) - timedelta(hours=1)
    # Sent out of order, with one retried delivery of the same channel message.
    for minute, message_id in [(3, "m3"), (1, "m1"), (2, "m2"), (1, "m1")]:
        accepted = await post(
            api,
            tenant,
            channel="email",
            contact="Buyer@Example.com",
            text=f"message {minute}",
            occurred_at=(base + timedelta(minutes=minute)).isoformat(),
            channel_message_id=message_id,
        )
    lead_id = accepted["lead_id"]
    items = await messages(api, tenant, lead_id, 3)
    assert [item["text"] for item in items] == ["message 1", "message 2", "message 3"]
    assert [item["channel_message_id"] for item in items] == ["m1", "m2", "m3"]
    state = await lead_state(api, tenant, lead_id, 3)
    assert state["message_count"] == 3
    assert state["window"]["applies"] is False  # e-mail has no 24-hour window
    await asyncio.sleep(0.5)  # the duplicate would have landed by now
    assert len(await messages(api, tenant, lead_id, 3)) == 3
    page = (await api.get(f"/api/leads/{lead_id}/messages?limit=2", headers=tenant.headers)).json()
    assert [item["text"] for item in page["items"]] == ["message 1", "message 2"]
    rest = (
        await api.get(
            f"/api/leads/{lead_id}/messages?limit=2&cursor={page['next_cursor']}",
            headers=tenant.headers,
        )
    ).json()
    assert [item["text"] for item in rest["items"]] == ["message 3"]
    assert rest["next_cursor"] is None


async def test_leads_are_listed_newest_activity_first_with_a_cursor(
    api: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    tenant = await make_tenant()
    base = datetime.now(UTC) - timedelta(hours=2)
    lead_ids = []
    for i in range(5):
        accepted = await post(
            api,
            tenant,
            channel="sms",
            contact=f"55500000{i:02d}",
            text="hi",
            occurred_at=(base + timedelta(minutes=i)).isoformat(),
        )
        lead_ids.append(accepted["lead_id"])
    for lead_id in lead_ids:
        await messages(api, tenant, lead_id, 1)
    seen: list[str] = []
    cursor = None
    while True:
        url = "/api/leads?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = (await api.get(url, headers=tenant.headers)).json()
        seen += [item["lead_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(lead_ids))
    bad = await api.get("/api/leads?cursor=garbage", headers=tenant.headers)
    assert bad.status_code == 400
    assert "cursor" in bad.json()["detail"]


async def test_another_tenants_lead_is_a_404(
    api: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    owner, stranger = await make_tenant("Owner"), await make_tenant("Stranger")
    accepted = await post(api, owner, channel="whatsapp", contact="919800000099", text="secret")
    lead_id = accepted["lead_id"]
    await lead_state(api, owner, lead_id, 1)
    await messages(api, owner, lead_id, 1)
    for path in (f"/api/leads/{lead_id}", f"/api/leads/{lead_id}/messages"):
        response = await api.get(path, headers=stranger.headers)
        assert response.status_code == 404
        assert response.json() == {"detail": "lead not found"}
        unknown = await api.get(path.replace(lead_id, "00000000-0000-4000-8000-000000000000"),
                                headers=stranger.headers)  # fmt: skip
        assert unknown.json() == response.json()  # the same answer as for an id that does not exist
    listed = (await api.get("/api/leads", headers=stranger.headers)).json()
    assert listed["items"] == []


async def test_undecodable_records_go_to_dead_letters_and_the_agent_goes_on(
    api: httpx.AsyncClient, make_tenant: MakeTenant, test_settings: Settings
) -> None:
    tenant = await make_tenant()
    names = TopicNames(test_settings.topic_prefix)
    # First learn the lead id so the garbage lands on the same partition as the next message.
    first = await post(api, tenant, channel="sms", contact="5550009999", text="one")
    lead_id = first["lead_id"]
    await lead_state(api, tenant, lead_id, 1)
    garbage = b"\x00\x01 definitely not an event"
    producer = AIOKafkaProducer(bootstrap_servers=test_settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(names.inbound_messages, garbage, key=lead_id.encode())
        await producer.send_and_wait(
            names.inbound_messages, b'{"kind": "inbound_message"}', key=lead_id.encode()
        )
    finally:
        await producer.stop()
    await post(api, tenant, channel="sms", contact="5550009999", text="two")
    state = await lead_state(api, tenant, lead_id, 2)
    assert state["message_count"] == 2

    letters = await read_dead_letters(test_settings, lead_id.encode(), 2)
    assert base64.b64decode(letters[0].raw_base64) == garbage
    assert letters[0].source_topic == names.inbound_messages
    assert letters[0].offset is not None
    assert "invalid event" in letters[0].reason
    assert "event_id" in letters[1].reason  # names the missing field


async def test_a_record_on_the_wrong_key_is_dead_lettered(
    api: httpx.AsyncClient, make_tenant: MakeTenant, test_settings: Settings
) -> None:
    tenant = await make_tenant()
    first = await post(api, tenant, channel="sms", contact="5550008888", text="one")
    record = InboundMessage(
        event_id="00000000-0000-4000-8000-00000000abcd",
        tenant_id=tenant.tenant_id,
        occurred_at=datetime.now(UTC),
        lead_id=first["lead_id"],
        channel="sms",
        contact="5550008888",
        text="smuggled",
        received_at=datetime.now(UTC),
    )
    wrong_key = b"some-other-lead"
    producer = AIOKafkaProducer(bootstrap_servers=test_settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(
            TopicNames(test_settings.topic_prefix).inbound_messages,
            record.model_dump_json().encode(),
            key=wrong_key,
        )
    finally:
        await producer.stop()
    letters = await read_dead_letters(test_settings, wrong_key, 1)
    assert "key" in letters[0].reason
    state = await lead_state(api, tenant, first["lead_id"], 1)
    assert state["message_count"] == 1


async def test_a_record_failing_for_what_it_carries_is_dead_lettered_and_the_worker_goes_on(
    api: httpx.AsyncClient, make_tenant: MakeTenant, test_settings: Settings
) -> None:
    """A valid event whose tenant id is no UUID fails the leakage agent's tenant lookup in
    PostgreSQL (asyncpg refuses the parameter): it used to stop the worker at every restart."""
    tenant = await make_tenant()
    good = await post(api, tenant, channel="sms", contact="5550007777", text="one")
    await lead_state(api, tenant, good["lead_id"], 1)
    # A lead of the same partition: the worker must go on past it to take the next message.
    partition = partition_of(good["lead_id"].encode(), test_settings.kafka_partitions)
    poison_lead = next(
        lead
        for lead in (str(uuid.uuid4()) for _ in range(1000))
        if partition_of(lead.encode(), test_settings.kafka_partitions) == partition
    )
    record = InboundMessage(
        event_id=str(uuid.uuid4()),
        tenant_id="not-a-tenant-id",
        occurred_at=datetime.now(UTC),
        lead_id=poison_lead,
        channel="sms",
        contact="5550006666",
        text="poison",
        received_at=datetime.now(UTC),
    )
    await send_records(
        test_settings,
        TopicNames(test_settings.topic_prefix).inbound_messages,
        [(poison_lead.encode(), record.model_dump_json().encode())],
    )
    await post(api, tenant, channel="sms", contact="5550007777", text="two")
    assert (await lead_state(api, tenant, good["lead_id"], 2))["message_count"] == 2

    letters = await read_dead_letters(test_settings, poison_lead.encode(), 1)
    failed = [letter for letter in letters if letter.reason.startswith("processing failed")]
    assert failed, [letter.reason for letter in letters]
    assert "DataError" in failed[0].reason
    assert InboundMessage.model_validate_json(base64.b64decode(failed[0].raw_base64)) == record
    # Named by the handler that failed, while the topic's others took the record: a replay is
    # for it alone (flexoraa dead-letters replay).
    assert (failed[0].kind, failed[0].consumer) == ("processing_failed", "leakage-waits")


async def test_a_lead_event_the_sink_cannot_build_a_row_from_is_a_failed_processing(
    api: httpx.AsyncClient, make_tenant: MakeTenant, test_settings: Settings
) -> None:
    # A bug or a broken producer, not data PostgreSQL refused: the PoisonRecords alert's.
    tenant = await make_tenant()
    lead = str(uuid.uuid4())
    no_turn = no_turn_event(tenant, lead)
    await send_records(
        test_settings,
        TopicNames(test_settings.topic_prefix).lead_events,
        [(lead.encode(), no_turn.model_dump_json().encode())],
    )
    [letter] = await read_dead_letters(test_settings, lead.encode(), 1)
    assert letter.reason.startswith("row not writable: KeyError")
    assert (letter.kind, letter.consumer) == ("processing_failed", "sink-lead-events")


def no_turn_event(tenant: Tenant, lead: str) -> LeadEvent:
    """A lead event the sink cannot build a row from: dead-lettered as a failed processing."""
    return LeadEvent(event_id=str(uuid.uuid4()), tenant_id=tenant.tenant_id,
                     occurred_at=datetime.now(UTC), lead_id=lead, type="qualification_updated",
                     data={"status": "done"})  # fmt: skip


async def tenant_letters(
    api: httpx.AsyncClient, tenant: Tenant, count: int, replayed: int = 0
) -> list[dict[str, Any]]:
    """The tenant's dead letters through the API, once `count` are there, `replayed` of them
    marked replayed (the worker indexes both topics asynchronously)."""

    async def listed() -> list[dict[str, Any]] | None:
        response = await api.get("/api/dead-letters", headers=tenant.headers)
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        done = sum(1 for item in items if item["replayed_at"] is not None)
        return items if (len(items), done) == (count, replayed) else None

    items: list[dict[str, Any]] = await eventually(listed, 30, f"{count} dead letters")
    return items


async def test_a_tenants_admins_see_its_dead_letters_and_their_replays(
    api: httpx.AsyncClient, make_tenant: MakeTenant, test_settings: Settings,
    db: asyncpg.Connection,
) -> None:  # fmt: skip
    names = TopicNames(test_settings.topic_prefix)
    tenant, other = await make_tenant(), await make_tenant("Other")
    lead, other_lead = str(uuid.uuid4()), str(uuid.uuid4())
    event = no_turn_event(tenant, lead)
    await send_records(test_settings, names.lead_events, [
        (lead.encode(), event.model_dump_json().encode()),
        (other_lead.encode(), no_turn_event(other, other_lead).model_dump_json().encode()),
    ])  # fmt: skip
    # A letter of bytes that name no tenant: indexed, but nobody's through the API.
    nobodys = str(uuid.uuid4())
    await send_records(test_settings, names.dead_letters, [(nobodys.encode(), DeadLetter(
        source_topic=names.inbound_messages, partition=0, offset=0,
        reason="invalid event: record: Invalid JSON", raw_base64=base64.b64encode(
            b'\x00{"tenant_id": "' + tenant.tenant_id.encode()).decode(),
        key_base64=base64.b64encode(nobodys.encode()).decode(),
        dead_lettered_at=datetime.now(UTC), kind="invalid_event",
    ).model_dump_json().encode())])  # fmt: skip

    [letter] = await tenant_letters(api, tenant, 1)
    assert letter["source"] == "lead-events"
    assert letter["kind"] == "processing_failed"
    assert letter["reason"].startswith("row not writable: KeyError")
    assert letter["key"] == lead
    assert LeadEvent.model_validate(letter["record"]) == event
    assert base64.b64decode(letter["record_base64"]) == event.model_dump_json().encode()
    assert (letter["replayed_at"], letter["times_replayed"]) == (None, 0)
    [theirs] = await tenant_letters(api, other, 1)
    assert theirs["key"] == other_lead
    row = await eventually(lambda: db.fetchrow(
        "SELECT tenant_id, kind FROM dead_letters WHERE record_key = $1", nobodys.encode()
    ), what="the letter naming no tenant indexed")  # fmt: skip
    assert (row["tenant_id"], row["kind"]) == (None, "invalid_event")

    created = await api.post("/api/keys", headers=tenant.headers, json={"role": "sdr"})
    member = Tenant(tenant.tenant_id, created.json()["api_key"])
    assert (await api.get("/api/dead-letters", headers=member.headers)).status_code == 403

    # Put back before the bug is fixed: the sink refuses the event again, a second letter.
    done = flexoraa(test_settings, "dead-letters", "replay", "--key", lead)
    assert done.returncode == 0, done.stderr
    again, first = await tenant_letters(api, tenant, 2, replayed=1)
    assert first["letter"] == letter["letter"]
    assert first["replayed_at"] is not None
    assert first["times_replayed"] == 1
    assert again["replayed_at"] is None
    assert again["record"] == letter["record"]

    page = (await api.get("/api/dead-letters", params={"limit": 1}, headers=tenant.headers)).json()
    assert [item["letter"] for item in page["items"]] == [again["letter"]]
    rest = (await api.get("/api/dead-letters", params={"cursor": page["next_cursor"]},
                          headers=tenant.headers)).json()  # fmt: skip
    assert [item["letter"] for item in rest["items"]] == [first["letter"]]
    assert rest["next_cursor"] is None
    for query, expected in (
        ({"kind": "processing_failed", "source": "lead-events"}, 2),
        ({"kind": "sink_rejected"}, 0),
        ({"source": "inbound-messages"}, 0),
        ({"since": (datetime.now(UTC) + timedelta(minutes=1)).isoformat()}, 0),
    ):
        found = await api.get("/api/dead-letters", params=query, headers=tenant.headers)
        assert len(found.json()["items"]) == expected, query
    bad = await api.get("/api/dead-letters", params={"cursor": "bm90IGEgY3Vyc29y"},
                        headers=tenant.headers)  # fmt: skip
    assert bad.status_code == 400


async def read_dead_letters(settings: Settings, key: bytes, count: int) -> list[DeadLetter]:
    consumer = AIOKafkaConsumer(
        TopicNames(settings.topic_prefix).dead_letters,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[DeadLetter] = []
    try:
        deadline = time.monotonic() + 20
        while len(found) < count and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                found += [DeadLetter.model_validate_json(r.value) for r in records if r.key == key]
    finally:
        await consumer.stop()
    assert len(found) >= count, f"expected {count} dead letters, found {len(found)}"
    return found


async def test_no_worker_means_503_for_live_state(
    api_factory: ApiFactory, make_tenant: MakeTenant
) -> None:
    tenant = await make_tenant()
    async with api_factory(worker_url=f"http://127.0.0.1:{free_port()}") as client:
        response = await client.get(
            "/api/leads/00000000-0000-4000-8000-000000000000", headers=tenant.headers
        )
    assert response.status_code == 503
    assert "no worker answered" in response.json()["detail"]


def exported_names(*texts: str) -> set[str]:
    names: set[str] = set()
    for text in texts:
        for family in text_string_to_metric_families(text):
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
    return names


async def test_every_metric_on_a_dashboard_or_alert_is_exported(
    api: httpx.AsyncClient, worker: ManagedProcess, make_tenant: MakeTenant
) -> None:
    """Dashboards and alert rules cannot drift from the code: every series they use exists."""
    tenant = await make_tenant()
    await post(api, tenant, channel="sms", contact="5550007777", text="for the metrics")
    await api.get("/api/leads/not-a-uuid", headers=tenant.headers)
    async with httpx.AsyncClient() as client:
        worker_metrics = (await client.get(f"http://127.0.0.1:{worker.ports['web']}/metrics")).text
    api_metrics = (await api.get("/metrics")).text
    exported = exported_names(worker_metrics, api_metrics)
    referenced: set[str] = set()
    for path in [*DASHBOARDS.rglob("*.json"), *DASHBOARDS.rglob("*.yml")]:
        # Digits too: without them a name like flexoraa_sla_latency_p90_seconds never matches.
        referenced.update(re.findall(r"\b((?:flexoraa|faust)_[a-z0-9_]+)\b", path.read_text()))
    assert referenced, "no metrics referenced by the dashboards"
    assert sorted(referenced - exported) == []


def fetched_partitions(metrics: str) -> dict[str, float]:
    return {
        sample.labels["kind"]: sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "flexoraa_consumer_fetched_partitions"
        for sample in family.samples
    }


async def test_the_worker_fetches_its_input_but_no_changelog_once_recovered(
    api: httpx.AsyncClient, worker: ManagedProcess, make_tenant: MakeTenant
) -> None:
    """A changelog partition Faust no longer reads is paused in aiokafka too: a fetch bringing
    records nobody drains held every fetch for 100 ms, and kept them buffered for good."""
    tenant = await make_tenant()
    # A message writes the sessions and deadlines changelogs.
    created = await post(api, tenant, channel="sms", contact="5550008888", text="changelogs")
    await lead_state(api, tenant, created["lead_id"], 1)

    async def settled() -> dict[str, float] | None:
        async with httpx.AsyncClient() as client:
            page = await client.get(f"http://127.0.0.1:{worker.ports['web']}/metrics")
        counts = fetched_partitions(page.text)
        return counts if counts.get("input") else None

    counts = await eventually(settled, what="the worker's fetched partitions")
    assert counts["changelog"] == 0
    # Every lead topic's partitions are read (8 of each of the inbound topics at least).
    assert counts["input"] >= 8


def samples_of(metrics: str, name: str, topic: str) -> list[float]:
    return [
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == name and sample.labels.get("topic") == topic
    ]


async def test_the_inbound_topic_is_on_the_consumer_lag_panel(
    api: httpx.AsyncClient, worker: ManagedProcess, make_tenant: MakeTenant, test_settings: Settings
) -> None:
    """The batch lane takes the inbound records past Faust's fetch loop, which is where Faust
    records a partition's end offset (the lag panel: end offset minus committed offset) and
    counts received records; the lane records both itself."""
    tenant = await make_tenant()
    created = await post(api, tenant, channel="sms", contact="5550009999", text="lag")
    await lead_state(api, tenant, created["lead_id"], 1)
    inbound = TopicNames(test_settings.topic_prefix).inbound_messages

    async def tracked() -> tuple[list[float], list[float]] | None:
        async with httpx.AsyncClient() as client:
            page = (await client.get(f"http://127.0.0.1:{worker.ports['web']}/metrics")).text
        end_offsets = samples_of(page, "faust_topic_partition_end_offset", inbound)
        received = samples_of(page, "faust_messages_received_per_topic_total", inbound)
        committed = samples_of(page, "faust_topic_partition_offset_commited", inbound)
        return (end_offsets, received) if end_offsets and received and committed else None

    end_offsets, received = await eventually(tracked, what="the inbound topic's lag series")
    assert sum(end_offsets) >= 1
    assert received[0] >= 1
