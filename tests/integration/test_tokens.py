"""The token economy against real Kafka and PostgreSQL, with Razorpay's Orders API served by a
local server and reached through the `razorpay` SDK."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from flexoraa.credits import (
    create_subscription,
    credit_due_subscriptions,
    credit_paid_order,
    enqueue_credit,
    enqueue_debit,
    relay_pending,
)
from flexoraa.kafka import delete_topics, ensure_topics
from flexoraa.settings import Settings
from schemas.tokens import BalanceChange, TokenCredit, credit_event_id
from schemas.topics import TopicNames
from tests.conftest import (
    MakeTenant,
    ManagedProcess,
    StartProcess,
    Tenant,
    free_port,
    http_get_json,
    settings_env,
    start_worker,
)
from tests.fakes.razorpay_api import (
    RazorpayFake,
    checkout_signature,
    dispute_lost_body,
    refund_webhook_body,
    webhook_body,
    webhook_signature,
)
from tests.integration.conftest import ApiFactory, read_topic, webhook_letters
from tests.integration.test_pipeline import eventually, post

pytestmark = pytest.mark.integration
WEBHOOK_SECRET = "whsec_fake_0123456789"


@pytest.fixture(scope="module")
async def razorpay_fake() -> AsyncIterator[RazorpayFake]:
    fake = RazorpayFake()
    await fake.start(free_port())
    yield fake
    await fake.stop()


def payments(
    api_factory: ApiFactory, fake: RazorpayFake, **overrides: object
) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    return api_factory(
        razorpay_key_id=fake.key_id,
        razorpay_key_secret=SecretStr(fake.key_secret),
        razorpay_webhook_secret=SecretStr(WEBHOOK_SECRET),
        razorpay_api_url=fake.url,
        **overrides,
    )


async def create_order(api: httpx.AsyncClient, tenant: Tenant, pack: str = "pro") -> Any:
    response = await api.post(
        "/api/tokens/topup/create-order", headers=tenant.headers, json={"pack": pack}
    )
    assert response.status_code == 201, response.text
    return response.json()


async def deliver_webhook(
    api: httpx.AsyncClient,
    event: str,
    order: Any,
    payment_id: str,
    event_id: str | None = None,
    secret: str = WEBHOOK_SECRET,
) -> httpx.Response:
    body = webhook_body(event, order["order_id"], payment_id, order["amount"], order["currency"])
    return await api.post(
        "/webhooks/razorpay",
        content=body,
        headers={
            "Content-Type": "application/json",
            "X-Razorpay-Signature": webhook_signature(body, secret),
            "X-Razorpay-Event-Id": event_id or f"evt_{uuid.uuid4().hex[:14]}",
        },
    )


async def purchase_credits(db: asyncpg.Connection, tenant: Tenant) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT event_id, payload FROM token_outbox WHERE tenant_id = $1"
        " AND payload->>'source' = 'purchase'",
        tenant.tenant_id,
    )


async def test_top_ups_answer_503_until_razorpay_is_configured(
    api: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    tenant = await make_tenant()
    packs = (await api.get("/api/tokens/packs", headers=tenant.headers)).json()
    assert [(p["name"], p["tokens"], p["price"]) for p in packs] == [
        ("starter", 100, "50.00"), ("growth", 500, "200.00"), ("pro", 1000, "350.00"),
        ("enterprise", 5000, "1500.00"),
    ]  # fmt: skip
    order = await api.post("/api/tokens/topup/create-order", headers=tenant.headers,
                           json={"pack": "pro"})  # fmt: skip
    assert order.status_code == 503
    assert "not configured" in order.json()["detail"]
    verify = await api.post("/api/tokens/topup/verify", headers=tenant.headers, json={
        "razorpay_order_id": "order_X", "razorpay_payment_id": "pay_X",
        "razorpay_signature": "00"})  # fmt: skip
    assert verify.status_code == 503
    webhook = await api.post("/webhooks/razorpay", content=b"{}")
    assert webhook.status_code == 503


def tampered_with(signature: str) -> str:
    """The signature with its last hex digit changed (a fixed "00" ending was the real one
    once in 256 runs)."""
    return signature[:-1] + ("1" if signature[-1] == "0" else "0")


async def test_an_order_is_created_through_the_sdk_and_verified_once(
    api_factory: ApiFactory,
    razorpay_fake: RazorpayFake,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    tenant, other = await make_tenant(), await make_tenant("Other")
    async with payments(api_factory, razorpay_fake) as api:
        unknown = await api.post("/api/tokens/topup/create-order", headers=tenant.headers,
                                 json={"pack": "mega"})  # fmt: skip
        assert unknown.status_code == 400
        assert "starter" in unknown.json()["detail"]
        order = await create_order(api, tenant)
        assert order["amount"] == 35000
        assert order["currency"] == "USD"
        assert order["key_id"] == razorpay_fake.key_id
        assert order["tokens"] == 1000
        sent = razorpay_fake.requests[-1]
        assert sent["amount"] == 35000
        assert sent["receipt"] == order["receipt"]
        assert sent["notes"]["tenant_id"] == tenant.tenant_id
        row = await db.fetchrow("SELECT * FROM payment_orders WHERE order_id = $1",
                                order["order_id"])  # fmt: skip
        assert row is not None
        assert row["status"] == "created"
        assert row["tokens"] == 1000

        payment_id = razorpay_fake.pay(order["order_id"])
        signature = checkout_signature(order["order_id"], payment_id, razorpay_fake.key_secret)
        tampered = await api.post("/api/tokens/topup/verify", headers=tenant.headers, json={
            "razorpay_order_id": order["order_id"], "razorpay_payment_id": payment_id,
            "razorpay_signature": tampered_with(signature)})  # fmt: skip
        assert tampered.status_code == 400
        assert await purchase_credits(db, tenant) == []
        body = {"razorpay_order_id": order["order_id"], "razorpay_payment_id": payment_id,
                "razorpay_signature": signature}  # fmt: skip
        # Another tenant cannot redeem this tenant's order.
        stolen = await api.post("/api/tokens/topup/verify", headers=other.headers, json=body)
        assert stolen.status_code == 404
        first = await api.post("/api/tokens/topup/verify", headers=tenant.headers, json=body)
        again = await api.post("/api/tokens/topup/verify", headers=tenant.headers, json=body)
        assert first.json()["status"] == "credited"
        assert first.json()["tokens"] == 1000
        assert again.json()["status"] == "already_credited"
        (credit,) = await purchase_credits(db, tenant)
        assert credit["event_id"] == credit_event_id(tenant.tenant_id, "purchase", payment_id)
        history = (await api.get("/api/tokens/payment-history", headers=tenant.headers)).json()
        assert [(p["order_id"], p["status"], p["payment_id"]) for p in history["payments"]] == [
            (order["order_id"], "paid", payment_id)
        ]

        razorpay_fake.fail_next = 1
        failed = await api.post("/api/tokens/topup/create-order", headers=tenant.headers,
                                json={"pack": "starter"})  # fmt: skip
        assert failed.status_code == 502


async def test_a_webhook_replayed_ten_times_credits_once(
    api_factory: ApiFactory,
    razorpay_fake: RazorpayFake,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
    test_settings: Settings,
) -> None:
    tenant = await make_tenant()
    async with payments(api_factory, razorpay_fake) as api:
        order = await create_order(api, tenant, "growth")
        payment_id = f"pay_{uuid.uuid4().hex[:14]}"
        forged = await deliver_webhook(api, "payment.captured", order, payment_id,
                                       secret=razorpay_fake.key_secret)  # fmt: skip
        assert forged.status_code == 400
        answers = [
            (await deliver_webhook(api, "payment.captured", order, payment_id, "evt_captured"))
            for _ in range(10)
        ]
        assert [a.status_code for a in answers] == [200] * 10
        assert [a.json()["status"] for a in answers] == ["credited"] + ["duplicate"] * 9
        # order.paid for the same payment (another event id) finds it credited.
        paid = await deliver_webhook(api, "order.paid", order, payment_id, "evt_order_paid")
        assert paid.json()["status"] == "already_credited"
        # Another payment of the paid order: credited once, the double charge said for a refund.
        twice = await deliver_webhook(api, "payment.captured", order, "pay_second0000001")
        assert twice.json()["status"] == "paid_twice"
        said_again = await deliver_webhook(api, "order.paid", order, "pay_second0000001")
        assert said_again.json()["status"] == "paid_twice"
        assert len(await purchase_credits(db, tenant)) == 1
        audited = await db.fetch(
            "SELECT details->>'credited_payment' AS credited FROM audit_log WHERE tenant_id = $1"
            " AND action = 'payment.duplicate' AND target = 'pay_second0000001'",
            tenant.tenant_id,
        )
        assert [row["credited"] for row in audited] == [payment_id]  # once, for one refund
        # Signed but not understood: an error answer would be retried for a day, then the
        # webhook disabled with every later payment.
        # Kept on the dead-letter topic: it may carry a payment.
        garbled = b"not json " + uuid.uuid4().hex.encode()
        odd = await api.post("/webhooks/razorpay", content=garbled, headers={
            "X-Razorpay-Signature": webhook_signature(garbled, WEBHOOK_SECRET)})  # fmt: skip
        assert (odd.status_code, odd.json()["status"]) == (200, "unparseable")
        kept = [reason for reason, raw in webhook_letters(test_settings, "razorpay")
                if raw == garbled]  # fmt: skip
        assert len(kept) == 1
        assert kept[0].startswith("unparseable webhook: JSONDecodeError")
        recorded = await db.fetchval(
            "SELECT count(*) FROM payment_events WHERE order_id = $1", order["order_id"]
        )
        assert recorded == 4

        failing = await create_order(api, tenant, "starter")
        failed = await deliver_webhook(api, "payment.failed", failing, "pay_failed0001")
        assert failed.json()["status"] == "failed"
        row = await db.fetchrow("SELECT status, failure_reason FROM payment_orders"
                                " WHERE order_id = $1", failing["order_id"])  # fmt: skip
        assert row is not None
        assert row["status"] == "failed"
        assert "insufficient balance" in row["failure_reason"]


async def test_verify_and_webhook_racing_credit_each_payment_once(
    api_factory: ApiFactory,
    razorpay_fake: RazorpayFake,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    tenant = await make_tenant()
    async with payments(api_factory, razorpay_fake) as api:
        orders = [await create_order(api, tenant, "starter") for _ in range(15)]

        async def race(order: Any) -> list[str]:
            payment_id = razorpay_fake.pay(order["order_id"])
            signature = checkout_signature(order["order_id"], payment_id, razorpay_fake.key_secret)
            verify = api.post("/api/tokens/topup/verify", headers=tenant.headers, json={
                "razorpay_order_id": order["order_id"], "razorpay_payment_id": payment_id,
                "razorpay_signature": signature})  # fmt: skip
            captured = deliver_webhook(api, "payment.captured", order, payment_id)
            paid = deliver_webhook(api, "order.paid", order, payment_id)
            answers = await asyncio.gather(verify, captured, paid)
            return sorted(a.json()["status"] for a in answers)

        outcomes = await asyncio.gather(*(race(order) for order in orders))
    assert all(o == ["already_credited", "already_credited", "credited"] for o in outcomes)
    assert len(await purchase_credits(db, tenant)) == len(orders)


async def verify_payment(
    api: httpx.AsyncClient, tenant: Tenant, fake: RazorpayFake, order: Any, payment_id: str
) -> httpx.Response:
    signature = checkout_signature(order["order_id"], payment_id, fake.key_secret)
    return await api.post("/api/tokens/topup/verify", headers=tenant.headers, json={
        "razorpay_order_id": order["order_id"], "razorpay_payment_id": payment_id,
        "razorpay_signature": signature})  # fmt: skip


async def test_verify_credits_only_a_payment_razorpay_says_is_captured_for_the_order(
    api_factory: ApiFactory,
    razorpay_fake: RazorpayFake,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    tenant = await make_tenant()

    async def credited_payments() -> set[str]:
        return {json.loads(r["payload"])["reference"] for r in await purchase_credits(db, tenant)}

    async with payments(api_factory, razorpay_fake) as api:
        # Authorised only (an account capturing manually): captured here, then credited.
        order = await create_order(api, tenant, "starter")
        authorised = razorpay_fake.pay(order["order_id"], status="authorized")
        answer = await verify_payment(api, tenant, razorpay_fake, order, authorised)
        assert (answer.status_code, answer.json()["status"]) == (200, "credited")
        assert razorpay_fake.captures == [authorised]
        assert razorpay_fake.payments[authorised]["status"] == "captured"

        # Signed by the checkout, but never money: nothing credited, the reason kept.
        refused: dict[str, dict[str, Any]] = {
            "failed": {"status": "failed"},
            "refunded before verify": {"status": "refunded", "amount_refunded": 5000},
            "for less than the order": {"amount": 100},
        }
        for case, changes in refused.items():
            order = await create_order(api, tenant, "starter")
            payment_id = razorpay_fake.pay(order["order_id"], **changes)
            answer = await verify_payment(api, tenant, razorpay_fake, order, payment_id)
            assert answer.status_code == 409, (case, answer.text)
            assert "no tokens credited" in answer.json()["detail"]
            reason = await db.fetchval("SELECT failure_reason FROM payment_orders"
                                       " WHERE order_id = $1", order["order_id"])  # fmt: skip
            assert reason, case
        # A payment of another order: the signature is the customer's to make for any pair it
        # holds only with our key secret, but Razorpay's word is what counts.
        order, other_order = [await create_order(api, tenant, "starter") for _ in range(2)]
        elsewhere = razorpay_fake.pay(other_order["order_id"])
        answer = await verify_payment(api, tenant, razorpay_fake, order, elsewhere)
        assert answer.status_code == 409
        assert "is not of order" in answer.json()["detail"]
        unknown = await verify_payment(api, tenant, razorpay_fake, order, "pay_NOSUCH000001")
        assert unknown.status_code == 409
        assert "does not exist" in unknown.json()["detail"]

        # Razorpay down: pending (202), nothing credited; its webhook credits the order, and
        # verifying again finds it credited without asking Razorpay.
        order = await create_order(api, tenant, "starter")
        razorpay_fake.fail_next = 1
        later = razorpay_fake.pay(order["order_id"])
        pending = await verify_payment(api, tenant, razorpay_fake, order, later)
        assert (pending.status_code, pending.json()["status"]) == (202, "pending")
        assert later not in await credited_payments()
        webhook = await deliver_webhook(api, "payment.captured", order, later)
        assert webhook.json()["status"] == "credited"
        razorpay_fake.fail_next = 1  # not asked: a call would fail
        again = await verify_payment(api, tenant, razorpay_fake, order, later)
        assert (again.status_code, again.json()["status"]) == (200, "already_credited")
        razorpay_fake.fail_next = 0
    assert await credited_payments() == {authorised, later}


async def test_two_payments_of_one_order_are_never_both_captured(
    api_factory: ApiFactory,
    razorpay_fake: RazorpayFake,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    """A checkout retried leaves two authorised payments of one order (an account capturing
    manually). Verified at once, or the first's capture lost to a timeout while Razorpay
    completed it: both were captured, the customer charged twice."""
    tenant = await make_tenant()
    # Captures answer after the API stopped waiting for them (and land all the same).
    razorpay_fake.capture_delay_s = 0.8
    try:
        async with payments(api_factory, razorpay_fake, razorpay_timeout_s=0.3) as api:
            order = await create_order(api, tenant, "starter")
            first = razorpay_fake.pay(order["order_id"], status="authorized")
            second = razorpay_fake.pay(order["order_id"], status="authorized")
            lost = await verify_payment(api, tenant, razorpay_fake, order, first)
            assert (lost.status_code, lost.json()["status"]) == (202, "pending")
            # The first's capture is still under way: the second waits for it.
            waiting = await verify_payment(api, tenant, razorpay_fake, order, second)
            assert (waiting.status_code, waiting.json()["status"]) == (202, "pending")
            await asyncio.sleep(1.0)
            assert razorpay_fake.payments[first]["status"] == "captured"
            # Razorpay says the first is captured: credited, and the second left to lapse.
            refused = await verify_payment(api, tenant, razorpay_fake, order, second)
            assert refused.status_code == 409
            assert "paid already" in refused.json()["detail"]
            again = await verify_payment(api, tenant, razorpay_fake, order, first)
            assert again.json()["status"] == "already_credited"

            # The claimant cannot be read (Razorpay refuses the fetch: a rate limit, say):
            # whether it was captured cannot be told, so the other is not captured.
            order = await create_order(api, tenant, "starter")
            unreadable = razorpay_fake.pay(order["order_id"], status="authorized")
            later = razorpay_fake.pay(order["order_id"], status="authorized")
            lost = await verify_payment(api, tenant, razorpay_fake, order, unreadable)
            assert lost.status_code == 202
            await asyncio.sleep(1.0)
            del razorpay_fake.payments[unreadable]
            blocked = await verify_payment(api, tenant, razorpay_fake, order, later)
            assert (blocked.status_code, blocked.json()["status"]) == (202, "pending")
            assert razorpay_fake.payments[later]["status"] == "authorized"

            # Verified at once, both answered in time: one captured, the other waits for it.
            razorpay_fake.capture_delay_s = 0.5
        async with payments(api_factory, razorpay_fake) as api:
            order = await create_order(api, tenant, "starter")
            one, other = (razorpay_fake.pay(order["order_id"], status="authorized")
                          for _ in range(2))  # fmt: skip
            answers = await asyncio.gather(
                verify_payment(api, tenant, razorpay_fake, order, one),
                verify_payment(api, tenant, razorpay_fake, order, other),
            )
            outcomes = sorted((a.status_code, a.json().get("status", "refused")) for a in answers)
            # The other waited (202), or, slower, found the order paid (409).
            assert outcomes[0] == (200, "credited")
            assert outcomes[1] in {(202, "pending"), (409, "refused")}
            statuses = {razorpay_fake.payments[p]["status"] for p in (one, other)}
            assert statuses == {"captured", "authorized"}
            # The payment.authorized webhook only records: capturing there raced verify.
            (waited,) = (
                p for p in (one, other) if razorpay_fake.payments[p]["status"] != "captured"
            )
            webhook = await deliver_webhook(api, "payment.authorized", order, waited)
            assert webhook.json()["status"] == "recorded"
            assert razorpay_fake.payments[waited]["status"] == "authorized"
    finally:
        razorpay_fake.capture_delay_s = 0.0
    mine = {first, second, later, one, other}
    captured = [p for p in mine if razorpay_fake.payments[p]["status"] == "captured"]
    assert len(captured) == 2  # one per order
    assert {json.loads(r["payload"])["reference"] for r in await purchase_credits(db, tenant)} == (
        set(captured)
    )
    duplicates = await db.fetchval(
        "SELECT count(*) FROM audit_log WHERE tenant_id = $1 AND action = 'payment.duplicate'",
        tenant.tenant_id,
    )
    assert duplicates == 0


async def test_a_verify_sent_twice_is_credited_not_refused_when_the_other_credited_first(
    api_factory: ApiFactory,
    razorpay_fake: RazorpayFake,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    # The second read the payment authorised; the first captured and credited it before the
    # second claimed the capture: the order paid, by this very payment, was answered 409
    # "paid already", and the checkout invited a second payment.
    tenant = await make_tenant()
    async with payments(api_factory, razorpay_fake) as api:
        order = await create_order(api, tenant, "starter")
        payment_id = razorpay_fake.pay(order["order_id"], status="authorized")

        async def the_other_verify_credits_it() -> None:
            razorpay_fake.payments[payment_id].update(status="captured", captured=True)
            async with db.transaction():
                await credit_paid_order(db, order["order_id"], payment_id)

        razorpay_fake.on_next_fetch[payment_id] = the_other_verify_credits_it
        second = await verify_payment(api, tenant, razorpay_fake, order, payment_id)
    assert (second.status_code, second.json()["status"]) == (200, "already_credited")
    assert payment_id not in razorpay_fake.captures


async def test_an_authorisation_no_checkout_verified_is_captured_and_credited_by_the_sweep(
    api_factory: ApiFactory,
    razorpay_fake: RazorpayFake,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    """A customer who closes the checkout before it verifies (or whose bank authorises late)
    leaves an authorised payment only its webhook tells of. Never captured, Razorpay refunds
    it after 3 days: the customer charged for a while, no tokens, no sale."""
    tenant = await make_tenant()

    async def swept(payment_id: str) -> tuple[Any, ...]:
        row = await db.fetchrow(
            "SELECT outcome, settled, attempts FROM payment_capture_sweeps WHERE payment_id = $1",
            payment_id,
        )
        return tuple(row or ())

    async def authorised(api: httpx.AsyncClient, order: Any, errors: tuple[int, ...] = ()) -> str:
        payment_id = razorpay_fake.pay(order["order_id"], status="authorized")
        razorpay_fake.payment_errors[payment_id] = list(errors)
        answer = await deliver_webhook(api, "payment.authorized", order, payment_id)
        assert answer.json()["status"] == "recorded"
        return payment_id

    async def order() -> Any:
        return await create_order(api, tenant, "starter")

    often = {"razorpay_capture_sweep_s": 0.2}
    async with payments(api_factory, razorpay_fake, **often) as api:
        # Left to the checkout's verify first (RAZORPAY_CAPTURE_AFTER_S, 600 s by default).
        fresh = await authorised(api, await order())
        await asyncio.sleep(0.6)
        assert (razorpay_fake.payments[fresh]["status"], await swept(fresh)) == ("authorized", ())

    sweeping = {"razorpay_capture_after_s": 0.0, "razorpay_capture_sweep_s": 0.2}
    # Two API processes sweep at once: each payment is judged by one of them.
    async with (
        payments(api_factory, razorpay_fake, **sweeping) as api,
        payments(api_factory, razorpay_fake, **sweeping),
    ):
        lapsed = await authorised(api, await order())
        # Authorised, then failed at the bank before anyone captured it: nothing to credit.
        failed_order = await order()
        failed = razorpay_fake.pay(failed_order["order_id"], status="failed")
        await deliver_webhook(api, "payment.authorized", failed_order, failed)
        # A second authorisation of an order paid already: never captured (charged twice).
        paid_order = await order()
        paid = razorpay_fake.pay(paid_order["order_id"])
        await deliver_webhook(api, "payment.captured", paid_order, paid)
        second = await authorised(api, paid_order)
        # A checkout retried, neither verified: one of the two captured.
        retried = await order()
        twins = [await authorised(api, retried) for _ in range(2)]
        # Razorpay unreachable, then rate-limiting: asked again, then captured. Settled on a
        # refusal, the authorisation would lapse.
        late = await authorised(api, await order(), errors=(500,))
        limited = await authorised(api, await order(), errors=(429,))
        mine = [fresh, lapsed, failed, paid, second, *twins, late, limited]

        async def all_settled() -> bool:
            outcomes = [await swept(p) for p in (fresh, lapsed, failed, late, limited)]
            return all(outcome[1:2] == (True,) for outcome in outcomes)

        await eventually(all_settled, timeout_s=20, what="the authorisations swept")
        await asyncio.sleep(0.6)  # sweeps enough to ask a settled payment again
    captured = Counter(p for p in razorpay_fake.captures if p in mine)
    (twin,) = (p for p in twins if p in captured)
    assert captured == Counter([fresh, lapsed, twin, late, limited])
    assert razorpay_fake.payments[second]["status"] == "authorized"
    assert {p: await swept(p) for p in mine if p not in twins} == {
        fresh: ("credited", True, 1),
        lapsed: ("credited", True, 1),
        failed: ("refused", True, 1),
        paid: (),
        second: (),
        late: ("credited", True, 2),
        limited: ("credited", True, 2),
    }
    credited = {json.loads(r["payload"])["reference"] for r in await purchase_credits(db, tenant)}
    assert credited == {fresh, lapsed, paid, twin, late, limited}


async def test_a_backlog_of_authorisations_is_swept_several_orders_at_once(
    api_factory: ApiFactory,
    razorpay_fake: RazorpayFake,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    # One at a time, each judgement up to three Razorpay calls: a backlog of thousands (the
    # sweep switched on late, an outage) took hours.
    tenant = await make_tenant()
    sweeping = {"razorpay_capture_after_s": 0.0, "razorpay_capture_sweep_s": 0.2}
    razorpay_fake.capture_delay_s, razorpay_fake.most_captures_in_flight = 0.5, 0
    try:
        async with payments(api_factory, razorpay_fake) as api:
            orders = [await create_order(api, tenant, "starter") for _ in range(6)]
            lapsed = []
            for order in orders:
                lapsed.append(razorpay_fake.pay(order["order_id"], status="authorized"))
                await deliver_webhook(api, "payment.authorized", order, lapsed[-1])
        async with payments(api_factory, razorpay_fake, **sweeping):

            async def all_credited() -> bool:
                outcomes = await db.fetch(
                    "SELECT outcome FROM payment_capture_sweeps WHERE payment_id = ANY($1)",
                    lapsed,
                )
                return [r["outcome"] for r in outcomes] == ["credited"] * len(lapsed)

            await eventually(all_credited, timeout_s=20, what="the backlog swept")
    finally:
        razorpay_fake.capture_delay_s = 0.0
    assert razorpay_fake.most_captures_in_flight > 1
    assert Counter(p for p in razorpay_fake.captures if p in lapsed) == Counter(lapsed)
    credited = {json.loads(r["payload"])["reference"] for r in await purchase_credits(db, tenant)}
    assert credited == set(lapsed)


async def deliver_signed(api: httpx.AsyncClient, body: bytes) -> str:
    answer = await api.post("/webhooks/razorpay", content=body, headers={
        "Content-Type": "application/json",
        "X-Razorpay-Signature": webhook_signature(body, WEBHOOK_SECRET),
        "X-Razorpay-Event-Id": f"evt_{uuid.uuid4().hex[:14]}"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    return str(answer.json()["status"])


async def outbox_changes(db: asyncpg.Connection, tenant: Tenant) -> list[tuple[str, str, int]]:
    rows = await db.fetch(
        "SELECT payload FROM token_outbox WHERE tenant_id = $1 AND payload->>'source' IN"
        " ('refund', 'chargeback', 'refund_failed') ORDER BY created_at",
        tenant.tenant_id,
    )
    changes = [json.loads(r["payload"]) for r in rows]
    return [(c["source"], c["reference"], c["tokens"]) for c in changes]


async def test_refunds_and_lost_disputes_take_back_the_tokens_their_money_bought(
    api_factory: ApiFactory,
    razorpay_fake: RazorpayFake,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    tenant = await make_tenant()
    async with payments(api_factory, razorpay_fake) as api:
        order = await create_order(api, tenant, "pro")  # 1000 tokens for 350.00
        payment_id = razorpay_fake.pay(order["order_id"])
        assert (await verify_payment(api, tenant, razorpay_fake, order, payment_id)).is_success

        def refund(event: str, refund_id: str, amount: int) -> bytes:
            return refund_webhook_body(event, refund_id, payment_id, amount, "USD")

        # 100.00 of 350.00 back: 285 tokens (rounded down), once for both of its webhooks.
        assert await deliver_signed(api, refund("refund.created", "rfnd_A1", 10000)) == "debited"
        processed = await deliver_signed(api, refund("refund.processed", "rfnd_A1", 10000))
        assert processed == "already_debited"
        # The rest: the running total takes back exactly the pack, 715 more.
        assert await deliver_signed(api, refund("refund.processed", "rfnd_A2", 25000)) == "debited"
        # That refund then failed: its tokens come back, once.
        assert await deliver_signed(api, refund("refund.failed", "rfnd_A2", 25000)) == (
            "refund_failed"
        )
        again = await deliver_signed(api, refund("refund.failed", "rfnd_A2", 25000))
        assert again == "already_failed"
        # Failed before any debit (webhooks come in any order): its late success takes nothing.
        assert await deliver_signed(api, refund("refund.failed", "rfnd_A3", 5000)) == (
            "refund_failed"
        )
        late = await deliver_signed(api, refund("refund.processed", "rfnd_A3", 5000))
        assert late == "already_debited"
        # A refund in another currency than the order's is recorded, and takes nothing.
        mismatch = refund_webhook_body("refund.processed", "rfnd_A4", payment_id, 100, "INR")
        assert await deliver_signed(api, mismatch) == "currency_mismatch"

        # The double payment of a paid order is the one refunded: it bought no tokens.
        await deliver_webhook(api, "payment.captured", order, "pay_TWICE00000001")
        twice = refund_webhook_body("refund.processed", "rfnd_B1", "pay_TWICE00000001", 35000,
                                    "USD")  # fmt: skip
        assert await deliver_signed(api, twice) == "not_credited"

        # A lost dispute (a chargeback) takes the whole pack back.
        disputed = await create_order(api, tenant, "growth")
        disputed_payment = razorpay_fake.pay(disputed["order_id"])
        await verify_payment(api, tenant, razorpay_fake, disputed, disputed_payment)
        lost = dispute_lost_body("disp_C1", disputed_payment, 20000, "USD")
        assert await deliver_signed(api, lost) == "debited"
        assert await deliver_signed(api, lost) == "already_debited"

        # Refunded before its capture webhook was credited (webhooks come in any order): the
        # refund waits, and the credit takes its tokens back in the same transaction.
        early = await create_order(api, tenant, "starter")  # 100 tokens for 50.00
        early_payment = razorpay_fake.pay(early["order_id"])
        refund_first = json.loads(refund_webhook_body("refund.processed", "rfnd_D1",
                                                      early_payment, 5000, "USD"))  # fmt: skip
        refund_first["payload"]["payment"]["entity"]["order_id"] = early["order_id"]
        waiting = await deliver_signed(api, json.dumps(refund_first).encode())
        assert waiting == "pending"
        credited = await deliver_webhook(api, "payment.captured", early, early_payment)
        assert credited.json()["status"] == "credited"

        # Signed, but not a refund this can read: recorded (an error answer would be retried
        # for a day, then the webhook disabled), nothing taken back.
        odd_shapes = [
            {"id": 7, "payment_id": payment_id, "amount": 100},
            {"id": "rfnd_E1", "payment_id": 12345, "amount": 100},
            {"id": "rfnd_E2", "payment_id": payment_id, "amount": 2**63},
            {"id": "r" * 500, "payment_id": payment_id, "amount": 100},
            {"id": "rfnd_E3", "payment_id": payment_id, "amount": "100"},
        ]
        for entity in odd_shapes:
            body = json.dumps({"event": "refund.processed",
                               "payload": {"refund": {"entity": entity}}}).encode()  # fmt: skip
            assert await deliver_signed(api, body) == "recorded", entity

        history = (await api.get("/api/tokens/payment-history", headers=tenant.headers)).json()
        reversed_ = {p["order_id"]: (p["refunded_amount"], p["tokens_taken_back"])
                     for p in history["payments"]}  # fmt: skip
        assert reversed_ == {order["order_id"]: (10000, 285), disputed["order_id"]: (20000, 500),
                             early["order_id"]: (5000, 100)}  # fmt: skip
    assert await outbox_changes(db, tenant) == [
        ("refund", "rfnd_A1", 285), ("refund", "rfnd_A2", 715),
        ("refund_failed", "rfnd_A2", 715), ("chargeback", "disp_C1", 500),
        ("refund", "rfnd_D1", 100),
    ]  # fmt: skip
    audited = await db.fetch(
        "SELECT action, target FROM audit_log WHERE tenant_id = $1 AND action IN"
        " ('payment.refunded', 'payment.refund_failed', 'payment.charged_back') ORDER BY audit_id",
        tenant.tenant_id,
    )
    assert [(r["action"], r["target"]) for r in audited] == [
        ("payment.refunded", "rfnd_A1"), ("payment.refunded", "rfnd_A2"),
        ("payment.refund_failed", "rfnd_A2"), ("payment.charged_back", "disp_C1"),
        ("payment.refunded", "rfnd_D1"),
    ]  # fmt: skip


async def test_a_refund_failing_while_it_is_debited_gives_its_tokens_back(
    api_factory: ApiFactory,
    razorpay_fake: RazorpayFake,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    """refund.created and refund.failed of one refund at once: the failure waited for
    nothing and found no debit to undo, and the tokens stayed taken for good."""
    tenant = await make_tenant()
    async with payments(api_factory, razorpay_fake) as api:
        order = await create_order(api, tenant, "enterprise")  # 5000 tokens for 1500.00
        payment_id = razorpay_fake.pay(order["order_id"])
        assert (await verify_payment(api, tenant, razorpay_fake, order, payment_id)).is_success

        async def both(refund_id: str) -> None:
            await asyncio.gather(*(
                deliver_signed(api, refund_webhook_body(event, refund_id, payment_id, 1000, "USD"))
                for event in ("refund.created", "refund.failed")
            ))  # fmt: skip

        await asyncio.gather(*(both(f"rfnd_R{i}") for i in range(12)))
    changes = await outbox_changes(db, tenant)
    taken = sum(tokens for source, _, tokens in changes if source == "refund")
    given_back = sum(tokens for source, _, tokens in changes if source == "refund_failed")
    assert taken == given_back
    statuses = await db.fetch(
        "SELECT DISTINCT status FROM payment_reversals WHERE order_id = $1", order["order_id"]
    )
    assert [r["status"] for r in statuses] == ["failed"]


async def test_the_outbox_survives_a_crash_between_commit_and_publish(
    test_settings: Settings, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    tenant = await make_tenant(tokens=0)
    pool = await asyncpg.create_pool(test_settings.database_url, min_size=1, max_size=2)
    producer = AIOKafkaProducer(bootstrap_servers=test_settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    topic = TopicNames(test_settings.topic_prefix).token_credits

    async def publish(credit: BalanceChange) -> None:
        await producer.send_and_wait(
            topic, key=credit.tenant_id.encode(), value=credit.model_dump_json().encode()
        )

    # Earlier tests' credits (no relay runs in this module yet) go first.
    await relay_pending(pool, publish)
    # A row a newer version wrote, of a kind this one does not know: left pending, and the
    # credits behind it published all the same.
    unknown = f"future-{uuid.uuid4().hex}"
    await db.execute(
        "INSERT INTO token_outbox (event_id, tenant_id, payload)"
        ' VALUES ($1, $2, \'{"kind": "token_gift"}\'::jsonb)',
        unknown,
        tenant.tenant_id,
    )
    async with db.transaction():
        credits = [await enqueue_credit(db, tenant.tenant_id, "adjustment", f"adj-{i}", 10 + i)
                   for i in range(3)]  # fmt: skip
    # Committed, not published (the process "crashed" here): the rows wait.
    pending = await db.fetchval(
        "SELECT count(*) FROM token_outbox WHERE tenant_id = $1 AND published_at IS NULL"
        " AND event_id <> $2",
        tenant.tenant_id,
        unknown,
    )
    assert pending == 3
    published: list[str] = []

    async def publish_then_crash(credit: BalanceChange) -> None:
        await publish(credit)
        published.append(credit.event_id)
        raise ConnectionResetError("crashed after the broker's ack, before marking the row")

    try:
        with pytest.raises(ConnectionResetError):
            await relay_pending(pool, publish_then_crash)
        # The mark rolled back: every row is still pending and is published again, one a
        # pass here, the unreadable row at the head of the outbox never taking a batch's room.
        assert [await relay_pending(pool, publish, limit=1) for _ in range(4)] == [1, 1, 1, 0]
    finally:
        await producer.stop()
        await pool.close()
    rows = await db.fetch(
        "SELECT event_id FROM token_outbox WHERE tenant_id = $1 AND published_at IS NOT NULL",
        tenant.tenant_id,
    )
    assert {r["event_id"] for r in rows} == {c.event_id for c in credits}
    left = await db.fetchval("SELECT published_at FROM token_outbox WHERE event_id = $1", unknown)
    assert left is None
    await db.execute("DELETE FROM token_outbox WHERE event_id = $1", unknown)
    # On the topic: the first credit twice, with one event id (the account counts it once).
    on_topic = await read_topic(test_settings, [topic], tenant.tenant_id)
    ids = [TokenCredit.model_validate_json(value).event_id for _, _, value in on_topic]
    assert sorted(ids) == sorted([published[0], *(c.event_id for c in credits)])


# --------------------------------------------------------------------------- through a worker


@pytest.fixture(scope="module")
def worker(processes: StartProcess, test_settings: Settings) -> ManagedProcess:
    return start_worker(processes, test_settings, name="tokens-worker")


async def balance(api: httpx.AsyncClient, tenant: Tenant, **expected: Any) -> Any:
    async def check() -> Any:
        response = await api.get("/api/tokens/balance", headers=tenant.headers)
        body = response.json() if response.status_code == 200 else {}
        return body if all(body.get(k) == v for k, v in expected.items()) else None

    return await eventually(check, what=f"token balance {expected}")


async def system_audit(db: asyncpg.Connection, tenant: Tenant, entries: int) -> list[str]:
    """The tenant's audit entries by the system (pauses, resumes), once there are `entries`."""

    async def audited() -> Any:
        rows = await db.fetch(
            "SELECT action FROM audit_log WHERE tenant_id = $1 AND actor = 'system'"
            " ORDER BY audit_id",
            tenant.tenant_id,
        )
        return [r["action"] for r in rows] if len(rows) >= entries else None

    actions: list[str] = await eventually(audited, what=f"{entries} system audit entries")
    return actions


async def test_usage_pauses_the_tenant_at_zero_and_a_top_up_resumes_the_interview(
    api_factory: ApiFactory,
    razorpay_fake: RazorpayFake,
    worker: ManagedProcess,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    tenant = await make_tenant(tokens=3)
    await db.execute("INSERT INTO tenant_admins (tenant_id, email) VALUES ($1, 'boss@example.com')",
                     tenant.tenant_id)  # fmt: skip
    worker_url = f"http://127.0.0.1:{worker.ports['web']}"
    async with payments(api_factory, razorpay_fake, worker_url=worker_url) as api:
        await balance(api, tenant, balance=3, paused=False)
        contact = f"t{uuid.uuid4().hex[:6]}@example.com"
        answers = ["hello", "We need a CRM for WhatsApp leads", "Budget is around $3k",
                   "We want to start next month", "I am the founder"]  # fmt: skip
        lead_id = ""
        for text in answers[:3]:
            lead_id = (await post(api, tenant, channel="webchat", contact=contact, text=text))[
                "lead_id"
            ]
        state = await balance(api, tenant, balance=0, paused=True)
        assert state["used_this_cycle"] == 3
        assert state["percent_used"] == 100.0

        async def alerts() -> Any:
            rows = await db.fetch(
                "SELECT data->>'percent' AS percent FROM notifications WHERE tenant_id = $1"
                " AND kind = 'token_threshold' AND recipient = 'admins'",
                tenant.tenant_id,
            )
            return sorted(int(r["percent"]) for r in rows) if len(rows) >= 2 else None

        # 2 of 3 crossed 50 %; the third crossed 80 and 100 %: the 100 % alone is sent.
        assert await eventually(alerts, what="threshold alerts") == [50, 100]

        async def turn() -> int:
            response = await api.get(f"/api/leads/{lead_id}", headers=tenant.headers)
            qualification = response.json()["qualification"]
            return int(qualification["turn"]) if qualification else 0

        async def waiting_for_tokens() -> int:
            response = await api.get(f"/api/leads/{lead_id}", headers=tenant.headers)
            return int(response.json()["ai_actions_waiting_for_tokens"])

        turn_when_paused = await turn()
        for text in answers[3:]:
            await post(api, tenant, channel="webchat", contact=contact, text=text)

        async def recorded() -> Any:
            count = await db.fetchval("SELECT count(*) FROM messages WHERE lead_id = $1"
                                      " AND direction = 'inbound'", lead_id)  # fmt: skip
            return count == 5

        # Paused: the messages are recorded, the interview does not move, nothing is charged.
        await eventually(recorded, what="messages recorded while paused")
        await asyncio.sleep(1.5)
        assert await turn() == turn_when_paused
        assert await waiting_for_tokens() == 2  # the lead shows its kept AI work
        assert (await balance(api, tenant))["balance"] == 0

        order = await create_order(api, tenant, "starter")
        payment_id = razorpay_fake.pay(order["order_id"])
        signature = checkout_signature(order["order_id"], payment_id, razorpay_fake.key_secret)
        verified = await api.post("/api/tokens/topup/verify", headers=tenant.headers, json={
            "razorpay_order_id": order["order_id"], "razorpay_payment_id": payment_id,
            "razorpay_signature": signature})  # fmt: skip
        assert verified.json()["status"] == "credited"
        # The two kept messages are interviewed once the credit arrives (2 tokens).
        state = await balance(api, tenant, balance=98, paused=False)
        assert state["used_this_cycle"] == 2
        assert state["cycle_tokens"] == 100

        assert await system_audit(db, tenant, entries=2) == ["tenant.paused", "tenant.resumed"]

        async def resumed() -> Any:
            return await turn() > turn_when_paused

        await eventually(resumed, what="the interview to resume")
        assert await waiting_for_tokens() == 0

        async def usage() -> Any:
            response = await api.get("/api/tokens/usage?group_by=feature", headers=tenant.headers)
            body = response.json()
            return body if body["total_tokens"] == 5 else None

        by_feature = await eventually(usage, what="usage in the ledger")
        assert by_feature["groups"][0]["feature"] == "qualification"
        by_lead = (await api.get("/api/tokens/usage?group_by=lead", headers=tenant.headers)).json()
        assert by_lead["groups"] == [
            {"lead": lead_id, "tokens": 5, "actions": 5, "prompt_tokens": 0,
             "completion_tokens": 0}
        ]  # fmt: skip
        daily = await db.fetchval(
            "SELECT sum(tokens) FROM token_usage_daily WHERE tenant_id = $1", tenant.tenant_id
        )
        assert daily == 5
        bad = await api.get("/api/tokens/usage?group_by=week", headers=tenant.headers)
        assert bad.status_code == 422


async def test_a_refund_takes_its_tokens_from_the_balance_and_pauses_the_tenant_it_empties(
    api_factory: ApiFactory,
    razorpay_fake: RazorpayFake,
    worker: ManagedProcess,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    tenant = await make_tenant(tokens=0)
    worker_url = f"http://127.0.0.1:{worker.ports['web']}"
    async with payments(api_factory, razorpay_fake, worker_url=worker_url) as api:
        order = await create_order(api, tenant, "starter")  # 100 tokens for 50.00
        payment_id = razorpay_fake.pay(order["order_id"])
        assert (await verify_payment(api, tenant, razorpay_fake, order, payment_id)).is_success
        await balance(api, tenant, balance=100, paused=False, cycle_tokens=100)

        def refund(event: str, refund_id: str) -> bytes:
            return refund_webhook_body(event, refund_id, payment_id, 2500, "USD")

        assert await deliver_signed(api, refund("refund.processed", "rfnd_W1")) == "debited"
        # Half the money back: half the tokens, and the cycle measured against what is left.
        await balance(api, tenant, balance=50, paused=False, total_debited=50, cycle_tokens=50)
        assert await deliver_signed(api, refund("refund.created", "rfnd_W2")) == "debited"
        await balance(api, tenant, balance=0, paused=True, total_debited=100)
        # The second refund failed: the money stayed, and so do its tokens.
        assert await deliver_signed(api, refund("refund.failed", "rfnd_W2")) == "refund_failed"
        await balance(api, tenant, balance=50, paused=False, total_debited=100)
        # Paused again at the credited and used totals it was resumed at: audited as well.
        assert await deliver_signed(api, refund("refund.processed", "rfnd_W3")) == "debited"
        await balance(api, tenant, balance=0, paused=True, total_debited=150)

    async def ledger() -> Any:
        rows = await db.fetch(
            "SELECT kind, source, tokens FROM token_ledger WHERE tenant_id = $1"
            " ORDER BY occurred_at",
            tenant.tenant_id,
        )
        entries = [(r["kind"], r["source"], r["tokens"]) for r in rows]
        return entries if len(entries) == 5 else None

    assert await eventually(ledger, what="the ledger's credits and debits") == [
        ("credit", "purchase", 100), ("debit", "refund", 50), ("debit", "refund", 50),
        ("credit", "refund_failed", 50), ("debit", "refund", 50),
    ]  # fmt: skip

    # No account before the first credit: the refund's emptying is its first pause.
    assert await system_audit(db, tenant, entries=3) == [
        "tenant.paused", "tenant.resumed", "tenant.paused",
    ]  # fmt: skip


async def test_the_token_topics_replayed_into_a_fresh_app_give_the_same_balances(
    test_settings: Settings,
    processes: StartProcess,
    worker: ManagedProcess,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    # Some history of our own beside the previous tests': usage, credits of every kind, a debit.
    tenant = await make_tenant(tokens=50)
    async with db.transaction():
        await enqueue_credit(db, tenant.tenant_id, "adjustment", "replay-test", 7)
        await enqueue_debit(db, tenant.tenant_id, "refund", "replay-refund", 5)
    names = TopicNames(test_settings.topic_prefix)

    async def settled() -> Any:
        pending = await db.fetchval("SELECT count(*) FROM token_outbox WHERE published_at IS NULL")
        return pending == 0

    await eventually(settled, what="the outbox relayed")
    records = await read_topic(test_settings, [names.token_usage, names.token_credits])
    tenants = {key.decode() for _, key, _ in records}
    assert tenant.tenant_id in tenants

    def account(url: str, tenant_id: str) -> Any:
        status, body = http_get_json(f"{url}/internal/tenants/{tenant_id}/tokens")
        assert status == 200, body
        return body

    original_url = f"http://127.0.0.1:{worker.ports['web']}"

    async def credited() -> Any:
        # Relayed is not yet applied: the worker takes the credit (and the debit) from its topic a
        # moment later
        # (read at once, the balance was 50 in one CI run of many).
        return account(original_url, tenant.tenant_id)["balance"] == 52

    await eventually(credited, what="the worker applied the credit")
    original = {t: account(original_url, t)["balance"] for t in tenants}
    assert original[tenant.tenant_id] == 52

    fresh_settings = test_settings.model_copy(
        update={"topic_prefix": f"{test_settings.topic_prefix}-replay"}
    )
    fresh = TopicNames(fresh_settings.topic_prefix)
    await ensure_topics(fresh_settings)
    try:
        # Every record twice, shuffled: any order and any duplication.
        replay = records + records
        random.Random(7).shuffle(replay)
        producer = AIOKafkaProducer(bootstrap_servers=test_settings.kafka_bootstrap_servers)
        await producer.start()
        try:
            for topic, key, value in replay:
                target = fresh.token_usage if topic == names.token_usage else fresh.token_credits
                await producer.send(target, key=key, value=value)
            await producer.flush()
        finally:
            await producer.stop()
        replica = start_worker(processes, fresh_settings, name="replay-worker")
        replica_url = f"http://127.0.0.1:{replica.ports['web']}"

        async def same() -> Any:
            replayed = {t: account(replica_url, t)["balance"] for t in tenants}
            return replayed if replayed == original else None

        await eventually(same, timeout_s=60, what="the replayed balances")
        replica.process.terminate()
        replica.process.wait(30)
    finally:
        await delete_topics(fresh_settings)


async def test_a_subscription_entered_with_a_past_start_is_owed_from_its_creation(
    test_settings: Settings, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    tenant = await make_tenant(tokens=0)
    now = datetime.now(UTC)
    async with db.transaction():
        subscription_id = await create_subscription(
            db, tenant.tenant_id, "growth", 400, now - timedelta(days=100)
        )
    pool = await asyncpg.create_pool(test_settings.database_url, min_size=1, max_size=2)
    try:
        # (A worker's own pass may be first: either way, once per cycle.)
        await credit_due_subscriptions(pool, now)
    finally:
        await pool.close()
    credited = await db.fetch(
        "SELECT period_start FROM subscription_credits WHERE subscription_id = $1",
        uuid.UUID(subscription_id),
    )
    # The cycle running at its creation, not the three that ended before it.
    (only,) = credited
    assert now - timedelta(days=32) < only["period_start"] <= now
    # Ended: the next test's passes run its clock to 2100, which would credit every month.
    await db.execute("UPDATE subscriptions SET status = 'cancelled' WHERE subscription_id = $1",
                     uuid.UUID(subscription_id))  # fmt: skip


async def test_a_subscription_credits_each_monthly_cycle_once(
    test_settings: Settings, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    tenant = await make_tenant(tokens=0)
    # In the future: the workers' own subscription pass runs on the real clock, and must find
    # nothing due while this test moves its clock by hand.
    started = datetime(2099, 9, 30, 8, tzinfo=UTC)
    # Through the CLI, as an operator would.
    created = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flexoraa", "subscriptions", "create", "--tenant-id",
        tenant.tenant_id, "--plan", "growth", "--monthly-tokens", "400", "--start",
        started.isoformat(), env=settings_env(test_settings), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, _ = await created.communicate()
    assert created.returncode == 0
    subscription_id = json.loads(stdout)["subscription_id"]
    pool = await asyncpg.create_pool(test_settings.database_url, min_size=1, max_size=4)

    async def subscription_credits() -> list[str]:
        rows = await db.fetch(
            "SELECT payload->>'reference' AS reference FROM token_outbox"
            " WHERE tenant_id = $1 AND payload->>'source' = 'subscription' ORDER BY 1",
            tenant.tenant_id,
        )
        return [r["reference"].split("|")[1] for r in rows]

    try:
        # Not started yet: nothing is credited ahead of the first cycle.
        assert await credit_due_subscriptions(pool, started - timedelta(seconds=1)) == 0
        assert await subscription_credits() == []
        now = datetime(2099, 11, 24, 12, tzinfo=UTC)
        # Two passes at once (two workers): the current cycle is credited once.
        await asyncio.gather(
            credit_due_subscriptions(pool, now), credit_due_subscriptions(pool, now)
        )
        assert await credit_due_subscriptions(pool, now) == 0
        # Sep 30 → Oct 30 → Nov 30: the cycle of Nov 24 started on Oct 30, and the first cycle,
        # begun while no pass ran, is owed too.
        assert await subscription_credits() == [
            "2099-09-30T08:00:00+00:00", "2099-10-30T08:00:00+00:00",
        ]  # fmt: skip
        period = await db.fetchrow(
            "SELECT current_period_start, current_period_end FROM subscriptions"
            " WHERE subscription_id = $1",
            uuid.UUID(subscription_id),
        )
        assert period is not None
        assert period["current_period_end"] == datetime(2099, 11, 30, 8, tzinfo=UTC)
        assert await credit_due_subscriptions(pool, datetime(2099, 12, 1, tzinfo=UTC)) == 1
        assert (await subscription_credits())[-1] == "2099-11-30T08:00:00+00:00"
        # Three months without a pass: each of their cycles credited, on the anchor's day
        # after a short month: Dec 30, Jan 30, Feb 28, then Mar 30 (not Mar 28).
        assert await credit_due_subscriptions(pool, datetime(2100, 3, 29, tzinfo=UTC)) == 3
        assert (await subscription_credits())[-3:] == [
            "2099-12-30T08:00:00+00:00", "2100-01-30T08:00:00+00:00",
            "2100-02-28T08:00:00+00:00",
        ]  # fmt: skip
        end = await db.fetchval(
            "SELECT current_period_end FROM subscriptions WHERE subscription_id = $1",
            uuid.UUID(subscription_id),
        )
        assert end == datetime(2100, 3, 30, 8, tzinfo=UTC)
    finally:
        await pool.close()
