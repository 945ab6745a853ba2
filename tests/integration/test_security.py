"""Rate limits, webhook signature attacks and cross-tenant access on every endpoint with an id."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import SecretStr

from api.main import create_app
from connectors.meta import signature_for
from flexoraa.settings import Settings
from tests.conftest import (
    MakeTenant,
    ManagedProcess,
    StartProcess,
    free_port,
    http_get_json,
    settings_env,
    start_worker,
    wait_until,
)
from tests.fakes.razorpay_api import webhook_body, webhook_signature
from tests.integration.conftest import ApiFactory
from tests.integration.test_pipeline import eventually, post

pytestmark = pytest.mark.integration
MISSING_ID = "00000000-0000-4000-8000-000000000000"


async def test_an_api_key_over_its_limit_gets_429_with_retry_after(
    api_factory: ApiFactory, make_tenant: MakeTenant
) -> None:
    busy, other = await make_tenant(), await make_tenant("Other")
    async with api_factory(api_rate_limit="5/minute") as api:
        answers = [(await api.get("/api/sdrs", headers=busy.headers)) for _ in range(7)]
        assert [a.status_code for a in answers] == [200] * 5 + [429] * 2
        limited = answers[-1]
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        assert "rate limit" in limited.json()["detail"]
        # Another key has its own allowance.
        assert (await api.get("/api/sdrs", headers=other.headers)).status_code == 200


async def test_an_address_guessing_keys_gets_429_before_a_lookup(
    api_factory: ApiFactory, make_tenant: MakeTenant
) -> None:
    # Keys nobody issued were never limited: each one was a database query.
    tenant = await make_tenant()
    async with api_factory(auth_failure_rate_limit="3/minute") as api:
        assert (await api.get("/api/sdrs", headers=tenant.headers)).status_code == 200
        guesses = [
            (await api.get("/api/sdrs", headers={"Authorization": f"Bearer guess-{i}"}))
            for i in range(5)
        ]
        assert [g.status_code for g in guesses] == [401] * 3 + [429] * 2
        assert 1 <= int(guesses[-1].headers["Retry-After"]) <= 60
        # A key verified before goes on (cached: no lookup to protect).
        assert (await api.get("/api/sdrs", headers=tenant.headers)).status_code == 200


async def test_guesses_sent_at_once_or_a_key_revoked_elsewhere_are_limited_too(
    api_factory: ApiFactory, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    # Counted only once they failed, guesses sent at once all passed the check (500 lookups
    # at "30/minute"); a key revoked on another replica counted as "verified before" forever.
    tenant = await make_tenant()
    limits = {"auth_failure_rate_limit": "3/minute", "api_key_cache_ttl_s": 0.2}
    async with api_factory(**limits) as api:
        burst = await asyncio.gather(*(
            api.get("/api/sdrs", headers={"Authorization": f"Bearer burst-{i}"})
            for i in range(12)
        ))  # fmt: skip
        codes = Counter(b.status_code for b in burst)
        assert codes[401] <= 3
        assert codes[429] == 12 - codes[401]
    # One valid key sent at once right after a start (nothing cached): one lookup, all 200;
    # each counted as a lookup under way, most of them were refused as failed keys.
    async with api_factory(**limits) as api:
        valid = await asyncio.gather(*(api.get("/api/sdrs", headers=tenant.headers)
                                       for _ in range(20)))  # fmt: skip
        assert {v.status_code for v in valid} == {200}
    async with api_factory(**limits) as api:
        assert (await api.get("/api/sdrs", headers=tenant.headers)).status_code == 200
        await db.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE tenant_id = $1",
            uuid.UUID(tenant.tenant_id),
        )
        await asyncio.sleep(0.3)  # past the cache's TTL
        tries = [(await api.get("/api/sdrs", headers=tenant.headers)).status_code for _ in range(5)]
        assert tries == [401] * 3 + [429] * 2


async def test_a_webhook_sender_over_its_limit_gets_429(api_factory: ApiFactory) -> None:
    async with api_factory(
        webhook_rate_limit="3/minute", razorpay_webhook_secret=SecretStr("whsec_x")
    ) as api:
        codes = [(await api.post("/webhooks/razorpay", content=b"{}")).status_code
                 for _ in range(4)]  # fmt: skip
    assert codes == [400, 400, 400, 429]
    # Meta's handshake too: keyless, each one was a database query, never limited.
    handshake = {"hub.mode": "subscribe", "hub.verify_token": "guess", "hub.challenge": "1"}
    async with api_factory(webhook_rate_limit="3/minute") as api:
        codes = [(await api.get("/webhooks/whatsapp", params=handshake)).status_code
                 for _ in range(4)]  # fmt: skip
    assert codes == [403, 403, 403, 429]


async def test_webhook_signature_attacks_are_refused_and_produce_nothing(
    api_factory: ApiFactory, db: asyncpg.Connection
) -> None:
    secret = "whsec_attack"
    body = webhook_body("payment.captured", "order_ATTACK0001", "pay_ATTACK0001", 5000, "USD")
    async with api_factory(razorpay_webhook_secret=SecretStr(secret), max_body_bytes=4096) as api:
        attacks = {
            "missing": {},
            "wrong prefix": {"X-Razorpay-Signature": "sha256=" + webhook_signature(body, secret)},
            "other body": {"X-Razorpay-Signature": webhook_signature(b'{"event":"x"}', secret)},
            "api secret": {"X-Razorpay-Signature": webhook_signature(body, "rzp_key_secret")},
        }
        for name, headers in attacks.items():
            response = await api.post("/webhooks/razorpay", content=body, headers=headers)
            assert response.status_code == 400, name
        huge = b'{"event": "payment.captured", "pad": "' + b"x" * 10_000 + b'"}'
        oversized = await api.post(
            "/webhooks/razorpay", content=huge,
            headers={"X-Razorpay-Signature": webhook_signature(huge, secret)},
        )  # fmt: skip
        assert oversized.status_code == 413
        meta_huge = await api.post(
            "/webhooks/whatsapp", content=huge,
            headers={"X-Hub-Signature-256": signature_for(huge, "any")},
        )  # fmt: skip
        assert meta_huge.status_code == 413

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"name": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        # Chunked, no Content-Length, to a body FastAPI parses: it answered 400.
        unsized = await api.post("/api/sdrs", content=chunks(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
        assert unsized.status_code == 413, unsized.text
    assert await db.fetchval("SELECT count(*) FROM payment_events WHERE order_id = $1",
                             "order_ATTACK0001") == 0  # fmt: skip


async def test_a_slow_body_is_cut_off_with_408_and_produces_nothing(
    processes: StartProcess, test_settings: Settings, db: asyncpg.Connection
) -> None:
    """A client dripping a signed webhook body (slowloris) through the real HTTP server."""
    secret = "whsec_slow"
    port = free_port()
    env = settings_env(test_settings, API_PORT=str(port), REQUEST_BODY_TIMEOUT_S="1.5",
                       RAZORPAY_WEBHOOK_SECRET=secret)  # fmt: skip
    server = processes("slow-body-api", ["api"], env)
    await asyncio.to_thread(
        wait_until,
        lambda: http_get_json(f"http://127.0.0.1:{port}/health")[0] == 200,
        60,
        "the API to be healthy",
    )
    body = webhook_body("payment.captured", "order_SLOW00001", "pay_SLOW00001", 5000, "USD")
    # A webhook reads its body itself; FastAPI parses an API route's, and answered 400 "error
    # parsing the body" where the limit said 408.
    for path in ("/webhooks/razorpay", "/api/sdrs"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"X-Razorpay-Signature: {webhook_signature(body, secret)}\r\n\r\n"
        )
        writer.write(head.encode())
        started = time.monotonic()

        async def drip(writer: asyncio.StreamWriter = writer) -> None:
            for i in range(len(body) - 1):  # never the last byte in time
                writer.write(body[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0.2)

        dripping = asyncio.create_task(drip())
        try:
            status_line = await asyncio.wait_for(reader.readline(), timeout=15)
        finally:
            dripping.cancel()
            writer.close()
        assert status_line.split()[1] == b"408", (path, status_line)
        assert time.monotonic() - started < 10
    assert server.process.poll() is None
    # The server still serves, and the dripped webhook credited nothing.
    assert (await asyncio.to_thread(http_get_json, f"http://127.0.0.1:{port}/health"))[0] == 200
    assert await db.fetchval("SELECT count(*) FROM payment_events WHERE order_id = $1",
                             "order_SLOW00001") == 0  # fmt: skip


# --------------------------------------------------------------------------- cross-tenant


@pytest.fixture(scope="module")
def worker(processes: StartProcess, test_settings: Settings) -> ManagedProcess:
    return start_worker(processes, test_settings, name="security-worker",
                        ENABLE_AI_QUALIFICATION="false")  # fmt: skip


@pytest.fixture
async def api(api_factory: ApiFactory, worker: ManagedProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with api_factory(worker_url=f"http://127.0.0.1:{worker.ports['web']}") as client:
        yield client


def routes_with_ids(settings: Settings) -> list[tuple[str, str]]:
    paths = create_app(settings).openapi()["paths"]
    return [(method.upper(), path) for path, operations in paths.items() if "{" in path
            for method in operations]  # fmt: skip


async def test_another_tenants_ids_look_exactly_like_missing_ones(
    api: httpx.AsyncClient, test_settings: Settings, make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:  # fmt: skip
    owner, intruder = await make_tenant("Owner"), await make_tenant("Intruder")
    lead_id = (await post(api, owner, channel="sms", contact="5550101010", text="hi"))["lead_id"]

    async def lead_sunk() -> Any:
        return await db.fetchval("SELECT 1 FROM leads WHERE lead_id = $1", uuid.UUID(lead_id))

    await eventually(lead_sunk, what="the owner's lead")
    sdr = (await api.post("/api/sdrs", headers=owner.headers,
                          json={"name": "Owen", "email": "owen@example.com"})).json()  # fmt: skip
    scheduled = (await api.post(
        f"/api/leads/{lead_id}/messages", headers=owner.headers,
        json={"text": "later", "send_at": (datetime.now(UTC) + timedelta(days=1)).isoformat()},
    )).json()  # fmt: skip
    notification_id = str(uuid.uuid4())
    await db.execute(
        "INSERT INTO notifications (notification_id, tenant_id, recipient, kind, title, body)"
        " VALUES ($1, $2, 'admins', 'test', 'Owner only', 'secret')",
        notification_id, owner.tenant_id,
    )  # fmt: skip
    key = (await api.post("/api/keys", headers=owner.headers, json={"role": "sdr"})).json()
    ids = {"key_id": key["key_id"], "lead_id": lead_id, "sdr_id": sdr["sdr_id"],
           "notification_id": notification_id, "scheduled_id": scheduled["command_id"]}  # fmt: skip
    bodies: dict[str, Any] = {
        "/api/leads/{lead_id}/messages": {"text": "hello"},
        "/api/leads/{lead_id}/close": {"outcome": "won"},
        "/api/sdrs/{sdr_id}": {"name": "X", "email": "x@example.com"},
    }
    routes = routes_with_ids(test_settings)
    assert len(routes) >= 8
    for method, path in routes:
        names = re.findall(r"\{([^}]+)\}", path)
        real = path.format(**{name: ids[name] for name in names})
        missing = path.format(**dict.fromkeys(names, MISSING_ID))
        body = bodies.get(path)
        theirs = await api.request(method, real, headers=intruder.headers, json=body)
        nobody = await api.request(method, missing, headers=intruder.headers, json=body)
        assert theirs.status_code == nobody.status_code == 404, (method, path, theirs.text)
        assert theirs.json()["detail"] == nobody.json()["detail"], (method, path)
        # The owner still sees it: the 404 was about the intruder, not the id.
        if method == "GET":
            mine = await api.get(real, headers=owner.headers)
            assert mine.status_code == 200, (path, mine.text)
    untouched = await db.fetchrow("SELECT name FROM sdrs WHERE sdr_id = $1",
                                  uuid.UUID(sdr["sdr_id"]))  # fmt: skip
    assert untouched is not None
    assert untouched["name"] == "Owen"
