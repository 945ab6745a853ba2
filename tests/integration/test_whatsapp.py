"""WhatsApp, Instagram and Messenger end to end: signed webhooks in, sends out through a local
server speaking the Graph API, delivery statuses, the 24-hour window and its timer events."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer

from connectors.meta import signature_for
from flexoraa.settings import Settings
from schemas.events import DeadLetter, InboundMessage
from schemas.messaging import OutboundCommand
from schemas.topics import TopicNames
from streams.rules.identity import lead_id_for
from tests.conftest import (
    MakeTenant,
    ManagedProcess,
    StartProcess,
    Tenant,
    free_port,
    http_get_json,
    settings_env,
    wait_until,
)
from tests.fakes.graph_api import GraphApiFake
from tests.fakes.meta_payloads import (
    messaging_payload,
    whatsapp_change,
    whatsapp_message,
    whatsapp_payload,
    whatsapp_status,
)
from tests.integration.conftest import (
    ApiFactory,
    flexoraa,
    read_records,
    send_records,
    webhook_letters,
)
from tests.integration.test_pipeline import eventually, lead_state

pytestmark = pytest.mark.integration

TEMPLATE = "cold_recovery"


@pytest.fixture(scope="module")
def worker(processes: StartProcess, test_settings: Settings, graph: GraphApiFake) -> ManagedProcess:
    port = free_port()
    env = settings_env(
        test_settings,
        WORKER_WEB_PORT=str(port),
        WORKER_URL=f"http://127.0.0.1:{port}",
        WHATSAPP_GRAPH_API_URL=graph.url,
        WHATSAPP_TEMPLATE_NAME=TEMPLATE,
        WHATSAPP_TEMPLATE_PARAMETERS="contact_name,text",
        WHATSAPP_SEND_BACKOFF_MS="50",
        TIMER_TICK_MS="200",
        # Only the SDR replies these tests send; AI questions have their own tests.
        ENABLE_AI_QUALIFICATION="false",
    )
    process = processes("whatsapp-worker", ["worker"], env)
    process.ports["web"] = port
    wait_until(
        lambda: http_get_json(f"http://127.0.0.1:{port}/ready")[0] == 200, 120, "worker ready"
    )
    return process


@pytest.fixture
async def api(api_factory: ApiFactory, worker: ManagedProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with api_factory(worker_url=f"http://127.0.0.1:{worker.ports['web']}") as client:
        yield client


class Business:
    """A tenant with a registered WhatsApp number."""

    def __init__(self, tenant: Tenant, phone_number_id: str, app_secret: str) -> None:
        self.tenant = tenant
        self.phone_number_id = phone_number_id
        self.app_secret = app_secret

    def lead(self, contact: str, channel: str = "whatsapp") -> str:
        return lead_id_for(self.tenant.tenant_id, channel, contact)


_numbers = iter(range(10**9, 2 * 10**9, 7919))


async def register(
    api: httpx.AsyncClient, tenant: Tenant, app_secret: str = "app-secret-1"
) -> Business:
    phone_number_id = str(next(_numbers))
    response = await api.post(
        "/api/channels/whatsapp",
        headers=tenant.headers,
        json={
            "phone_number_id": phone_number_id,
            "waba_id": "102290129340398",
            "display_phone_number": "15550001111",
            "app_secret": app_secret,
            "verify_token": f"verify-{phone_number_id}",
            "access_token": f"EAAG-token-{phone_number_id}",
        },
    )
    assert response.status_code == 201, response.text
    return Business(tenant, phone_number_id, app_secret)


async def deliver(
    api: httpx.AsyncClient, payload: dict[str, Any], secret: str, *, header: str | None = None
) -> httpx.Response:
    body = json.dumps(payload).encode()
    signature = header if header is not None else signature_for(body, secret)
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": signature}
    return await api.post("/webhooks/whatsapp", content=body, headers=headers)


def now_s() -> int:
    return int(time.time())


# --------------------------------------------------------------------------- channels


async def test_channels_keep_secrets_encrypted_and_never_return_them(
    api: httpx.AsyncClient, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    tenant = await make_tenant()
    business = await register(api, tenant, app_secret="very-secret-app-secret")
    listed = await api.get("/api/channels", headers=tenant.headers)
    assert listed.status_code == 200
    (channel,) = listed.json()
    assert channel["external_id"] == business.phone_number_id
    text = listed.text
    for secret in ("very-secret-app-secret", "EAAG-token", "verify-"):
        assert secret not in text
    row = await db.fetchrow(
        "SELECT * FROM channels WHERE external_id = $1", business.phone_number_id
    )
    assert row is not None
    stored = b"".join(v for v in dict(row).values() if isinstance(v, bytes))
    assert b"very-secret-app-secret" not in stored
    assert b"EAAG-token" not in stored
    other = await make_tenant("Other")
    taken = await api.post(
        "/api/channels/whatsapp",
        headers=other.headers,
        json={"phone_number_id": business.phone_number_id, "app_secret": "x",
              "verify_token": "y", "access_token": "z"},
    )  # fmt: skip
    assert taken.status_code == 409


async def test_verification_handshake(api: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    business = await register(api, await make_tenant())
    token = f"verify-{business.phone_number_id}"
    ok = await api.get(
        "/webhooks/whatsapp",
        params={"hub.mode": "subscribe", "hub.verify_token": token, "hub.challenge": "1158201444"},
    )
    assert ok.status_code == 200
    assert ok.text == "1158201444"
    assert ok.headers["content-type"].startswith("text/plain")
    for params in (
        {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
        {"hub.mode": "unsubscribe", "hub.verify_token": token, "hub.challenge": "1"},
        {},
    ):
        assert (await api.get("/webhooks/whatsapp", params=params)).status_code == 403


# --------------------------------------------------------------------------- inbound


async def test_signed_webhook_with_many_entries_reaches_every_lead(
    api: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    business = await register(api, await make_tenant())
    t = now_s() - 60
    payload = whatsapp_payload(
        [
            whatsapp_change(
                business.phone_number_id,
                [
                    whatsapp_message("wamid.A1", "919811100001", t, body="Hi"),
                    whatsapp_message(
                        "wamid.A2", "919811100001", t + 1, "image", id="m", caption="x"
                    ),
                ],
                names={"919811100001": "Asha"},
            ),
            whatsapp_change(
                business.phone_number_id,
                [whatsapp_message("wamid.B1", "919811100002", t + 2, "location",
                                  latitude=1.0, longitude=2.0)],
            ),
        ],
        [
            whatsapp_change(
                business.phone_number_id, [whatsapp_message("wamid.C1", "919811100003", t)]
            )
        ],
    )  # fmt: skip
    response = await deliver(api, payload, business.app_secret)
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 4
    asha = await lead_state(api, business.tenant, business.lead("919811100001"), 2)
    assert asha["contact_name"] == "Asha"
    assert asha["window"]["open"] is True
    assert datetime.fromisoformat(asha["last_customer_message_at"]) == datetime.fromtimestamp(
        t + 1, tz=UTC
    )
    await lead_state(api, business.tenant, business.lead("919811100002"), 1)
    await lead_state(api, business.tenant, business.lead("919811100003"), 1)

    # Meta retries the same webhook: nothing new is produced or counted.
    replay = await deliver(api, payload, business.app_secret)
    assert replay.status_code == 200
    assert replay.json()["accepted"] == 0
    await asyncio.sleep(0.5)
    again = await lead_state(api, business.tenant, business.lead("919811100001"), 2)
    assert again["message_count"] == 2


async def test_a_malformed_item_is_set_aside_and_the_rest_of_the_webhook_is_taken(
    api: httpx.AsyncClient, make_tenant: MakeTenant, test_settings: Settings
) -> None:
    # One bad item answered 400 for the whole webhook: Meta retried it for days, failing the
    # same way, and the valid messages beside it waited with it.
    business = await register(api, await make_tenant())
    t = now_s() - 60
    good = whatsapp_message("wamid.M1", "919855500001", t, body="Still there?")
    no_sender = {"id": "wamid.M2", "timestamp": str(t), "type": "text", "text": {"body": "x"}}
    # Read, but refused by the event's schema: a 500 before, retried by Meta for days.
    long_type = whatsapp_message("wamid.M3", "919855500003", t) | {"type": "t" * 40}
    change = whatsapp_change(business.phone_number_id, [good, no_sender, long_type])
    response = await deliver(api, whatsapp_payload([change]), business.app_secret)
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "accepted": 1, "dropped": 0, "set_aside": 2}
    await lead_state(api, business.tenant, business.lead("919855500001"), 1)

    kept = {
        json.loads(raw)["id"]: reason
        for reason, raw in webhook_letters(test_settings, "whatsapp_business_account")
    }
    assert kept["wamid.M2"] == "a message without from or id"
    assert kept["wamid.M3"].startswith("refused by the event schema (message_type")
    lookup = await api.get(
        f"/api/leads/{business.lead('919855500003')}", headers=business.tenant.headers
    )
    assert lookup.status_code == 404

    # A signed body that is no JSON at all: kept whole, acknowledged.
    garbled = b'{"object": "whatsapp_business_account", ' + uuid.uuid4().hex.encode()
    headers = {"X-Hub-Signature-256": signature_for(garbled, business.app_secret)}
    odd = await api.post("/webhooks/whatsapp", content=garbled, headers=headers)
    assert odd.status_code == 200, odd.text
    assert odd.json() == {"status": "unparseable", "accepted": 0, "set_aside": 1}
    assert [reason for reason, raw in webhook_letters(test_settings, "meta") if raw == garbled]
    metrics = (await api.get("/metrics")).text
    counted = re.search(r'channel="whatsapp_business_account",outcome="malformed"} (\S+)', metrics)
    assert counted is not None
    assert float(counted.group(1)) >= 2
    # Not a topic's record: the replay leaves it alone.
    replayed = flexoraa(test_settings, "dead-letters", "replay", "--source", "webhook:meta")
    assert json.loads(replayed.stdout)["replayed"] == {}, replayed.stdout


@pytest.mark.parametrize(
    "header",
    [None, "", "sha256=" + "0" * 64, "md5=abc", "WRONG_SECRET", "OTHER_BODY"],
    ids=["missing", "empty", "zeros", "wrong-prefix", "wrong-secret", "other-body"],
)
async def test_bad_signatures_are_401_and_nothing_is_processed(
    api: httpx.AsyncClient, make_tenant: MakeTenant, header: str | None
) -> None:
    business = await register(api, await make_tenant())
    payload = whatsapp_payload(
        [
            whatsapp_change(
                business.phone_number_id, [whatsapp_message("wamid.X", "919822200001", now_s())]
            )
        ]
    )
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if header == "WRONG_SECRET":
        headers["X-Hub-Signature-256"] = signature_for(body, "not-the-app-secret")
    elif header == "OTHER_BODY":
        headers["X-Hub-Signature-256"] = signature_for(b"{}", business.app_secret)
    elif header is not None:
        headers["X-Hub-Signature-256"] = header
    response = await api.post("/webhooks/whatsapp", content=body, headers=headers)
    assert response.status_code == 401
    await asyncio.sleep(0.5)
    lookup = await api.get(
        f"/api/leads/{business.lead('919822200001')}", headers=business.tenant.headers
    )
    assert lookup.status_code == 404


async def test_unknown_number_is_acknowledged_and_dropped(
    api: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    business = await register(api, await make_tenant())
    payload = whatsapp_payload(
        [whatsapp_change("999000111", [whatsapp_message("wamid.U", "919833300001", now_s())])]
    )
    response = await deliver(api, payload, business.app_secret)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "accepted": 0, "dropped": 1, "set_aside": 0}
    metrics = (await api.get("/metrics")).text
    assert 'flexoraa_webhook_records_total{channel="whatsapp",outcome="unknown_account"}' in metrics


@pytest.mark.parametrize(("kind", "channel"), [("instagram", "instagram"), ("page", "facebook")])
async def test_instagram_and_messenger_messages(
    api: httpx.AsyncClient, make_tenant: MakeTenant, kind: str, channel: str
) -> None:
    tenant = await make_tenant()
    page_id = str(next(_numbers))
    registered = await api.post(
        f"/api/channels/{channel}",
        headers=tenant.headers,
        json={"page_id": page_id, "app_secret": "page-secret", "verify_token": f"v{page_id}",
              "access_token": "PAGE-TOKEN"},
    )  # fmt: skip
    assert registered.status_code == 201
    payload = messaging_payload(kind, page_id, "PSID42", f"m_{page_id}", int(time.time() * 1000))
    response = await deliver(api, payload, "page-secret")
    assert response.status_code == 200
    assert response.json()["accepted"] == 1
    state = await lead_state(api, tenant, lead_id_for(tenant.tenant_id, channel, "PSID42"), 1)
    assert state["channel"] == channel
    assert state["window"] == {**state["window"], "applies": True, "open": True}


# --------------------------------------------------------------------------- sending


async def inbound(
    api: httpx.AsyncClient, business: Business, contact: str, at: int, wamid: str
) -> str:
    payload = whatsapp_payload(
        [whatsapp_change(business.phone_number_id, [whatsapp_message(wamid, contact, at)],
                         names={contact: "Asha"})]
    )  # fmt: skip
    assert (await deliver(api, payload, business.app_secret)).status_code == 200
    lead_id = business.lead(contact)
    await lead_state(api, business.tenant, lead_id, 1)
    return lead_id


async def reply(api: httpx.AsyncClient, business: Business, lead_id: str, text: str) -> None:
    response = await api.post(
        f"/api/leads/{lead_id}/messages", headers=business.tenant.headers, json={"text": text}
    )
    assert response.status_code == 202, response.text


async def outbound_rows(api: httpx.AsyncClient, business: Business, lead_id: str) -> list[Any]:
    async def check() -> Any:
        response = await api.get(f"/api/leads/{lead_id}/messages", headers=business.tenant.headers)
        if response.status_code != 200:
            return None
        rows = [m for m in response.json()["items"] if m["direction"] == "outbound"]
        return rows or None

    result: list[Any] = await eventually(check, what="an outbound message")
    return result


async def test_inside_the_window_a_freeform_text_goes_out(
    api: httpx.AsyncClient, make_tenant: MakeTenant, graph: GraphApiFake
) -> None:
    business = await register(api, await make_tenant())
    lead_id = await inbound(api, business, "919844400001", now_s() - 60, "wamid.S1")
    await reply(api, business, lead_id, "Pro is $49 a month.")
    (row,) = await outbound_rows(api, business, lead_id)
    assert row["send_kind"] == "freeform"
    assert row["status"] == "accepted"
    assert row["channel_message_id"].startswith("wamid.FAKE")
    (request,) = graph.sent_to(business.phone_number_id)
    assert request["authorization"] == f"Bearer EAAG-token-{business.phone_number_id}"
    assert request["body"]["type"] == "text"
    assert request["body"]["to"] == "919844400001"
    assert request["body"]["text"]["body"] == "Pro is $49 a month."


async def test_a_reply_retried_with_its_idempotency_key_goes_out_once(
    api: httpx.AsyncClient, make_tenant: MakeTenant, graph: GraphApiFake
) -> None:
    # A 503 on a Kafka timeout does not prove the record was not written: a retry was a new
    # command, and the customer got the reply twice.
    business = await register(api, await make_tenant())
    lead_id = await inbound(api, business, "919844400009", now_s() - 60, "wamid.S9")
    headers = business.tenant.headers | {"Idempotency-Key": "reply-42"}
    answers = [
        await api.post(f"/api/leads/{lead_id}/messages", headers=headers,
                       json={"text": "Once, please."})
        for _ in range(3)
    ]  # fmt: skip
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["command_id"] for a in answers}) == 1
    await reply(api, business, lead_id, "A second reply, without a key.")
    await eventually(lambda: _sent_count(graph, business, 2), what="both replies at the Graph API")
    await asyncio.sleep(1.0)  # a duplicate would follow within the worker's next fetch
    texts = [r["body"]["text"]["body"] for r in graph.sent_to(business.phone_number_id)]
    assert sorted(texts) == ["A second reply, without a key.", "Once, please."]


async def test_a_scheduled_message_retried_with_its_key_is_the_same_even_once_due(
    api: httpx.AsyncClient, make_tenant: MakeTenant, graph: GraphApiFake
) -> None:
    # Retried after its send_at (as a 503 invites), it was refused as "not in the future";
    # retried with another text, it was accepted while the first row stayed listed.
    business = await register(api, await make_tenant())
    lead_id = await inbound(api, business, "919844400010", now_s() - 60, "wamid.S10")
    path = f"/api/leads/{lead_id}/messages"
    headers = business.tenant.headers | {"Idempotency-Key": "later-7"}
    message = {"text": "Talk at noon?",
               "send_at": (datetime.now(UTC) + timedelta(seconds=2)).isoformat()}  # fmt: skip
    first = await api.post(path, headers=headers, json=message)
    assert first.status_code == 202, first.text
    other = await api.post(path, headers=headers, json=message | {"text": "Talk at one?"})
    assert other.status_code == 409, other.text
    await asyncio.sleep(2.5)  # its time has passed
    again = await api.post(path, headers=headers, json=message)
    assert again.status_code == 202, again.text
    assert again.json()["command_id"] == first.json()["command_id"]
    await eventually(lambda: _sent_count(graph, business, 1), what="the scheduled message")
    await scheduled_status(api, business, first.json()["command_id"], "sent")
    # Sent: a retry now answers it as it stands, and does not publish it again; the key for
    # a message to send now is another message.
    late = await api.post(path, headers=headers, json=message)
    assert late.status_code == 202, late.text
    now_instead = await api.post(path, headers=headers, json={"text": "Talk at noon?"})
    assert now_instead.status_code == 409, now_instead.text
    await asyncio.sleep(1.0)  # a duplicate would follow within the worker's next fetch
    texts = [r["body"]["text"]["body"] for r in graph.sent_to(business.phone_number_id)]
    assert texts == ["Talk at noon?"]


async def _sent_count(graph: GraphApiFake, business: Business, count: int) -> bool | None:
    return len(graph.sent_to(business.phone_number_id)) >= count or None


@pytest.mark.parametrize(
    ("age", "kind"),
    [
        (timedelta(hours=24) - timedelta(minutes=3), "freeform"),
        # The window's last 2 minutes go by template: Meta fails a late free-form one after its 200.
        (timedelta(hours=24) - timedelta(seconds=30), "template"),
        (timedelta(hours=24), "template"),
    ],
    ids=["inside", "last-minutes", "at-24h"],
)
async def test_the_window_boundary_decides_freeform_or_template(
    api: httpx.AsyncClient,
    make_tenant: MakeTenant,
    graph: GraphApiFake,
    age: timedelta,
    kind: str,
) -> None:
    business = await register(api, await make_tenant())
    at = now_s() - int(age.total_seconds())
    lead_id = await inbound(api, business, "919844400002", at, "wamid.S2")
    await reply(api, business, lead_id, "Following up")
    (row,) = await outbound_rows(api, business, lead_id)
    assert row["send_kind"] == kind
    (request,) = graph.sent_to(business.phone_number_id)
    if kind == "template":
        template = request["body"]["template"]
        assert request["body"]["type"] == "template"
        assert template["name"] == TEMPLATE
        assert template["components"][0]["parameters"] == [
            {"type": "text", "text": "Asha"},
            {"type": "text", "text": "Following up"},
        ]
    else:
        assert request["body"]["type"] == "text"


async def test_error_131047_falls_back_to_the_template(
    api: httpx.AsyncClient, make_tenant: MakeTenant, graph: GraphApiFake
) -> None:
    business = await register(api, await make_tenant())
    lead_id = await inbound(api, business, "919844400003", now_s() - 60, "wamid.S3")
    graph.script(business.phone_number_id, GraphApiFake.error(131047, "Re-engagement message"))
    await reply(api, business, lead_id, "Are you still there?")
    (row,) = await outbound_rows(api, business, lead_id)
    assert row["send_kind"] == "template"
    assert row["status"] == "accepted"
    kinds = [r["body"]["type"] for r in graph.sent_to(business.phone_number_id)]
    assert kinds == ["text", "template"]


async def test_a_freeform_message_meta_fails_later_with_131047_goes_again_as_the_template(
    api: httpx.AsyncClient, make_tenant: MakeTenant, graph: GraphApiFake
) -> None:
    # Meta answers 200 and reports the 131047 afterwards, as a status (its clock had the
    # window closed). Only recorded, the reply never reached the lead.
    business = await register(api, await make_tenant())
    contact = "919844400013"
    lead_id = await inbound(api, business, contact, now_s() - 60, "wamid.S13")
    await reply(api, business, lead_id, "Your quote is ready.")
    (row,) = await outbound_rows(api, business, lead_id)
    assert row["send_kind"] == "freeform"
    failed = whatsapp_status(row["channel_message_id"], "failed", now_s(), contact, 131047)
    payload = whatsapp_payload([whatsapp_change(business.phone_number_id, statuses=[failed])])
    # Twice, as Meta may: sent again once.
    for _ in range(2):
        assert (await deliver(api, payload, business.app_secret)).status_code == 200

    async def resent() -> Any:
        rows = await outbound_rows(api, business, lead_id)
        return rows if len(rows) == 2 else None

    first, again = await eventually(resent, what="the reply sent again as the template")
    assert (first["send_kind"], first["status"], first["error_code"]) == (
        "freeform", "failed", "131047",
    )  # fmt: skip
    assert (again["send_kind"], again["status"], again["text"]) == (
        "template", "accepted", "Your quote is ready.",
    )  # fmt: skip
    await asyncio.sleep(1.0)  # a second resend would have gone by now
    requests = graph.sent_to(business.phone_number_id)
    assert [r["body"]["type"] for r in requests] == ["text", "template"]
    assert requests[1]["body"]["template"]["components"][0]["parameters"][1] == {
        "type": "text", "text": "Your quote is ready.",
    }  # fmt: skip


async def test_500_twice_then_200_is_retried(
    api: httpx.AsyncClient, make_tenant: MakeTenant, graph: GraphApiFake
) -> None:
    business = await register(api, await make_tenant())
    lead_id = await inbound(api, business, "919844400004", now_s() - 60, "wamid.S4")
    unavailable = GraphApiFake.error(2, "Service temporarily unavailable", http_status=500)
    graph.script(business.phone_number_id, unavailable, unavailable)
    await reply(api, business, lead_id, "Retry me")
    (row,) = await outbound_rows(api, business, lead_id)
    assert row["status"] == "accepted"
    assert len(graph.sent_to(business.phone_number_id)) == 3


async def test_leads_are_sent_to_at_once_and_a_leads_messages_in_order(
    api: httpx.AsyncClient, make_tenant: MakeTenant, graph: GraphApiFake
) -> None:
    business = await register(api, await make_tenant())
    leads = [
        await inbound(api, business, f"91984450{i:04d}", now_s() - 60, f"wamid.C{i}")
        for i in range(6)
    ]
    graph.answer_after_s = 1.0  # one at a time, six sends would take six seconds
    graph.most_in_flight = 0
    try:
        await reply(api, business, leads[0], "first")
        await asyncio.gather(
            reply(api, business, leads[0], "second"),
            *(reply(api, business, lead, "hello") for lead in leads[1:]),
        )

        async def all_sent() -> bool:
            return len(graph.sent_to(business.phone_number_id)) == 7 and graph.in_flight == 0

        await eventually(all_sent, what="seven sends answered")
    finally:
        graph.answer_after_s = 0.0
    assert 2 <= graph.most_in_flight <= 6
    to_first_lead = [
        r["body"]["text"]["body"]
        for r in graph.sent_to(business.phone_number_id)
        if r["body"]["to"] == "919844500000"
    ]
    assert to_first_lead == ["first", "second"]

    async def both_recorded() -> bool:
        rows = await outbound_rows(api, business, leads[0])
        return [r["status"] for r in rows] == ["accepted", "accepted"]

    await eventually(both_recorded, what="both messages of the first lead recorded as accepted")


async def test_other_errors_are_recorded_with_metas_code(
    api: httpx.AsyncClient, make_tenant: MakeTenant, graph: GraphApiFake
) -> None:
    business = await register(api, await make_tenant())
    lead_id = await inbound(api, business, "919844400005", now_s() - 60, "wamid.S5")
    graph.script(business.phone_number_id, GraphApiFake.error(131026, "Message undeliverable"))
    await reply(api, business, lead_id, "Hello?")
    (row,) = await outbound_rows(api, business, lead_id)
    assert row["status"] == "failed"
    assert row["error_code"] == "131026"
    assert "undeliverable" in row["error"]
    assert len(graph.sent_to(business.phone_number_id)) == 1
    stats = (await api.get("/api/whatsapp/sessions/stats", headers=business.tenant.headers)).json()
    assert stats["failures_by_error_code"] == {"131026": 1}
    assert stats["open_windows"] == 1


async def test_statuses_out_of_order_never_go_back_from_read(
    api: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    business = await register(api, await make_tenant())
    contact = "919844400006"
    lead_id = await inbound(api, business, contact, now_s() - 60, "wamid.S6")
    await reply(api, business, lead_id, "Status test")
    (row,) = await outbound_rows(api, business, lead_id)
    wamid = row["channel_message_id"]
    t = now_s()
    for status, at in [("read", t + 2), ("sent", t), ("delivered", t + 1)]:
        payload = whatsapp_payload(
            [whatsapp_change(business.phone_number_id,
                             statuses=[whatsapp_status(wamid, status, at, contact)])]
        )  # fmt: skip
        assert (await deliver(api, payload, business.app_secret)).status_code == 200

    async def read() -> Any:
        (current,) = await outbound_rows(api, business, lead_id)
        return current if current["status"] == "read" else None

    current = await eventually(read, what="the read status")
    await asyncio.sleep(0.5)
    (current,) = await outbound_rows(api, business, lead_id)
    assert current["status"] == "read"
    assert datetime.fromisoformat(current["status_at"]) == datetime.fromtimestamp(t + 2, tz=UTC)


# --------------------------------------------------------------------------- window timers


async def test_window_closing_and_expired_events_fire_from_timers(
    api: httpx.AsyncClient, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    business = await register(api, await make_tenant())
    # The window closes 3 seconds from now; the 60-minute notice is already due.
    at = now_s() - 24 * 3600 + 3
    lead_id = await inbound(api, business, "919855500001", at, "wamid.W1")

    async def fired() -> Any:
        rows = await db.fetch(
            "SELECT type, occurred_at, data FROM lead_events WHERE lead_id = $1"
            " AND type LIKE 'window_%' ORDER BY occurred_at",
            lead_id,
        )
        return rows if len(rows) == 2 else None

    rows = await eventually(fired, timeout_s=20, what="window_closing and window_expired")
    assert [r["type"] for r in rows] == ["window_closing", "window_expired"]
    assert rows[1]["occurred_at"] == datetime.fromtimestamp(at + 24 * 3600, tz=UTC)
    data = json.loads(rows[1]["data"])
    assert data["channel"] == "whatsapp"
    assert datetime.fromisoformat(data["closes_at"]) == rows[1]["occurred_at"]
    await asyncio.sleep(1)  # nothing fires twice
    count = await db.fetchval(
        "SELECT count(*) FROM lead_events WHERE lead_id = $1 AND type LIKE 'window_%'", lead_id
    )
    assert count == 2


# --------------------------------------------------------------------------- scheduled messages


async def schedule(
    api: httpx.AsyncClient, business: Business, lead_id: str, text: str, in_s: float
) -> dict[str, Any]:
    send_at = datetime.now(UTC) + timedelta(seconds=in_s)
    response = await api.post(
        f"/api/leads/{lead_id}/messages",
        headers=business.tenant.headers,
        json={"text": text, "send_at": send_at.isoformat()},
    )
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


async def scheduled_status(
    api: httpx.AsyncClient, business: Business, scheduled_id: str, status: str
) -> Any:
    async def check() -> Any:
        response = await api.get(
            f"/api/scheduled-messages/{scheduled_id}", headers=business.tenant.headers
        )
        body = response.json()
        return body if response.status_code == 200 and body["status"] == status else None

    return await eventually(check, what=f"scheduled message {status}")


async def test_a_scheduled_message_goes_out_at_send_at(
    api: httpx.AsyncClient, make_tenant: MakeTenant, graph: GraphApiFake
) -> None:
    business = await register(api, await make_tenant())
    lead_id = await inbound(api, business, "919877700001", now_s() - 60, "wamid.T1")
    accepted = await schedule(api, business, lead_id, "Reminder: our call is at 3pm", 2)
    await asyncio.sleep(0.5)
    assert graph.sent_to(business.phone_number_id) == []  # held until send_at
    sent = await scheduled_status(api, business, accepted["command_id"], "sent")
    assert sent["text"] == "Reminder: our call is at 3pm"
    (request,) = graph.sent_to(business.phone_number_id)
    assert request["body"]["type"] == "text"
    other = await make_tenant("Other")
    hidden = await api.get(
        f"/api/scheduled-messages/{accepted['command_id']}", headers=other.headers
    )
    assert hidden.status_code == 404


async def test_the_window_is_judged_at_send_time(
    api: httpx.AsyncClient, make_tenant: MakeTenant, graph: GraphApiFake
) -> None:
    business = await register(api, await make_tenant())
    # Open now, closed in 2 seconds; the message is due in 4.
    lead_id = await inbound(api, business, "919877700002", now_s() - 24 * 3600 + 2, "wamid.T2")
    accepted = await schedule(api, business, lead_id, "Checking in", 4)
    await scheduled_status(api, business, accepted["command_id"], "sent")
    (request,) = graph.sent_to(business.phone_number_id)
    assert request["body"]["type"] == "template"


async def test_a_cancelled_message_never_goes_out(
    api: httpx.AsyncClient, make_tenant: MakeTenant, graph: GraphApiFake
) -> None:
    business = await register(api, await make_tenant())
    lead_id = await inbound(api, business, "919877700003", now_s() - 60, "wamid.T3")
    accepted = await schedule(api, business, lead_id, "Never mind", 2)
    path = f"/api/scheduled-messages/{accepted['command_id']}"
    cancelled = await api.delete(path, headers=business.tenant.headers)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    await asyncio.sleep(3)
    assert graph.sent_to(business.phone_number_id) == []
    again = await api.delete(path, headers=business.tenant.headers)  # a retry: idempotent
    assert again.status_code == 200
    assert again.json()["status"] == "cancelled"
    past = await api.post(
        f"/api/leads/{lead_id}/messages",
        headers=business.tenant.headers,
        json={"text": "too late", "send_at": "2020-01-01T00:00:00Z"},
    )
    assert past.status_code == 422
    assert "send_at" in past.json()["detail"]


async def test_a_cancel_kafka_did_not_confirm_stays_cancelled_and_is_retried_safely(
    api: httpx.AsyncClient,
    api_factory: ApiFactory,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
    graph: GraphApiFake,
) -> None:
    # On a 503 the row went back to "scheduled"; a cancel that had landed (a timeout proves
    # nothing) then left it "scheduled" for good while nothing was sent.
    business = await register(api, await make_tenant())
    lead_id = await inbound(api, business, "919877700005", now_s() - 60, "wamid.T5")
    accepted = await schedule(api, business, lead_id, "Maybe later", 3)
    path = f"/api/scheduled-messages/{accepted['command_id']}"
    async with api_factory(kafka_bootstrap_servers="127.0.0.1:9") as no_kafka:
        unconfirmed = await no_kafka.delete(path, headers=business.tenant.headers)
    assert unconfirmed.status_code == 503
    status = await db.fetchval("SELECT status FROM scheduled_messages WHERE scheduled_id = $1",
                               uuid.UUID(accepted["command_id"]))  # fmt: skip
    assert status == "cancelled"
    retried = await api.delete(path, headers=business.tenant.headers)
    assert retried.status_code == 200
    await asyncio.sleep(4)
    assert graph.sent_to(business.phone_number_id) == []


async def test_a_scheduled_message_kafka_did_not_confirm_stays_listed_and_can_be_cancelled(
    api: httpx.AsyncClient,
    api_factory: ApiFactory,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
    worker: ManagedProcess,
) -> None:
    # Without an Idempotency-Key the row was deleted on the 503: a command written after all
    # went out at send_at, unlisted, and nothing could cancel it.
    business = await register(api, await make_tenant())
    lead_id = await inbound(api, business, "919877700006", now_s() - 60, "wamid.T6")
    send_at = datetime.now(UTC) + timedelta(seconds=60)
    no_broker = {"kafka_bootstrap_servers": "127.0.0.1:9",
                 "worker_url": f"http://127.0.0.1:{worker.ports['web']}"}  # fmt: skip
    async with api_factory(**no_broker) as no_kafka:
        refused = await no_kafka.post(
            f"/api/leads/{lead_id}/messages",
            headers=business.tenant.headers,
            json={"text": "See you Monday", "send_at": send_at.isoformat()},
        )
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "5"
    (scheduled_id,) = await db.fetch(
        "SELECT scheduled_id::text FROM scheduled_messages WHERE lead_id = $1", uuid.UUID(lead_id)
    )
    assert scheduled_id[0] in refused.json()["detail"]
    listed = await api.get(
        f"/api/scheduled-messages/{scheduled_id[0]}", headers=business.tenant.headers
    )
    assert listed.status_code == 200
    assert listed.json()["status"] == "cancelled"
    assert "not queued" in listed.json()["error"]
    # Kafka back: the cancel the 503 advises goes out, so a command that landed never sends.
    cancelled = await api.delete(
        f"/api/scheduled-messages/{scheduled_id[0]}", headers=business.tenant.headers
    )
    assert cancelled.status_code == 200


async def test_a_message_already_due_cannot_be_cancelled(
    api: httpx.AsyncClient, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    # Due, its row says "scheduled" until the send is recorded: a cancel then answered
    # "cancelled" while the message went out.
    business = await register(api, await make_tenant())
    lead_id = await inbound(api, business, "919877700004", now_s() - 60, "wamid.T4")
    accepted = await schedule(api, business, lead_id, "Due now", 3600)
    await db.execute(
        "UPDATE scheduled_messages SET send_at = now() - interval '1 second'"
        " WHERE scheduled_id = $1",
        uuid.UUID(accepted["command_id"]),
    )
    path = f"/api/scheduled-messages/{accepted['command_id']}"
    refused = await api.delete(path, headers=business.tenant.headers)
    assert refused.status_code == 409
    assert "due" in refused.json()["detail"]


async def test_a_command_read_before_its_leads_first_message_goes_out_once_the_lead_is_known(
    api: httpx.AsyncClient, make_tenant: MakeTenant, graph: GraphApiFake, test_settings: Settings
) -> None:
    # After a crash the outbound agent may replay a command (an AI question) before the
    # sessions agent has replayed the message that caused it: the lead is not known yet.
    business = await register(api, await make_tenant())
    contact = "919877700009"
    lead_id = business.lead(contact)
    command = OutboundCommand(
        event_id=str(uuid.uuid4()), tenant_id=business.tenant.tenant_id,
        occurred_at=datetime.now(UTC), lead_id=lead_id, text="What is your budget?",
        sent_by="ai", purpose="qualification",
    )  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=test_settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(
            TopicNames(test_settings.topic_prefix).outbound_commands,
            key=lead_id.encode(),
            value=command.model_dump_json().encode(),
        )
    finally:
        await producer.stop()
    await asyncio.sleep(1)
    assert graph.sent_to(business.phone_number_id) == []  # nobody to send it to yet
    await inbound(api, business, contact, now_s() - 5, "wamid.U1")
    (row,) = await outbound_rows(api, business, lead_id)
    assert (row["status"], row["send_kind"], row["sent_by"]) == ("accepted", "freeform", "ai")
    (request,) = graph.sent_to(business.phone_number_id)
    assert request["body"]["text"]["body"] == "What is your budget?"


async def test_a_command_failing_for_what_it_carries_is_dead_lettered_and_the_worker_goes_on(
    api: httpx.AsyncClient,
    make_tenant: MakeTenant,
    graph: GraphApiFake,
    test_settings: Settings,
    worker: ManagedProcess,
) -> None:
    # A lead whose tenant id is no UUID: the channel lookup in PostgreSQL fails on it (asyncpg
    # refuses the parameter), and the outbound agent stopped the worker at every restart.
    business = await register(api, await make_tenant())
    good_lead = await inbound(api, business, "919877700010", now_s() - 5, "wamid.P1")
    names = TopicNames(test_settings.topic_prefix)
    poison_lead = str(uuid.uuid4())
    now = datetime.now(UTC)
    message = InboundMessage(
        event_id=str(uuid.uuid4()), tenant_id="not-a-tenant-id", occurred_at=now,
        lead_id=poison_lead, channel="whatsapp", contact="919877700011", text="hi",
        received_at=now,
    )  # fmt: skip
    command = OutboundCommand(
        event_id=str(uuid.uuid4()), tenant_id="not-a-tenant-id", occurred_at=now,
        lead_id=poison_lead, text="never sent", sent_by="sdr",
    )  # fmt: skip

    async def dead_letters(source_topic: str) -> list[DeadLetter] | None:
        letters = [
            DeadLetter.model_validate_json(record.value)
            for record in await read_records(test_settings, [names.dead_letters])
            if record.key == poison_lead.encode()
        ]
        return [letter for letter in letters if letter.source_topic == source_topic] or None

    key = poison_lead.encode()
    await send_records(
        test_settings, names.inbound_messages, [(key, message.model_dump_json().encode())]
    )
    # The lead is known once its message is handled (its other agents dead-letter it).
    await eventually(partial(dead_letters, names.inbound_messages), what="the lead's message")
    await send_records(
        test_settings, names.outbound_commands, [(key, command.model_dump_json().encode())]
    )

    (letter,) = await eventually(
        partial(dead_letters, names.outbound_commands), what="the command's dead letter"
    )
    assert letter.reason.startswith("processing failed: DataError")
    assert OutboundCommand.model_validate_json(base64.b64decode(letter.raw_base64)) == command
    await reply(api, business, good_lead, "Sent after it.")
    (row,) = await outbound_rows(api, business, good_lead)
    assert row["status"] == "accepted"
    assert [r["body"]["text"]["body"] for r in graph.sent_to(business.phone_number_id)] == [
        "Sent after it."
    ]
    assert worker.process.poll() is None
