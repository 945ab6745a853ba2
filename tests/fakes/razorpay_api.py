"""A local server speaking Razorpay's Orders and Payments APIs (`POST /v1/orders`,
`GET /v1/payments/{id}`, `POST /v1/payments/{id}/capture`, HTTP Basic auth), and helpers that
sign what Razorpay's checkout and webhooks would send.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def checkout_signature(order_id: str, payment_id: str, key_secret: str) -> str:
    message = f"{order_id}|{payment_id}".encode()
    return hmac.new(key_secret.encode(), message, hashlib.sha256).hexdigest()


def webhook_body(event: str, order_id: str, payment_id: str, amount: int, currency: str) -> bytes:
    """A webhook body shaped like Razorpay's (payment entity, and the order for order.paid)."""
    payment = {
        "id": payment_id, "entity": "payment", "amount": amount, "currency": currency,
        "status": {"payment.failed": "failed", "payment.authorized": "authorized"}.get(
            event, "captured"
        ),
        "order_id": order_id, "method": "card",
        "captured": event not in {"payment.failed", "payment.authorized"},
        "error_code": "BAD_REQUEST_ERROR" if event == "payment.failed" else None,
        "error_description": "Payment failed due to insufficient balance"
        if event == "payment.failed" else None,
        "created_at": int(time.time()),
    }  # fmt: skip
    payload: dict[str, Any] = {"payment": {"entity": payment}}
    if event == "order.paid":
        payload["order"] = {"entity": {"id": order_id, "entity": "order", "amount": amount,
                                       "amount_paid": amount, "status": "paid"}}  # fmt: skip
    return _event(event, payload)


def refund_webhook_body(
    event: str, refund_id: str, payment_id: str, amount: int, currency: str
) -> bytes:
    """A refund.* webhook as Razorpay sends it: the refund entity (and its payment's)."""
    refund = {
        "id": refund_id, "entity": "refund", "amount": amount, "currency": currency,
        "payment_id": payment_id, "notes": [], "receipt": None,
        "status": {"refund.failed": "failed", "refund.created": "pending"}.get(event, "processed"),
        "speed_processed": "normal", "speed_requested": "normal", "created_at": int(time.time()),
    }  # fmt: skip
    payment = {
        "id": payment_id, "entity": "payment", "currency": currency, "amount_refunded": amount,
        "refund_status": "partial", "status": "refunded",
    }  # fmt: skip
    return _event(event, {"refund": {"entity": refund}, "payment": {"entity": payment}})


def dispute_lost_body(dispute_id: str, payment_id: str, amount: int, currency: str) -> bytes:
    dispute = {
        "id": dispute_id, "entity": "dispute", "payment_id": payment_id, "amount": amount,
        "currency": currency, "amount_deducted": amount, "reason_code": "chargeback",
        "status": "lost", "phase": "chargeback", "created_at": int(time.time()),
    }  # fmt: skip
    return _event("payment.dispute.lost", {"dispute": {"entity": dispute}})


def _event(event: str, payload: dict[str, Any]) -> bytes:
    body = {
        "entity": "event", "account_id": "acc_FAKE000001", "event": event,
        "contains": sorted(payload), "payload": payload, "created_at": int(time.time()),
    }  # fmt: skip
    return json.dumps(body).encode()


def webhook_signature(body: bytes, secret: str) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass
class RazorpayFake:
    key_id: str = "rzp_test_FAKEKEY0001"
    key_secret: str = "fake_key_secret_0123456789"
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    payments: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Payment ids asked to be captured, in order.
    captures: list[str] = field(default_factory=list)
    # How long a capture takes (the bank's round trip), to let two of them overlap.
    capture_delay_s: float = 0.0
    captures_in_flight: int = 0
    most_captures_in_flight: int = 0
    fail_next: int = 0
    # Per payment id, the error statuses its next requests are answered with, in order (500:
    # an outage, 429: a rate limit); only that payment's requests take them.
    payment_errors: dict[str, list[int]] = field(default_factory=dict)
    # Per payment id, run once when it is next fetched, before the answer (what another
    # process does meanwhile).
    on_next_fetch: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _runner: web.AppRunner | None = None
    url: str = ""

    def pay(self, order_id: str, status: str = "captured", **changes: Any) -> str:
        """A checkout's payment of the order (as the customer's bank answered it); its id."""
        order = self.orders[order_id]
        payment_id = f"pay_FAKE{next(self._ids):010d}"
        self.payments[payment_id] = {
            "id": payment_id, "entity": "payment", "amount": order["amount"],
            "currency": order["currency"], "status": status, "order_id": order_id,
            "method": "card", "captured": status == "captured", "amount_refunded": 0,
            "refund_status": None, "created_at": int(time.time()),
        } | changes  # fmt: skip
        return payment_id

    def _refused(self, request: web.Request) -> web.Response | None:
        """Razorpay's answers before the request is looked at: bad credentials, an outage, a
        rate limit."""
        expected = "Basic " + base64.b64encode(f"{self.key_id}:{self.key_secret}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return _error(401, "BAD_REQUEST_ERROR", "Authentication failed")
        errors = self.payment_errors.get(request.match_info.get("payment_id", ""))
        if errors:
            status = errors.pop(0)
            if status == 429:
                return _error(429, "BAD_REQUEST_ERROR", "Too many requests")
            return _error(status, "SERVER_ERROR", "The server encountered an error")
        if self.fail_next > 0:
            self.fail_next -= 1
            return _error(500, "SERVER_ERROR",
                          "The server encountered an error. The incident has been reported to"
                          " admins")  # fmt: skip
        return None

    async def _fetch_payment(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        payment = self.payments.get(request.match_info["payment_id"])
        if payment is None:
            return _error(400, "BAD_REQUEST_ERROR", "The id provided does not exist")
        answer = dict(payment)
        if (meanwhile := self.on_next_fetch.pop(payment["id"], None)) is not None:
            await meanwhile()
        return web.json_response(answer)

    async def _capture(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        body = await request.json()
        self.captures.append(request.match_info["payment_id"])
        self.captures_in_flight += 1
        self.most_captures_in_flight = max(self.most_captures_in_flight, self.captures_in_flight)
        try:
            await asyncio.sleep(self.capture_delay_s)
        finally:
            self.captures_in_flight -= 1
        payment = self.payments.get(request.match_info["payment_id"])
        if payment is None:
            return _error(400, "BAD_REQUEST_ERROR", "The id provided does not exist")
        if payment["status"] == "captured":
            return _error(400, "BAD_REQUEST_ERROR", "This payment has already been captured")
        if payment["status"] != "authorized":
            return _error(400, "BAD_REQUEST_ERROR",
                          "Only payments which have been authorized and not yet captured can be"
                          " captured")  # fmt: skip
        if (body.get("amount"), body.get("currency")) != (payment["amount"], payment["currency"]):
            return _error(400, "BAD_REQUEST_ERROR",
                          "Capture amount must be equal to the amount authorized")  # fmt: skip
        payment.update(status="captured", captured=True)
        return web.json_response(payment)

    async def _create_order(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        body = await request.json()
        self.requests.append(body)
        if not isinstance(body.get("amount"), int) or body["amount"] < 100:
            return _error(400, "BAD_REQUEST_ERROR", "The amount must be atleast INR 1.00")
        order_id = f"order_FAKE{next(self._ids):010d}"
        order = {
            "id": order_id, "entity": "order", "amount": body["amount"], "amount_paid": 0,
            "amount_due": body["amount"], "currency": body["currency"],
            "receipt": body.get("receipt"), "offer_id": None, "status": "created", "attempts": 0,
            "notes": body.get("notes", {}), "created_at": int(time.time()),
        }  # fmt: skip
        self.orders[order_id] = order
        return web.json_response(order)

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_post("/v1/orders", self._create_order)
        app.router.add_get("/v1/payments/{payment_id}", self._fetch_payment)
        app.router.add_post("/v1/payments/{payment_id}/capture", self._capture)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _error(status: int, code: str, description: str) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "description": description, "source": "NA", "step": "NA",
                   "reason": "NA", "metadata": {}}},
        status=status,
    )  # fmt: skip
