"""Tokens: packs, Razorpay top-ups (order, checkout verification, webhook), balance and usage.

A payment credits tokens exactly once: the order row is marked paid and the credit is put in
the outbox in one transaction (flexoraa.credits); the worker's relay publishes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.deps import AdminDep, PrincipalDep, ServicesDep, WebhookLimit
from api.errors import ApiError
from api.lead_state import StateUnavailable
from api.models import RequestBody
from api.paging import CursorQuery, cursor_time, decode_cursor, encode_cursor
from api.payments import (
    CapturePending,
    PaymentNotCredited,
    confirm_and_credit,
    outcome_of,
)
from api.webhook_letters import WEBHOOK_RECORDS, webhook_letter
from connectors.razorpay import (
    PaymentProviderError,
    PaymentRefused,
    PaymentsNotConfigured,
    new_receipt,
    webhook_signature_valid,
)
from flexoraa.credits import (
    Connection,
    credit_paid_order,
    debit_reversal,
    refund_failed,
)
from flexoraa.kafka import PublishUnavailable
from schemas.events import EventTime
from schemas.latency import NO_TENANT

logger = logging.getLogger(__name__)
router = APIRouter(tags=["tokens"])

SIGNATURE_HEADER = "x-razorpay-signature"
EVENT_ID_HEADER = "x-razorpay-event-id"


class PackView(BaseModel):
    name: str
    tokens: int
    amount: int = Field(description="in the currency's smallest unit (cents)")
    price: str = Field(description="in major units, e.g. 350.00")
    currency: str


@router.get("/api/tokens/packs", response_model=list[PackView])
async def packs(principal: PrincipalDep, services: ServicesDep) -> list[PackView]:
    return [
        PackView(
            name=p.name,
            tokens=p.tokens,
            amount=p.amount_minor,
            price=f"{p.amount_minor / 100:.2f}",
            currency=p.currency,
        )
        for p in services.packs.values()
    ]


class CreateOrderRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")
    pack: str = Field(min_length=1, max_length=64)


class OrderView(BaseModel):
    order_id: str
    amount: int
    currency: str
    key_id: str
    receipt: str
    pack: str
    tokens: int


@router.post(
    "/api/tokens/topup/create-order",
    status_code=201,
    response_model=OrderView,
    responses={400: {}, 502: {}, 503: {"description": "payments are not configured"}},
)
async def create_order(
    body: CreateOrderRequest, principal: AdminDep, services: ServicesDep
) -> OrderView:
    pack = services.packs.get(body.pack)
    if pack is None:
        raise ApiError(400, f"pack: unknown pack {body.pack!r}; one of {sorted(services.packs)}")
    receipt = new_receipt()
    try:
        order = await services.razorpay.create_order(pack, receipt, principal.tenant_id)
    except PaymentsNotConfigured as exc:
        raise ApiError(503, str(exc)) from exc
    except PaymentProviderError as exc:
        raise ApiError(502, str(exc)) from exc
    await services.pool.execute(
        """INSERT INTO payment_orders (order_id, tenant_id, receipt, pack, tokens, amount,
                                       currency)
           VALUES ($1, $2, $3, $4, $5, $6, $7)""",
        order["id"], principal.tenant_id, receipt, pack.name, pack.tokens, pack.amount_minor,
        pack.currency,
    )  # fmt: skip
    return OrderView(
        order_id=order["id"],
        amount=pack.amount_minor,
        currency=pack.currency,
        key_id=services.razorpay.key_id or "",
        receipt=receipt,
        pack=pack.name,
        tokens=pack.tokens,
    )


class VerifyRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")
    razorpay_order_id: str = Field(min_length=1, max_length=64)
    razorpay_payment_id: str = Field(min_length=1, max_length=64)
    razorpay_signature: str = Field(min_length=1, max_length=256)


class CreditView(BaseModel):
    # paid_twice: the order was paid by another payment before; this one is to be refunded.
    # pending: Razorpay could not be asked whether the payment is captured; its webhook
    # credits the order once it is (or verify again).
    status: Literal["credited", "already_credited", "paid_twice", "pending"]
    order_id: str
    tokens: int


@router.post(
    "/api/tokens/topup/verify",
    response_model=CreditView,
    responses={
        202: {
            "description": "pending: Razorpay did not answer, or another payment of the"
            " order is being captured; credited on its webhook"
        },
        400: {"description": "signature mismatch"},
        404: {},
        409: {"description": "the payment is not captured for this order (failed, refunded)"},
        503: {},
    },
)
async def verify(
    body: VerifyRequest, principal: AdminDep, services: ServicesDep, response: Response
) -> CreditView:
    """Credits a checkout's payment once Razorpay says it is captured for this order.

    The checkout's signature only says the payment was authorised; an authorisation left
    uncaptured is released to the customer after some days, and a payment may be refunded
    before this call. So the payment is fetched (and captured, if the account captures
    manually) before any token is credited."""
    if not services.razorpay.configured:
        raise ApiError(503, "payments are not configured: set RAZORPAY_KEY_ID and "
                            "RAZORPAY_KEY_SECRET")  # fmt: skip
    order = await services.pool.fetchrow(
        "SELECT order_id, tokens, amount, currency, status, payment_id FROM payment_orders"
        " WHERE order_id = $1 AND tenant_id = $2",
        body.razorpay_order_id,
        principal.tenant_id,
    )
    if order is None:
        raise ApiError(404, "razorpay_order_id: no such order of this tenant")
    with services.latency.measure("verification", tenant_id=principal.tenant_id):
        valid = services.razorpay.payment_signature_valid(
            order["order_id"], body.razorpay_payment_id, body.razorpay_signature
        )
    if not valid:
        raise ApiError(400, "razorpay_signature: does not match the order and payment")
    try:
        confirmed = await confirm_and_credit(
            services.pool, services.razorpay, order["order_id"], body.razorpay_payment_id
        )
    except (PaymentNotCredited, PaymentRefused) as exc:
        raise ApiError(409, f"razorpay_payment_id: {exc}; no tokens credited") from exc
    except (PaymentProviderError, CapturePending) as exc:
        logger.warning("payment %s not confirmed (%s): left to the webhook",
                       body.razorpay_payment_id, exc)  # fmt: skip
        response.status_code = 202
        return CreditView(status="pending", order_id=order["order_id"], tokens=order["tokens"])
    return CreditView(
        status=confirmed.outcome, order_id=confirmed.order_id, tokens=confirmed.tokens
    )


@router.post(
    "/webhooks/razorpay",
    responses={400: {"description": "missing or wrong X-Razorpay-Signature"}, 429: {}, 503: {}},
    dependencies=[WebhookLimit],
)
async def razorpay_webhook(request: Request, services: ServicesDep) -> JSONResponse:
    secret = services.settings.razorpay_webhook_secret
    if secret is None:
        raise ApiError(503, "payments are not configured: set RAZORPAY_WEBHOOK_SECRET")
    body = await request.body()
    with services.latency.measure("verification", tenant_id=NO_TENANT):
        valid = webhook_signature_valid(
            body, request.headers.get(SIGNATURE_HEADER), secret.get_secret_value()
        )
    if not valid:
        raise ApiError(400, "missing or invalid X-Razorpay-Signature")
    try:
        event = json.loads(body)
        event_type = str(event["event"])
        entities = event.get("payload") or {}
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        # Signed, so Razorpay's: an error answer would be retried for a day and then the
        # webhook disabled, every later payment with it. Kept on the dead-letter topic (a
        # payment may be in it), acknowledged and said.
        logger.error("signed Razorpay webhook not understood (%r): %.500r", exc, body)
        letter = webhook_letter("razorpay", body, f"unparseable webhook: {exc!r}")
        try:
            await services.publisher.publish(services.topics.dead_letters, None, letter)
        except PublishUnavailable as unavailable:
            raise ApiError(
                503, "webhook not kept: Kafka is unavailable", headers={"Retry-After": "5"}
            ) from unavailable
        WEBHOOK_RECORDS.labels("razorpay", "malformed").inc()
        return JSONResponse({"status": "unparseable"})
    # Razorpay sends the id in a header; a body hash stands in if a proxy dropped it.
    event_id = request.headers.get(EVENT_ID_HEADER) or hashlib.sha256(body).hexdigest()
    payment = _entity(entities, "payment")
    order = _entity(entities, "order")
    # Refunds and disputes name their payment; their payload's payment entity may be absent.
    reversal = _entity(entities, "refund") or _entity(entities, "dispute")
    # Only ids that are ids: an odd type reached PostgreSQL as a 503, which Razorpay retries
    # for a day and then disables the webhook with every later payment.
    order_id = _text(payment.get("order_id")) or _text(order.get("id"))
    payment_id = _text(payment.get("id")) or _text(reversal.get("payment_id"))
    async with services.pool.acquire() as conn:
        return await _record_and_apply(
            conn, body, event_id, event_type, order_id, payment_id, payment, reversal
        )


async def _record_and_apply(
    conn: Connection,
    body: bytes,
    event_id: str,
    event_type: str,
    order_id: str | None,
    payment_id: str | None,
    payment: dict[str, Any],
    reversal: dict[str, Any],
) -> JSONResponse:
    """Records the event and applies it in one transaction."""
    async with conn.transaction():
        # Recorded in the transaction of its effect: a crash leaves neither, and Razorpay's
        # redelivery is processed; a redelivery after success is acknowledged and ignored.
        recorded = await conn.fetchval(
            """INSERT INTO payment_events (event_id, event_type, order_id, payment_id, payload)
               VALUES ($1, $2, $3, $4, $5::text::jsonb) ON CONFLICT DO NOTHING RETURNING 1""",
            event_id, event_type, order_id, payment_id, body.decode("utf-8", "replace"),
        )  # fmt: skip
        if recorded is None:
            return JSONResponse({"status": "duplicate", "event_id": event_id})
        if event_type in REVERSAL_EVENTS:
            outcome = await _reverse(conn, event_type, reversal, order_id)
        else:
            outcome = await _apply(conn, event_type, order_id, payment_id, payment)
    return JSONResponse({"status": outcome, "event_id": event_id})


def _entity(entities: Any, name: str) -> dict[str, Any]:
    wrapper = entities.get(name) if isinstance(entities, dict) else None
    entity = wrapper.get("entity") if isinstance(wrapper, dict) else None
    return entity if isinstance(entity, dict) else {}


async def _apply(
    conn: Connection,
    event_type: str,
    order_id: str | None,
    payment_id: str | None,
    payment: dict[str, Any],
) -> str:
    if event_type not in {"payment.captured", "order.paid", "payment.failed"}:
        return "recorded"
    if not order_id or not payment_id:
        logger.warning("%s without order or payment id: recorded only", event_type)
        return "recorded"
    order = await conn.fetchrow(
        "SELECT amount, currency, status FROM payment_orders WHERE order_id = $1", order_id
    )
    if order is None:
        # Not one of our orders (Razorpay refunds payments without an order of ours).
        logger.warning("%s for unknown order %s: recorded only", event_type, order_id)
        return "unknown_order"
    if event_type == "payment.failed":
        await conn.execute(
            "UPDATE payment_orders SET status = 'failed', failure_reason = $2, updated_at = now()"
            " WHERE order_id = $1 AND status <> 'paid'",
            order_id,
            str(payment.get("error_description") or payment.get("error_code") or "failed")[:500],
        )
        return "failed"
    amount = payment.get("amount")
    if amount is not None and (amount, payment.get("currency")) != (
        order["amount"],
        order["currency"],
    ):
        logger.error("payment %s of %s does not match order %s", payment_id, amount, order_id)
        await conn.execute(
            "UPDATE payment_orders SET failure_reason = 'amount mismatch', updated_at = now()"
            " WHERE order_id = $1 AND status <> 'paid'",
            order_id,
        )
        return "amount_mismatch"
    paid = await credit_paid_order(conn, order_id, payment_id)
    return outcome_of(paid)


# Money going back to the customer, and a refund that did not: the tokens follow the money.
REVERSAL_EVENTS = frozenset(
    {"refund.created", "refund.processed", "refund.failed", "payment.dispute.lost"}
)


async def _reverse(
    conn: Connection, event_type: str, reversal: dict[str, Any], order_id: str | None
) -> str:
    """A refund (debited at refund.created or refund.processed, whichever comes first, and
    given back at refund.failed) or a lost dispute (a chargeback): the order's tokens that
    money bought are taken back (flexoraa.credits.debit_reversal)."""
    reversal_id = _text(reversal.get("id"))
    payment_id = _text(reversal.get("payment_id"))
    amount = reversal.get("amount")
    if not (reversal_id and payment_id and type(amount) is int and 0 <= amount <= MAX_AMOUNT):
        logger.warning("%s without a readable refund or dispute: recorded only", event_type)
        return "recorded"
    if event_type == "refund.failed":
        failed = await refund_failed(
            conn, refund_id=reversal_id, payment_id=payment_id, order_id=order_id
        )
        return {"failed": "refund_failed", "already": "already_failed"}.get(
            failed.outcome, failed.outcome
        )
    currency = reversal.get("currency")
    reversed_ = await debit_reversal(
        conn,
        kind="chargeback" if event_type == "payment.dispute.lost" else "refund",
        reversal_id=reversal_id,
        payment_id=payment_id,
        order_id=order_id,
        amount=amount,
        currency=currency if isinstance(currency, str) else None,
    )
    return "already_debited" if reversed_.outcome == "already" else reversed_.outcome


# Razorpay's ids are short; anything else in a signed payload is recorded, never stored as one
# (a refund id becomes a debit's reference, at most 128 characters).
MAX_ID_CHARS = 128
# Amounts in minor units past any real payment (and far inside PostgreSQL's bigint).
MAX_AMOUNT = 10**15


def _text(value: Any) -> str | None:
    """A signed payload's id, if it is one: a non-empty string of at most MAX_ID_CHARS."""
    return value if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS else None


@router.get("/api/tokens/balance", responses={503: {}})
async def balance(principal: PrincipalDep, services: ServicesDep) -> dict[str, Any]:
    try:
        account = await services.lead_state.tenant_tokens(principal.tenant_id)
    except StateUnavailable as exc:
        # Not the error's text: it names the worker's internal address.
        raise ApiError(503, "token account unavailable: no worker answered") from exc
    return {
        "balance": account["balance"],
        "used_this_cycle": account["used_this_cycle"],
        "cycle_tokens": account["cycle_base"],
        "percent_used": account["percent_used"],
        "paused": account["paused"],
        "total_credited": account["credited"],
        # Taken back by refunds and lost disputes (a worker older than debits says nothing).
        "total_debited": account.get("debited", 0),
        "total_used": account["used"],
    }


GroupBy = Literal["day", "feature", "lead"]
_GROUP_COLUMN = {
    "day": "((occurred_at AT TIME ZONE 'UTC')::date)::text",
    "feature": "feature",
    "lead": "coalesce(lead_id, '')",
}


@router.get("/api/tokens/usage", responses={400: {}})
async def usage(
    principal: PrincipalDep,
    services: ServicesDep,
    from_: Annotated[EventTime | None, Query(alias="from")] = None,
    to: EventTime | None = None,
    group_by: GroupBy = "day",
) -> dict[str, Any]:
    until = to or datetime.now(UTC)
    since = from_ or until - timedelta(days=30)
    if since >= until:
        raise ApiError(400, "from: must be before to")
    column = _GROUP_COLUMN[group_by]  # from a fixed map, never from the request
    rows = await services.pool.fetch(
        f"""SELECT {column} AS bucket, sum(tokens)::bigint AS tokens, count(*) AS actions,
                   sum(prompt_tokens)::bigint AS prompt_tokens,
                   sum(completion_tokens)::bigint AS completion_tokens
            FROM token_ledger
            WHERE tenant_id = $1 AND kind = 'usage' AND occurred_at >= $2 AND occurred_at < $3
            GROUP BY 1 ORDER BY 1""",
        principal.tenant_id,
        since,
        until,
    )
    return {
        "from": since.isoformat(),
        "to": until.isoformat(),
        "group_by": group_by,
        "total_tokens": sum(r["tokens"] for r in rows),
        "groups": [
            {
                group_by: r["bucket"] or None,
                "tokens": r["tokens"],
                "actions": r["actions"],
                "prompt_tokens": r["prompt_tokens"],
                "completion_tokens": r["completion_tokens"],
            }
            for r in rows
        ],
    }


@router.get("/api/tokens/payment-history")
async def payment_history(
    principal: PrincipalDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: EventTime | None = None,
    cursor: CursorQuery = None,
) -> dict[str, Any]:
    """The tenant's orders, newest first; `before` filters by time, `cursor` pages."""
    after_at, after_order = None, None
    if cursor is not None:
        # Keyset on (time, order id): orders created in one instant are not skipped.
        at, after_order = decode_cursor(cursor, 2)
        after_at = cursor_time(at)
    rows: list[asyncpg.Record] = await services.pool.fetch(
        """SELECT order_id, pack, tokens, amount, currency, status, payment_id, failure_reason,
                  created_at, credited_at, refunded_amount, tokens_taken_back
           FROM payment_orders o, LATERAL (
               SELECT coalesce(sum(r.amount), 0)::bigint AS refunded_amount,
                      coalesce(sum(r.tokens), 0)::bigint AS tokens_taken_back
               FROM payment_reversals r WHERE r.order_id = o.order_id AND r.status = 'debited'
           ) reversed
           WHERE tenant_id = $1 AND ($2::timestamptz IS NULL OR created_at < $2)
             AND ($3::timestamptz IS NULL OR (created_at, order_id) < ($3, $4::text))
           ORDER BY created_at DESC, order_id DESC LIMIT $5""",
        principal.tenant_id,
        before,
        after_at,
        after_order,
        limit,
    )
    payments = [dict(r) for r in rows]
    next_cursor, next_before = None, None
    if len(rows) == limit:
        last = payments[-1]
        next_cursor = encode_cursor(last["created_at"].isoformat(), last["order_id"])
        next_before = last["created_at"].isoformat()
    # next_before: kept for clients written before the cursor (it skips orders of one instant).
    return {"payments": payments, "next_cursor": next_cursor, "next_before": next_before}
