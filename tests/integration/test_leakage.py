"""Leakage timers on a worker: leaks fire after the threshold, replies cancel them, later
customer messages do not move the deadline, and the temperature picks the action."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from connectors.gmail import Tokens
from flexoraa.crypto import load_secret_box
from flexoraa.settings import Settings
from schemas.events import DeadLetter, InboundMessage
from schemas.messaging import DeadlineReached
from schemas.topics import TopicNames
from tests.conftest import MakeTenant, ManagedProcess, StartProcess, free_port, start_worker
from tests.fakes.gmail_api import GmailFake
from tests.fakes.graph_api import GraphApiFake
from tests.fakes.meta_payloads import whatsapp_change, whatsapp_message, whatsapp_payload
from tests.integration.conftest import ApiFactory, read_records, send_records
from tests.integration.test_pipeline import eventually, lead_state, post
from tests.integration.test_whatsapp import deliver, inbound, outbound_rows, register, reply

pytestmark = pytest.mark.integration
THRESHOLD_S = 2


@pytest.fixture(scope="module")
async def gmail() -> AsyncIterator[GmailFake]:
    fake = GmailFake()
    await fake.start(free_port())
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
def worker(
    processes: StartProcess, test_settings: Settings, graph: GraphApiFake, gmail: GmailFake
) -> ManagedProcess:
    return start_worker(
        processes,
        test_settings,
        name="leakage-worker",
        # E-mail leads' messages go through their tenant's mailbox on the Gmail API's fake.
        GMAIL_CLIENT_ID="123-fake.apps.googleusercontent.com",
        GMAIL_CLIENT_SECRET="GOCSPX-fake",
        GMAIL_TOKEN_URL=f"{gmail.url}/token",
        GMAIL_API_URL=f"{gmail.url}/",
        LEAK_THRESHOLD_S=str(THRESHOLD_S),
        # A tenant's changed threshold is read at once (see the follow-up test).
        TENANT_SETTINGS_TTL_S="0",
        TIMER_TICK_MS="100",
        RECOVERY_SILENCE_S="3",
        RECOVERY_DELAYS_S="0,1,2,3",
        RECOVERY_LOCAL_HOUR="none",
        WHATSAPP_GRAPH_API_URL=graph.url,
        # AI replies would answer every message; these tests control the replies.
        ENABLE_AI_QUALIFICATION="false",
    )


@pytest.fixture
async def api(api_factory: ApiFactory, worker: ManagedProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with api_factory(worker_url=f"http://127.0.0.1:{worker.ports['web']}") as client:
        yield client


async def leaks(db: asyncpg.Connection, lead_id: str, count: int = 1) -> list[Any]:
    async def check() -> Any:
        rows = await db.fetch("SELECT * FROM lead_leakage_events WHERE lead_id = $1", lead_id)
        return rows if len(rows) >= count else None

    result: list[Any] = await eventually(check, what="a leakage event")
    return result


async def test_an_unanswered_message_leaks_once_and_is_escalated_when_cold(
    api: httpx.AsyncClient, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    tenant = await make_tenant()
    first_at = datetime.now(UTC).replace(microsecond=0)
    accepted = await post(api, tenant, channel="webchat", contact=f"v-{uuid.uuid4().hex[:8]}",
                          text="anyone there?", occurred_at=first_at.isoformat())  # fmt: skip
    (row,) = await leaks(db, accepted["lead_id"])
    assert row["temperature"] == "COLD"
    assert row["action"] == "escalate_admins"
    assert row["waiting_since"] == first_at
    assert (row["deadline_at"] - row["waiting_since"]).total_seconds() == THRESHOLD_S
    await asyncio.sleep(1)
    count = await db.fetchval(
        "SELECT count(*) FROM lead_leakage_events WHERE lead_id = $1", accepted["lead_id"]
    )
    assert count == 1


async def test_a_follow_up_does_not_move_the_deadline_and_warms_the_lead(
    api: httpx.AsyncClient, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    tenant = await make_tenant()
    sdrs = [
        (await api.post("/api/sdrs", headers=tenant.headers,
                        json={"name": name, "email": f"{name}@example.com"})).json()["sdr_id"]
        for name in ("a", "b")
    ]  # fmt: skip
    contact = f"v-{uuid.uuid4().hex[:8]}"
    first_at = datetime.now(UTC).replace(microsecond=0)
    accepted = await post(api, tenant, channel="webchat", contact=contact, text="hello?",
                          occurred_at=first_at.isoformat())  # fmt: skip
    await post(api, tenant, channel="webchat", contact=contact, text="still there?")
    (row,) = await leaks(db, accepted["lead_id"])
    assert row["waiting_since"] == first_at  # the first unanswered message started the wait
    assert row["temperature"] == "WARM"
    assert row["action"] == "reassign"

    async def logged() -> Any:
        return await db.fetchrow(
            "SELECT * FROM lead_reassignment_log WHERE lead_id = $1", accepted["lead_id"]
        )

    moved = await eventually(logged, what="a reassignment log row")
    assert str(moved["to_sdr_id"]) in sdrs
    assert json.loads(row["details"])["reassigned"] is True  # the test connection has no codec


async def test_a_reply_before_the_deadline_cancels_the_leak(
    api: httpx.AsyncClient, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    business = await register(api, await make_tenant())
    lead_id = await inbound(api, business, "919866600001", int(time.time()), "wamid.L1")
    await reply(api, business, lead_id, "Hi! Happy to help.")
    (sent,) = await outbound_rows(api, business, lead_id)
    assert sent["status"] == "accepted"

    async def replied() -> Any:
        return await db.fetchrow(
            "SELECT data FROM lead_events WHERE lead_id = $1 AND type = 'first_reply'", lead_id
        )

    event = await eventually(replied, what="the first reply event")
    assert json.loads(event["data"])["leaked"] is False
    await asyncio.sleep(THRESHOLD_S + 1)
    assert (
        await db.fetchval("SELECT count(*) FROM lead_leakage_events WHERE lead_id = $1", lead_id)
        == 0
    )
    stats = (await api.get("/api/monitoring/leakage/stats", headers=business.tenant.headers)).json()
    assert stats["first_replies"] == 1
    assert stats["leaks"] == 0


async def test_a_follow_up_wait_takes_the_tenants_threshold_as_it_is_then(
    api: httpx.AsyncClient, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    """A reply read after the lead's next message leaves that message waited on: a new wait,
    with the threshold the tenant has by then, not the answered wait's. (Both thresholds end
    before the module's 3 s recovery silence, whose first message would answer the wait.)"""
    tenant = await make_tenant()

    async def threshold(seconds: int) -> None:
        response = await api.put("/api/tenant/settings", headers=tenant.headers,
                                 json={"leak_threshold_s": seconds})  # fmt: skip
        assert response.status_code == 200, response.text

    await threshold(2)
    business = await register(api, tenant)
    contact, first_s = "919866620001", int(time.time())
    lead_id = await inbound(api, business, contact, first_s, "wamid.F1")
    # The lead's next message is written after the reply below (3 s on) but read before it.
    follow_up_s = first_s + 3
    payload = whatsapp_payload(
        [whatsapp_change(business.phone_number_id,
                         [whatsapp_message("wamid.F2", contact, follow_up_s)])]
    )  # fmt: skip
    assert (await deliver(api, payload, business.app_secret)).status_code == 200
    await lead_state(api, tenant, lead_id, 2)
    await threshold(1)
    await reply(api, business, lead_id, "Hi! Happy to help.")
    sent = next(row for row in await outbound_rows(api, business, lead_id)
                if row["sent_by"] == "sdr")  # fmt: skip
    # The reply left between the two messages (else the test shows nothing), and was read
    # after the second: that took a command, a send and the sent message's topic, where the
    # leakage handler read the second message with the fetch the session count came from.
    assert first_s <= datetime.fromisoformat(sent["occurred_at"]).timestamp() < follow_up_s
    follow_up_at = datetime.fromtimestamp(follow_up_s, UTC)

    async def follow_up_leak() -> Any:
        return await db.fetchrow(
            "SELECT * FROM lead_leakage_events WHERE lead_id = $1 AND waiting_since = $2",
            lead_id, follow_up_at,
        )  # fmt: skip

    row = await eventually(follow_up_leak, timeout_s=20, what="the follow-up's leak")
    assert (row["deadline_at"] - row["waiting_since"]).total_seconds() == 1


async def with_mailbox(
    db: asyncpg.Connection, settings: Settings, gmail: GmailFake, tenant_id: str
) -> None:
    """A connected Gmail mailbox for the tenant (never polled: no poll state): its e-mail
    leads can be written to, so recovery sends and charges its steps."""
    email = f"sales-{uuid.uuid4().hex[:6]}@acme.test"
    gmail.add_mailbox(email)
    access, refresh = gmail.grant(email)
    integration_id = str(uuid.uuid4())
    sealed = load_secret_box(settings).encrypt(
        Tokens(access, refresh, None).to_json(), f"{integration_id}:gmail_tokens"
    )
    await db.execute(
        "INSERT INTO integration_credentials (integration_id, tenant_id, provider, account,"
        " encrypted_secret) VALUES ($1, $2, 'gmail', $3, $4)",
        uuid.UUID(integration_id), uuid.UUID(tenant_id), email, sealed,
    )  # fmt: skip


async def recovery_rows(db: asyncpg.Connection, lead_id: str, count: int) -> list[Any]:
    async def check() -> Any:
        rows = await db.fetch(
            "SELECT step, strategy, status, replied_at FROM lead_recovery_log"
            " WHERE lead_id = $1 ORDER BY step",
            lead_id,
        )
        return rows if len(rows) >= count else None

    result: list[Any] = await eventually(check, timeout_s=20, what=f"{count} recovery attempts")
    return result


async def test_a_silent_cold_lead_gets_the_recovery_sequence_in_order(
    api: httpx.AsyncClient, make_tenant: MakeTenant, db: asyncpg.Connection,
    test_settings: Settings, gmail: GmailFake,
) -> None:  # fmt: skip
    tenant = await make_tenant()
    await with_mailbox(db, test_settings, gmail, tenant.tenant_id)
    # E-mail: it has no window (a lead on a channel nothing can reach ends its sequence).
    accepted = await post(api, tenant, channel="email",
                          contact=f"r-{uuid.uuid4().hex[:8]}@example.com",
                          text="just browsing")  # fmt: skip
    rows = await recovery_rows(db, accepted["lead_id"], 4)
    assert [(r["step"], r["strategy"]) for r in rows] == [
        (0, "re_engagement"), (1, "curiosity"), (2, "educational"), (3, "soft_cta"),
    ]  # fmt: skip
    await asyncio.sleep(2)
    assert len(await recovery_rows(db, accepted["lead_id"], 4)) == 4  # stops after the last step

    async def sent() -> Any:
        rows = await db.fetch(
            "SELECT send_status FROM messages WHERE lead_id = $1 AND sent_by = 'ai'",
            accepted["lead_id"],
        )
        return rows if len(rows) == 4 else None

    # Each attempt went out as an outbound command, through the tenant's mailbox.
    rows = await eventually(sent, what="four recovery messages recorded")
    assert [r["send_status"] for r in rows] == ["accepted"] * 4


def recovery_counts(text: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.labels["strategy"], sample.labels["outcome"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "flexoraa_recovery"
        for sample in family.samples
        if sample.name == "flexoraa_recovery_total"
    }


async def test_a_reply_ends_recovery_as_a_success(
    api: httpx.AsyncClient, make_tenant: MakeTenant, db: asyncpg.Connection,
    worker: ManagedProcess, test_settings: Settings, gmail: GmailFake,
) -> None:  # fmt: skip
    metrics_url = f"http://127.0.0.1:{worker.ports['web']}/metrics"
    async with httpx.AsyncClient() as scraper:
        before = recovery_counts((await scraper.get(metrics_url)).text)
    tenant = await make_tenant()
    await with_mailbox(db, test_settings, gmail, tenant.tenant_id)
    contact = f"r-{uuid.uuid4().hex[:8]}@example.com"
    accepted = await post(api, tenant, channel="email", contact=contact, text="hmm")
    await recovery_rows(db, accepted["lead_id"], 1)
    await post(api, tenant, channel="email", contact=contact, text="oh yes, tell me more")

    async def replied() -> Any:
        return await db.fetchrow(
            "SELECT * FROM lead_recovery_log WHERE lead_id = $1 AND status = 'replied'",
            accepted["lead_id"],
        )

    row = await eventually(replied, what="a replied recovery attempt")
    assert row["replied_at"] is not None
    stats = (await api.get("/api/monitoring/recovery/stats", headers=tenant.headers)).json()
    assert stats["replies"] == 1
    assert stats["attempts"] >= 1
    assert stats["steps"][row["step"]]["success_rate"] > 0
    async with httpx.AsyncClient() as scraper:
        after = recovery_counts((await scraper.get(metrics_url)).text)
    strategy = row["strategy"]
    assert after[(strategy, "replied")] - before[(strategy, "replied")] >= 1
    assert after[("re_engagement", "attempt")] - before[("re_engagement", "attempt")] >= 1


async def test_a_reply_in_the_same_second_as_the_deadline_is_one_consistent_outcome(
    api: httpx.AsyncClient, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    """Around the deadline the reply and the timer race: the lead either did not leak (the
    reply cancelled the deadline) or leaked once and its first reply is marked late, never a
    mix, never twice."""
    business = await register(api, await make_tenant())
    offsets_s = (-0.4, -0.15, 0.0, 0.15, 0.4)

    async def race(index: int, offset_s: float) -> str:
        at = int(time.time())
        lead_id = await inbound(api, business, f"9198666100{index:02d}", at, f"wamid.S{index}")
        await asyncio.sleep(max(0.0, at + THRESHOLD_S + offset_s - time.time()))
        await reply(api, business, lead_id, "Sorry for the wait!")
        return lead_id

    lead_ids = await asyncio.gather(*(race(i, o) for i, o in enumerate(offsets_s)))

    async def first_replies() -> Any:
        rows = await db.fetch(
            "SELECT lead_id::text, data FROM lead_events WHERE type = 'first_reply'"
            " AND lead_id = ANY($1::uuid[])", list(lead_ids),
        )  # fmt: skip
        return rows if len(rows) == len(lead_ids) else None

    replies = {row["lead_id"]: json.loads(row["data"]) for row in await eventually(first_replies)}
    await asyncio.sleep(THRESHOLD_S + 1)  # any late firing would have happened by now
    leaks = {
        str(row["lead_id"]): row["n"]
        for row in await db.fetch(
            "SELECT lead_id, count(*) AS n FROM lead_leakage_events"
            " WHERE lead_id = ANY($1::uuid[]) GROUP BY lead_id",
            list(lead_ids),
        )
    }
    for lead_id in lead_ids:
        assert leaks.get(lead_id, 0) in (0, 1)
        assert replies[lead_id]["leaked"] is (leaks.get(lead_id, 0) == 1), lead_id


async def test_a_deadline_failing_for_what_it_carries_is_dead_lettered_alone(
    api: httpx.AsyncClient,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
    test_settings: Settings,
    worker: ManagedProcess,
) -> None:
    """A warm lead's leak reassigns it, and PostgreSQL cannot read a lead id that is no UUID:
    the deadline failed at every tick and every restart, stopping the worker. Now that
    deadline alone is dead-lettered and cancelled; other leads' leaks still fire."""
    tenant = await make_tenant()
    await api.post("/api/sdrs", headers=tenant.headers,
                   json={"name": "a", "email": "a@example.com"})  # fmt: skip
    lead_id = f"lead-{uuid.uuid4().hex[:12]}"
    names = TopicNames(test_settings.topic_prefix)
    now = datetime.now(UTC)
    messages = [  # two unanswered messages, a second apart: a WARM lead
        InboundMessage(
            event_id=str(uuid.uuid4()), tenant_id=tenant.tenant_id,
            occurred_at=now + timedelta(seconds=i), lead_id=lead_id, channel="webchat",
            contact="v-poison", text=text, received_at=now + timedelta(seconds=i),
        )
        for i, text in enumerate(("hello?", "still there?"))
    ]  # fmt: skip
    await send_records(
        test_settings,
        names.inbound_messages,
        [(lead_id.encode(), message.model_dump_json().encode()) for message in messages],
    )

    async def processing_failures() -> list[DeadLetter] | None:
        letters = [
            DeadLetter.model_validate_json(record.value)
            for record in await read_records(test_settings, [names.dead_letters])
            if record.key == lead_id.encode()
        ]
        failed = [letter for letter in letters if letter.reason.startswith("processing failed")]
        return failed or None

    failed = await eventually(processing_failures, what="the failed deadline's dead letter")
    await asyncio.sleep(1)  # cancelled: not fired again on the next ticks
    assert len(await processing_failures() or []) == 1
    # Nor set again by the lead's next message: the wait counts as fired.
    later = datetime.now(UTC)
    third = messages[0].model_copy(
        update={"event_id": str(uuid.uuid4()), "occurred_at": later, "received_at": later}
    )
    await send_records(
        test_settings,
        names.inbound_messages,
        [(lead_id.encode(), third.model_dump_json().encode())],
    )
    await asyncio.sleep(THRESHOLD_S + 1)
    assert len(await processing_failures() or []) == 1
    assert failed[0].source_topic == names.deadlines
    assert "DataError" in failed[0].reason
    deadline = DeadlineReached.model_validate_json(base64.b64decode(failed[0].raw_base64))
    assert (deadline.lead_id, deadline.deadline) == (lead_id, "leak")

    accepted = await post(api, tenant, channel="webchat", contact=f"v-{uuid.uuid4().hex[:8]}",
                          text="anyone there?")  # fmt: skip
    (row,) = await leaks(db, accepted["lead_id"])
    assert row["temperature"] == "COLD"
    assert worker.process.poll() is None
