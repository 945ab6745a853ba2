"""Razorpay: orders and payments through the official SDK, and the two signature checks
(PLATFORM.md).

The SDK is synchronous (requests), so its calls run in a thread and never block the loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import razorpay
from razorpay.errors import BadRequestError, GatewayError, ServerError, SignatureVerificationError
from requests import RequestException

from flexoraa.settings import Settings
from streams.rules.tokens import Pack


class PaymentsNotConfigured(RuntimeError):
    """RAZORPAY_KEY_ID / RAZORPAY_KEY_SECRET are unset."""


class PaymentProviderError(RuntimeError):
    """Razorpay refused or could not be reached."""


class PaymentRefused(PaymentProviderError):
    """Razorpay answered the request was wrong (a 4xx): an unknown payment, one already
    captured."""


def new_receipt() -> str:
    # Razorpay limits receipts to 40 characters; ours are unique per order.
    return f"tok_{uuid.uuid4().hex}"


_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def webhook_signature_valid(body: bytes, signature: str | None, secret: str) -> bool:
    """X-Razorpay-Signature = hex HMAC-SHA256 of the raw body with the webhook secret.

    Checked here on the raw bytes (the SDK's helper takes a str and would need the body
    decoded first), in constant time.
    """
    if not signature:
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    # Bytes: compare_digest refuses a str with non-ASCII characters (a TypeError, a 500 that
    # anyone could cause and that counted as a failed verification in the SLA).
    return hmac.compare_digest(expected.encode(), signature.strip().encode())


@dataclass(frozen=True)
class PaymentCheck:
    """What a payment, as Razorpay reports it, allows for the order it should pay."""

    # credit: captured, for this order's amount; capture: authorised only (manual capture),
    # ours to capture; refuse: nothing to credit (failed, refunded, another order or amount).
    verdict: Literal["credit", "capture", "refuse"]
    reason: str = ""


def check_payment(
    payment: dict[str, Any], order_id: str, amount: int, currency: str
) -> PaymentCheck:
    """The checkout's signature says only that the payment was authorised: an authorisation
    that is never captured, or is refunded, must not leave its tokens behind. Pure."""
    status = payment.get("status")
    if payment.get("order_id") != order_id:
        return PaymentCheck("refuse", f"payment {payment.get('id')} is not of order {order_id}")
    if (payment.get("amount"), payment.get("currency")) != (amount, currency):
        return PaymentCheck(
            "refuse",
            f"payment of {payment.get('amount')} {payment.get('currency')} does not match the"
            f" order's {amount} {currency}",
        )
    if payment.get("amount_refunded"):
        return PaymentCheck("refuse", f"payment is refunded ({payment.get('amount_refunded')})")
    if status == "captured":
        return PaymentCheck("credit")
    if status == "authorized":
        return PaymentCheck("capture")
    return PaymentCheck("refuse", f"payment is {status}")


class RazorpayGateway:
    def __init__(self, settings: Settings) -> None:
        self.key_id = settings.razorpay_key_id
        self.timeout_s = settings.razorpay_timeout_s
        secret = settings.razorpay_key_secret
        self._client: Any = None
        if self.key_id and secret is not None:
            self._client = razorpay.Client(
                auth=(self.key_id, secret.get_secret_value()), base_url=settings.razorpay_api_url
            )

    @property
    def configured(self) -> bool:
        return self._client is not None

    def _require(self) -> Any:
        if self._client is None:
            raise PaymentsNotConfigured(
                "payments are not configured: set RAZORPAY_KEY_ID and RAZORPAY_KEY_SECRET"
            )
        return self._client

    async def create_order(self, pack: Pack, receipt: str, tenant_id: str) -> dict[str, Any]:
        client = self._require()
        data = {
            "amount": pack.amount_minor,
            "currency": pack.currency,
            "receipt": receipt,
            "notes": {"tenant_id": tenant_id, "pack": pack.name, "tokens": str(pack.tokens)},
        }
        return await self._call(client.order.create, data)

    async def capture(
        self, payment_id: str, order_id: str, amount: int, currency: str
    ) -> PaymentCheck:
        """Captures an authorised payment; what Razorpay then reports ("capture" again: still
        authorised, its capture under way elsewhere or not done)."""
        client = self._require()
        try:
            # The SDK writes the amount into the dict it is given (its default is shared).
            payment = await self._call(
                client.payment.capture, payment_id, amount, {"currency": currency}
            )
        except PaymentRefused:
            # Captured meanwhile (by the dashboard, auto-capture, another verify): say what is.
            payment = await self._call(client.payment.fetch, payment_id)
        return check_payment(payment, order_id, amount, currency)

    async def payment_check(
        self,
        payment_id: str,
        order_id: str,
        amount: int,
        currency: str,
    ) -> PaymentCheck:
        """What the payment, as Razorpay reports it now, allows for the order."""
        client = self._require()
        payment = await self._call(client.payment.fetch, payment_id)
        return check_payment(payment, order_id, amount, currency)

    async def _call(self, method: Any, *args: Any) -> dict[str, Any]:
        try:
            answer: dict[str, Any] = await asyncio.to_thread(method, *args, timeout=self.timeout_s)
        except BadRequestError as exc:
            raise PaymentRefused(f"Razorpay refused: {exc}") from exc
        except (GatewayError, ServerError, RequestException) as exc:
            raise PaymentProviderError(f"Razorpay did not answer: {exc}") from exc
        return answer

    def payment_signature_valid(self, order_id: str, payment_id: str, signature: str) -> bool:
        """The checkout's signature over *our stored* order id and the payment id."""
        client = self._require()
        if not _HEX_DIGEST.fullmatch(signature):
            # The SDK compares str to str, which raises on non-ASCII text: a hex digest or no.
            return False
        try:
            client.utility.verify_payment_signature(
                {
                    "razorpay_order_id": order_id,
                    "razorpay_payment_id": payment_id,
                    "razorpay_signature": signature,
                }
            )
        except SignatureVerificationError:
            return False
        return True
