"""Token credits through the transactional outbox (DESIGN.md, "Guarantees").

Whatever earns tokens — an order paid, a subscription cycle, a new tenant's trial — writes its
state change and a `token_outbox` row in one PostgreSQL transaction. `relay_pending` publishes
pending rows to the token-credits topic and marks them only after Kafka acknowledged them. A
crash between commit and publish leaves the row pending (published on the next pass); a crash
between publish and mark publishes it again with the same event id, which the account ignores.
"""

from __future__ import annotations

import calendar
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, TypeVar, cast, get_args

import asyncpg
from pydantic import ValidationError

from flexoraa import audit
from schemas.tokens import (
    BalanceChange,
    BalanceChangeRecord,
    CreditSource,
    DebitSource,
    TokenCredit,
    TokenDebit,
    credit_event_id,
)
from streams.rules.tokens import refund_debit

logger = logging.getLogger(__name__)

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

# The outbox kinds this version publishes.
RELAYED_KINDS = [cast(str, model.model_fields["kind"].default) for model in get_args(BalanceChange)]
Change = TypeVar("Change", TokenCredit, TokenDebit)
# Publishes one credit or debit (keyed by tenant) and returns once Kafka acknowledged it.
PublishCredit = Callable[[BalanceChange], Awaitable[None]]


async def enqueue_credit(
    conn: Connection, tenant_id: str, source: CreditSource, reference: str, tokens: int
) -> TokenCredit:
    """Adds a credit to the outbox; call inside the transaction of the change that earned it."""
    return await _enqueue(conn, TokenCredit, tenant_id, source, reference, tokens)


async def enqueue_debit(
    conn: Connection, tenant_id: str, source: DebitSource, reference: str, tokens: int
) -> TokenDebit:
    """Adds a debit to the outbox; call inside the transaction of the refund that caused it."""
    return await _enqueue(conn, TokenDebit, tenant_id, source, reference, tokens)


async def _enqueue(
    conn: Connection,
    kind: type[Change],
    tenant_id: str,
    source: CreditSource | DebitSource,
    reference: str,
    tokens: int,
) -> Change:
    change = kind.model_validate(
        {
            # One id per tenant, source and reference: a repeat is the same event.
            "event_id": credit_event_id(tenant_id, source, reference),
            "tenant_id": tenant_id,
            "occurred_at": datetime.now(UTC),
            "source": source,
            "reference": reference,
            "tokens": tokens,
        }
    )
    await conn.execute(
        # text → jsonb in SQL: the same with or without the pool's jsonb codec.
        "INSERT INTO token_outbox (event_id, tenant_id, payload) VALUES ($1, $2, $3::text::jsonb)"
        " ON CONFLICT (event_id) DO NOTHING",
        change.event_id,
        change.tenant_id,
        change.model_dump_json(),
    )
    return change


async def grant_trial(conn: Connection, tenant_id: str, tokens: int) -> None:
    """A new tenant's first tokens; idempotent (one trial per tenant)."""
    if tokens > 0:
        await enqueue_credit(conn, tenant_id, "trial", tenant_id, tokens)


@dataclass(frozen=True)
class PaidOrder:
    order_id: str
    tenant_id: str
    tokens: int
    newly_credited: bool
    # Paid already by another payment: the customer was charged twice (refund one).
    paid_twice: bool = False


async def credit_paid_order(conn: Connection, order_id: str, payment_id: str) -> PaidOrder | None:
    """Marks our order paid by `payment_id` and enqueues its credit, exactly once; call inside
    a transaction. None when the order is not ours.

    The verify call and the webhook may race for the same payment: the row lock of the UPDATE
    serialises them and the loser sees `status = 'paid'`, so only one transaction enqueues.
    """
    row = await conn.fetchrow(
        "UPDATE payment_orders SET status = 'paid', payment_id = $2, credited_at = now(),"
        " failure_reason = NULL, updated_at = now()"
        " WHERE order_id = $1 AND status <> 'paid'"
        " RETURNING tenant_id::text, tokens",
        order_id,
        payment_id,
    )
    if row is not None:
        await enqueue_credit(conn, row["tenant_id"], "purchase", payment_id, row["tokens"])
        await audit.record(conn, tenant_id=row["tenant_id"], actor="razorpay",
                           action="payment.credited", target=payment_id,
                           details={"order_id": order_id, "tokens": row["tokens"]})  # fmt: skip
        # Refunded before it was credited: those tokens go back in the same transaction.
        await _take_back_pending(conn, order_id, payment_id)
        return PaidOrder(order_id, row["tenant_id"], row["tokens"], newly_credited=True)
    existing = await conn.fetchrow(
        "SELECT tenant_id::text, tokens, payment_id FROM payment_orders WHERE order_id = $1",
        order_id,
    )
    if existing is None:
        return None
    paid_twice = existing["payment_id"] not in (None, payment_id)
    if paid_twice:
        # Credited once (the order's tokens), but the money came twice: said loudly, and in
        # the audit log, for a refund; Razorpay does not refuse a second payment of an order.
        # Refund the second: refunding the credited one takes the pack's tokens back.
        logger.error("order %s was paid again by %s (credited to %s): refund %s",
                     order_id, payment_id, existing["payment_id"], payment_id)  # fmt: skip
        # Once per payment: its capture, the order's paid event and the checkout all say it.
        await audit.record(conn, tenant_id=existing["tenant_id"], actor="razorpay",
                           action="payment.duplicate", target=payment_id,
                           details={"order_id": order_id,
                                    "credited_payment": existing["payment_id"],
                                    "refund": payment_id},
                           event_key=f"payment.duplicate|{payment_id}")  # fmt: skip
    return PaidOrder(order_id, existing["tenant_id"], existing["tokens"], newly_credited=False,
                     paid_twice=paid_twice)  # fmt: skip


@dataclass(frozen=True)
class Reversal:
    """What a refund or lost dispute did to the tokens of the order it paid back."""

    # debited: tokens taken back now; pending: the order is not credited yet, and its credit
    # takes them back at once; already: this reversal was handled before; not_credited: the
    # payment credited no order (a second payment of a paid order, or not ours), so no tokens
    # come back; currency_mismatch: recorded only, said in the log; failed: a refund that
    # failed (its tokens, if taken, given back).
    outcome: Literal["debited", "pending", "already", "not_credited", "currency_mismatch", "failed"]
    tokens: int = 0
    order_id: str | None = None


async def _lock_paid_or_payable(
    conn: Connection, payment_id: str, order_id: str | None
) -> asyncpg.Record | None:
    """The order `payment_id` paid, or else the order the payment is for (the refund's
    payload names it), locked: a reversal, the order's credit and a refund's failure are
    serialised on this row, whichever comes first."""
    return await conn.fetchrow(
        "SELECT order_id, tenant_id::text, tokens, amount, currency, status, payment_id"
        " FROM payment_orders WHERE payment_id = $1 OR order_id = $2"
        # The paid row first: the payment may be another order's duplicate.
        " ORDER BY (payment_id = $1) IS TRUE DESC LIMIT 1 FOR UPDATE",
        payment_id,
        order_id,
    )


async def debit_reversal(
    conn: Connection,
    *,
    kind: DebitSource,
    reversal_id: str,
    payment_id: str,
    order_id: str | None,
    amount: int,
    currency: str | None,
) -> Reversal:
    """Takes back the tokens a refund (or a lost dispute) of `amount` returned to the
    customer, once per `reversal_id`; call inside a transaction.

    The share of the order's tokens is computed on the running total of the order's refunds
    (streams.rules.tokens.refund_debit): partial refunds adding up to the price take back
    exactly the pack. A reversal of a payment whose order is not credited yet (its webhooks
    come in any order) is kept pending, and the credit takes it back (`credit_paid_order`).
    """
    order = await _lock_paid_or_payable(conn, payment_id, order_id)
    if order is None or (order["status"] == "paid" and order["payment_id"] != payment_id):
        # A second payment of a paid order (its refund is what paid_twice asked for), or a
        # payment that is none of ours: no tokens were credited for it.
        return Reversal("not_credited")
    if currency is not None and currency != order["currency"]:
        logger.error("%s %s in %s of order %s in %s: recorded, no tokens taken back",
                     kind, reversal_id, currency, order["order_id"], order["currency"])  # fmt: skip
        return Reversal("currency_mismatch", order_id=order["order_id"])
    paid = order["status"] == "paid"
    inserted = await conn.fetchval(
        "INSERT INTO payment_reversals (reversal_id, kind, order_id, tenant_id, payment_id,"
        " amount, tokens, status) VALUES ($1, $2, $3, $4, $5, $6, 0, $7)"
        " ON CONFLICT (reversal_id) DO NOTHING RETURNING 1",
        reversal_id, kind, order["order_id"], order["tenant_id"], payment_id,
        # No more than the order's price: what was paid is all that can come back.
        min(amount, order["amount"]), "debited" if paid else "pending",
    )  # fmt: skip
    if inserted is None:
        return Reversal("already", order_id=order["order_id"])
    if not paid:
        return Reversal("pending", order_id=order["order_id"])
    tokens = await _take_back(conn, order, reversal_id)
    return Reversal("debited", tokens, order["order_id"])


async def _take_back(conn: Connection, order: asyncpg.Record, reversal_id: str) -> int:
    """Debits the tokens of the reversal row `reversal_id` (inserted or pending), on the
    running total of the order's earlier debited reversals; returns them."""
    row = await conn.fetchrow(
        "SELECT kind, payment_id, amount FROM payment_reversals WHERE reversal_id = $1",
        reversal_id,
    )
    assert row is not None  # inserted or pending, in this transaction
    refunded_before = await conn.fetchval(
        "SELECT coalesce(sum(amount), 0)::bigint FROM payment_reversals"
        " WHERE order_id = $1 AND status = 'debited' AND reversal_id <> $2",
        order["order_id"],
        reversal_id,
    )
    tokens = refund_debit(order["tokens"], order["amount"], refunded_before, row["amount"])
    await conn.execute(
        "UPDATE payment_reversals SET status = 'debited', tokens = $2, updated_at = now()"
        " WHERE reversal_id = $1",
        reversal_id,
        tokens,
    )
    if tokens > 0:
        await enqueue_debit(conn, order["tenant_id"], row["kind"], reversal_id, tokens)
    action = "payment.refunded" if row["kind"] == "refund" else "payment.charged_back"
    await audit.record(conn, tenant_id=order["tenant_id"], actor="razorpay", action=action,
                       target=reversal_id,
                       details={"order_id": order["order_id"], "payment_id": row["payment_id"],
                                "amount": row["amount"], "tokens": tokens})  # fmt: skip
    return tokens


async def _take_back_pending(conn: Connection, order_id: str, payment_id: str) -> None:
    """The reversals of `payment_id` that came before its order's credit: debited now, in
    the credit's transaction."""
    order = await conn.fetchrow(
        "SELECT order_id, tenant_id::text, tokens, amount FROM payment_orders WHERE order_id = $1",
        order_id,
    )
    assert order is not None  # the order just credited
    pending = await conn.fetch(
        "SELECT reversal_id FROM payment_reversals WHERE order_id = $1 AND payment_id = $2"
        " AND status = 'pending' ORDER BY created_at, reversal_id",
        order_id,
        payment_id,
    )
    for reversal in pending:
        await _take_back(conn, order, reversal["reversal_id"])


async def refund_failed(
    conn: Connection, *, refund_id: str, payment_id: str, order_id: str | None
) -> Reversal:
    """A refund Razorpay could not complete: the money stayed with us, so the tokens its
    debit took come back (once). Failing before any debit, it is kept as failed and a later
    refund.created or refund.processed for it (webhooks come in any order) takes nothing."""
    order = await _lock_paid_or_payable(conn, payment_id, order_id)
    if order is None or (order["status"] == "paid" and order["payment_id"] != payment_id):
        return Reversal("not_credited")
    row = await conn.fetchrow(
        "UPDATE payment_reversals SET status = 'failed', updated_at = now()"
        " WHERE reversal_id = $1 AND status IN ('debited', 'pending') RETURNING tokens",
        refund_id,
    )
    if row is None:
        inserted = await conn.fetchval(
            "INSERT INTO payment_reversals (reversal_id, kind, order_id, tenant_id, payment_id,"
            " amount, tokens, status) VALUES ($1, 'refund', $2, $3, $4, 0, 0, 'failed')"
            " ON CONFLICT (reversal_id) DO NOTHING RETURNING 1",
            refund_id, order["order_id"], order["tenant_id"], payment_id,
        )  # fmt: skip
        return Reversal("failed" if inserted else "already", order_id=order["order_id"])
    if row["tokens"] > 0:
        await enqueue_credit(conn, order["tenant_id"], "refund_failed", refund_id, row["tokens"])
    details = {"order_id": order["order_id"], "tokens": row["tokens"]}
    await audit.record(
        conn, tenant_id=order["tenant_id"], actor="razorpay", action="payment.refund_failed",
        target=refund_id, details=details,
    )  # fmt: skip
    return Reversal("failed", -row["tokens"], order["order_id"])


# How long a claim on an order's capture stands while its payment is not captured: past it,
# another payment of the order may be captured. Renewed right before the capture request,
# which gives up within twice RAZORPAY_TIMEOUT_S (at most 30 s: a connect and a read), so a
# request lost that long has never landed.
CAPTURE_CLAIM_S = 120


@dataclass(frozen=True)
class Claim:
    """An attempt to claim an order's capture: held by the caller, paid already, or held by
    another payment (`holder`)."""

    held: bool
    paid: bool = False
    holder: str | None = None


async def claim_capture(conn: Connection, order_id: str, payment_id: str) -> Claim:
    """Claims the capture of the unpaid order `order_id` for `payment_id` (again, if it held
    it: the claim's time is renewed, so call it right before capturing). A standing claim of
    another payment is not taken over here: see `take_over_capture`."""
    claimed = await conn.fetchval(
        "UPDATE payment_orders SET capturing_payment_id = $2, capture_claimed_at = now()"
        " WHERE order_id = $1 AND status <> 'paid'"
        " AND (capturing_payment_id IS NULL OR capturing_payment_id = $2) RETURNING 1",
        order_id,
        payment_id,
    )
    if claimed is not None:
        return Claim(held=True)
    row = await conn.fetchrow(
        "SELECT status, capturing_payment_id FROM payment_orders WHERE order_id = $1", order_id
    )
    if row is None or row["status"] == "paid":
        # Paid meanwhile (a webhook, another payment's verify), claimed or not.
        return Claim(held=False, paid=True)
    return Claim(held=False, holder=row["capturing_payment_id"])


async def take_over_capture(
    conn: Connection, order_id: str, payment_id: str, holder: str, *, stale_only: bool
) -> bool:
    """Moves the order's capture claim from `holder` (whose payment Razorpay says is not
    captured) to `payment_id`; with `stale_only`, only a claim older than CAPTURE_CLAIM_S
    (its holder may be capturing it this moment)."""
    moved = await conn.fetchval(
        "UPDATE payment_orders SET capturing_payment_id = $2, capture_claimed_at = now()"
        " WHERE order_id = $1 AND status <> 'paid' AND capturing_payment_id = $3"
        " AND (NOT $4 OR capture_claimed_at < now() - make_interval(secs => $5)) RETURNING 1",
        order_id, payment_id, holder, stale_only, CAPTURE_CLAIM_S,
    )  # fmt: skip
    return moved is not None


def add_month(moment: datetime) -> datetime:
    """The same day and time next month, clamped to the month's last day (Jan 31 → Feb 28)."""
    return months_after(moment, 1)


def months_after(anchor: datetime, months: int) -> datetime:
    """`anchor`'s day and time `months` months later, clamped to that month's last day: from
    Jan 31, Feb 28 and then Mar 31 (not Mar 28)."""
    year, month = divmod(anchor.month - 1 + months, 12)
    year, month = anchor.year + year, month + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def _months_between(anchor: datetime, moment: datetime) -> int:
    return (moment.year - anchor.year) * 12 + moment.month - anchor.month


async def create_subscription(
    conn: Connection, tenant_id: str, plan: str, monthly_tokens: int, start: datetime
) -> str:
    """A monthly plan from `start`; its first cycle is credited by the next relay pass."""
    subscription_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO subscriptions (subscription_id, tenant_id, plan, monthly_tokens,"
        " current_period_start, current_period_end, billing_anchor)"
        " VALUES ($1, $2, $3, $4, $5, $6, $5)",
        subscription_id,
        tenant_id,
        plan,
        monthly_tokens,
        start,
        add_month(start),
    )
    return str(subscription_id)


async def credit_due_subscriptions(pool: asyncpg.Pool, now: datetime) -> int:
    """Rolls active subscriptions into their current cycle and credits each cycle once,
    those begun while no pass ran included."""
    credited = 0
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "SELECT s.subscription_id, s.tenant_id::text AS tenant_id, s.monthly_tokens,"
            " s.current_period_start, s.current_period_end, s.billing_anchor, s.created_at"
            " FROM subscriptions s"
            " WHERE s.status = 'active' AND s.current_period_start <= $1"
            " AND (s.current_period_end <= $1 OR NOT EXISTS ("
            "   SELECT 1 FROM subscription_credits c WHERE c.subscription_id = s.subscription_id"
            "   AND c.period_start = s.current_period_start))"
            " FOR UPDATE OF s SKIP LOCKED",
            now,
        )
        for row in rows:
            start, end = row["current_period_start"], row["current_period_end"]
            anchor = row["billing_anchor"]
            # Every cycle begun since the last pass, not only the current one: a relay down
            # for two months (no worker running) owes the tenant both months' tokens. Not the
            # cycles that ended before the subscription was created: a plan entered with a
            # past start (a customer moved from another system) is owed from its creation.
            starts = [start] if end > row["created_at"] else []
            while end <= now:
                start, end = end, months_after(anchor, _months_between(anchor, end) + 1)
                if end > row["created_at"]:
                    starts.append(start)
            if (start, end) != (row["current_period_start"], row["current_period_end"]):
                await conn.execute(
                    "UPDATE subscriptions SET current_period_start = $2, current_period_end = $3"
                    " WHERE subscription_id = $1",
                    row["subscription_id"],
                    start,
                    end,
                )
            for period_start in starts:
                inserted = await conn.fetchval(
                    "INSERT INTO subscription_credits (subscription_id, period_start, tokens)"
                    " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING 1",
                    row["subscription_id"],
                    period_start,
                    row["monthly_tokens"],
                )
                if inserted and row["monthly_tokens"] > 0:
                    reference = f"{row['subscription_id']}|{period_start.isoformat()}"
                    await enqueue_credit(
                        conn, row["tenant_id"], "subscription", reference, row["monthly_tokens"]
                    )
                    credited += 1
    return credited


async def relay_pending(pool: asyncpg.Pool, publish: PublishCredit, limit: int = 500) -> int:
    """Publishes pending outbox rows in creation order; returns how many were published.

    Rows are locked (SKIP LOCKED) while published, so relays in several processes share the
    work without publishing one row concurrently.
    """
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "SELECT event_id, payload::text AS payload FROM token_outbox WHERE published_at IS NULL"
            # Only the kinds this version can publish: a newer version's rows (an upgrade's
            # mixed fleet) would otherwise fill every batch and hold the credits behind them.
            " AND payload->>'kind' = ANY($2::text[])"
            " ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED",
            limit,
            RELAYED_KINDS,
        )
        published = []
        for row in rows:
            try:
                change = BalanceChangeRecord.model_validate_json(row["payload"]).root
            except ValidationError as exc:
                # Written by a newer version (a kind this one does not know): left pending for
                # a relay that knows it, and the rest published, not every credit held behind it.
                logger.error("outbox row %s not understood, left pending: %s",
                             row["event_id"], exc)  # fmt: skip
                continue
            await publish(change)
            published.append(row["event_id"])
        if published:
            await conn.execute(
                "UPDATE token_outbox SET published_at = now() WHERE event_id = ANY($1::text[])",
                published,
            )
    return len(published)
