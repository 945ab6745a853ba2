"""A local server speaking Razorpay's Orders API (`POST /v1/orders`, HTTP Basic auth), and
helpers that sign what Razorpay's checkout and webhooks would send.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import time
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
        "status": "failed" if event == "payment.failed" else "captured", "order_id": order_id,
        "method": "card", "captured": event != "payment.failed",
        "error_code": "BAD_REQUEST_ERROR" if event == "payment.failed" else None,
        "error_description": "Payment failed due to insufficient balance"
        if event == "payment.failed" else None,
        "created_at": int(time.time()),
    }  # fmt: skip
    payload: dict[str, Any] = {"payment": {"entity": payment}}
    if event == "order.paid":
        payload["order"] = {"entity": {"id": order_id, "entity": "order", "amount": amount,
                                       "amount_paid": amount, "status": "paid"}}  # fmt: skip
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
    fail_next: int = 0
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _runner: web.AppRunner | None = None
    url: str = ""

    async def _create_order(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{self.key_id}:{self.key_secret}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response(
                {"error": {"code": "BAD_REQUEST_ERROR", "description": "Authentication failed",
                           "source": "NA", "step": "NA", "reason": "NA", "metadata": {}}},
                status=401,
            )  # fmt: skip
        body = await request.json()
        self.requests.append(body)
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response(
                {"error": {"code": "SERVER_ERROR", "description": "The server encountered an "
                           "error. The incident has been reported to admins"}},
                status=500,
            )  # fmt: skip
        if not isinstance(body.get("amount"), int) or body["amount"] < 100:
            return web.json_response(
                {"error": {"code": "BAD_REQUEST_ERROR", "field": "amount",
                           "description": "The amount must be atleast INR 1.00"}},
                status=400,
            )  # fmt: skip
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
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
