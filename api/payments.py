"""A Razorpay payment confirmed (and captured, for an account capturing manually) and its order
credited: for the checkout's verify and for the capture sweep.

The checkout's signature says only that a payment was authorised. An authorisation never
captured is refunded to the customer by Razorpay after 3 days (its default), so no token is
credited before Razorpay says the payment is captured for the order. A customer who closes
the checkout before it calls verify (or whose bank authorises late) leaves an authorised
payment that only its `payment.authorized` webhook tells of: the sweep captures those.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import asyncpg
from prometheus_client import Counter as MetricCounter

from connectors.razorpay import PaymentCheck, PaymentProviderError, RazorpayGateway
from flexoraa.credits import PaidOrder, claim_capture, credit_paid_order, take_over_capture
from flexoraa.db import DB_ERRORS

logger = logging.getLogger(__name__)

Outcome = Literal["credited", "already_credited", "paid_twice"]

# Razorpay refunds an authorised payment not captured within this long (its default capture
# timeout): the sweep looks no further back.
CAPTURE_WINDOW = timedelta(days=3)
# A payment the sweep could not settle (Razorpay unreachable, another payment's capture under
# way) is asked again after the sweep's interval, doubled per attempt up to this.
MAX_SWEEP_BACKOFF = timedelta(hours=1)
# Payments judged per pass: each may take a few Razorpay calls.
SWEEP_BATCH = 50
# Orders a pass judges at once. Each judgement is up to three Razorpay calls, made in the
# default thread pool (the SDK blocks): one at a time, a backlog of thousands of
# authorisations (a sweep switched on late, an outage) took hours.
SWEEP_CONCURRENCY = 4
# How long a payment being judged is kept from other API processes' sweeps: longer than the
# few Razorpay calls of a judgement (each at most RAZORPAY_TIMEOUT_S, 30 s).
SWEEP_LEASE = timedelta(minutes=5)

CAPTURE_SWEEPS = MetricCounter(
    "flexoraa_payment_capture_sweeps",
    "Authorised payments the capture sweep judged, by outcome",
    ["outcome"],
)
# At zero from the start: the alert's increase() sees the first (a series born at 1 does not).
for _outcome in ("pending", "failed"):
    CAPTURE_SWEEPS.labels(_outcome)


class CapturePending(Exception):
    """The payment's capture cannot be done or told yet: another payment of the order holds
    the capture claim (or cannot be checked), or this one's capture is still under way."""


class PaymentNotCredited(Exception):
    """Razorpay says the payment is nothing to credit for the order (failed, refunded, another
    order or amount, the order paid by another payment); the reason is kept on the order."""


@dataclass(frozen=True)
class Confirmed:
    outcome: Outcome
    order_id: str
    tokens: int


def outcome_of(paid: PaidOrder | None) -> Outcome:
    if paid is not None and paid.paid_twice:
        return "paid_twice"
    return "credited" if paid is not None and paid.newly_credited else "already_credited"


async def confirm_and_credit(
    pool: asyncpg.Pool, razorpay: RazorpayGateway, order_id: str, payment_id: str
) -> Confirmed:
    """The payment confirmed captured for the order, captured here if it is only authorised
    and holds the order's capture claim, then credited.

    Raises CapturePending, PaymentNotCredited, or PaymentProviderError (Razorpay did not
    answer, or refused the request)."""
    order = await pool.fetchrow(
        "SELECT tokens, amount, currency, status, payment_id FROM payment_orders"
        " WHERE order_id = $1",
        order_id,
    )
    assert order is not None  # read by the caller; orders are never deleted
    if order["status"] == "paid" and order["payment_id"] == payment_id:
        # Credited before (this call again, or the webhook first): no need to ask Razorpay.
        return Confirmed("already_credited", order_id, order["tokens"])
    check = await razorpay.payment_check(payment_id, order_id, order["amount"], order["currency"])
    if check.verdict == "capture":
        # Authorised only (an account capturing manually): captured here if this payment
        # holds the order's capture claim, renewed right before the request.
        if order["status"] == "paid" or not await _claim_capture(
            pool, razorpay, order_id, payment_id, order["amount"], order["currency"]
        ):
            # Paid meanwhile by this very payment (a verify sent twice, the other captured and
            # credited it first): credited, not the 409 that invited a second payment.
            paid_by = await pool.fetchval(
                "SELECT payment_id FROM payment_orders WHERE order_id = $1 AND status = 'paid'",
                order_id,
            )
            if paid_by == payment_id:
                return Confirmed("already_credited", order_id, order["tokens"])
            check = PaymentCheck("refuse", "the order is paid already: authorisation not captured")
        else:
            check = await razorpay.capture(payment_id, order_id, order["amount"], order["currency"])
            if check.verdict == "capture":
                # Still authorised: its capture under way in another call, or not done.
                raise CapturePending(f"payment {payment_id} not captured yet")
    if check.verdict != "credit":
        await pool.execute(
            "UPDATE payment_orders SET failure_reason = $2, updated_at = now()"
            " WHERE order_id = $1 AND status <> 'paid'",
            order_id,
            check.reason[:500],
        )
        raise PaymentNotCredited(check.reason)
    async with pool.acquire() as conn, conn.transaction():
        paid = await credit_paid_order(conn, order_id, payment_id)
    assert paid is not None  # the order exists: we just read it
    return Confirmed(outcome_of(paid), paid.order_id, paid.tokens)


async def _claim_capture(
    pool: asyncpg.Pool,
    razorpay: RazorpayGateway,
    order_id: str,
    payment_id: str,
    amount: int,
    currency: str,
) -> bool:
    """Whether this payment may be captured now: True once it holds the order's capture
    claim; False when the order is paid (by another payment, credited here if Razorpay
    reports the claimant captured). CapturePending while that cannot be told.

    A retried checkout leaves two authorised payments of one order; both captured, the
    customer is charged twice. The claim names the payment being captured, and another is
    captured only once Razorpay says the claimant is not, even when the claimant's capture
    timed out here and may have landed there."""
    async with pool.acquire() as conn:
        claim = await claim_capture(conn, order_id, payment_id)
    if claim.held or claim.paid:
        return claim.held
    holder = claim.holder
    assert holder is not None  # an unpaid order claimed by none is claimed above
    try:
        held = await razorpay.payment_check(holder, order_id, amount, currency)
    except PaymentProviderError as exc:
        # A refusal too (a rate limit, a key problem): whether the claimant was captured
        # cannot be told, and taking its claim over could charge the customer twice.
        raise CapturePending(f"payment {holder} of the order cannot be checked: {exc}") from exc
    if held.verdict == "credit":
        async with pool.acquire() as conn, conn.transaction():
            await credit_paid_order(conn, order_id, holder)
        return False
    async with pool.acquire() as conn:
        # Still authorised: its capture may be under way this moment; taken over only stale.
        # Failed or refunded: never captured for this order, taken over at once.
        if await take_over_capture(
            conn, order_id, payment_id, holder, stale_only=held.verdict == "capture"
        ):
            return True
    raise CapturePending(f"payment {holder} of the order is being captured")


async def sweep_authorised(
    pool: asyncpg.Pool,
    razorpay: RazorpayGateway,
    *,
    older_than: timedelta,
    retry_after: timedelta,
    limit: int = SWEEP_BATCH,
) -> Counter[str]:
    """One pass: each authorised payment (told by its webhook more than `older_than` ago,
    within Razorpay's capture window) of an order still unpaid, not settled by an earlier
    pass and not waiting for its retry, is confirmed and credited like a verify would.
    Returns the outcomes counted.

    Settled, never asked again: credited, or Razorpay says there is nothing to credit. Any
    other outcome is asked again after `retry_after`, doubled per attempt up to an hour: a
    capture under way, Razorpay unreachable, and Razorpay refusing the request too (a rate
    limit, a key being rotated: settled on those, every due authorisation would lapse)."""
    candidates = await pool.fetch(
        """SELECT payment_id, order_id FROM (
               SELECT DISTINCT ON (e.payment_id) e.payment_id, e.order_id,
                      coalesce(s.next_attempt_at, e.received_at) AS due
                 FROM payment_events e
                 JOIN payment_orders o ON o.order_id = e.order_id
                 LEFT JOIN payment_capture_sweeps s ON s.payment_id = e.payment_id
                WHERE e.event_type = 'payment.authorized' AND e.payment_id IS NOT NULL
                  AND e.received_at < now() - $1::interval
                  AND e.received_at > now() - $2::interval
                  AND o.status <> 'paid'
                  AND (s.payment_id IS NULL OR (NOT s.settled AND s.next_attempt_at <= now()))
                ORDER BY e.payment_id, e.received_at
           ) due_now
           ORDER BY due  -- the longest waiting first: one that keeps failing holds no other
           LIMIT $3""",
        older_than,
        CAPTURE_WINDOW,
        limit,
    )
    # Orders judged side by side (each judgement waits on Razorpay for most of its time), an
    # order's payments one after another: the second of a retried checkout then finds the
    # first's capture claim settled, not held (it would wait for a retry).
    by_order: dict[str, list[str]] = defaultdict(list)
    for candidate in candidates:
        by_order[candidate["order_id"]].append(candidate["payment_id"])
    outcomes: Counter[str] = Counter()
    slots = asyncio.Semaphore(SWEEP_CONCURRENCY)

    async def sweep_order(order_id: str, payment_ids: list[str]) -> None:
        async with slots:
            for payment_id in payment_ids:
                outcome = await _sweep_one(pool, razorpay, order_id, payment_id, retry_after)
                if outcome is not None:
                    outcomes[outcome] += 1

    # Every order's judgement ends before the pass does (a database error raised at once
    # would leave the others running into the next pass).
    failures = await asyncio.gather(
        *(sweep_order(o, ids) for o, ids in by_order.items()), return_exceptions=True
    )
    for failure in failures:
        if isinstance(failure, BaseException):
            raise failure
    return outcomes


async def _sweep_one(
    pool: asyncpg.Pool,
    razorpay: RazorpayGateway,
    order_id: str,
    payment_id: str,
    retry_after: timedelta,
) -> str | None:
    """Leases, judges and records one payment: its outcome, or None if another process has
    it."""
    # Leased first: another API process sweeping now skips it (one set of Razorpay calls, one
    # attempt counted); one that dies mid-judgement leaves it to the next after the lease.
    leased = await pool.fetchval(
        """INSERT INTO payment_capture_sweeps AS s
               (payment_id, order_id, attempts, outcome, settled, next_attempt_at)
           VALUES ($1, $2, 0, 'sweeping', false, now() + $3::interval)
           ON CONFLICT (payment_id) DO UPDATE SET next_attempt_at = now() + $3::interval
               WHERE NOT s.settled AND s.next_attempt_at <= now()
           RETURNING 1""",
        payment_id, order_id, SWEEP_LEASE,
    )  # fmt: skip
    if leased is None:
        return None
    outcome, settled, reason = await _judge(pool, razorpay, order_id, payment_id)
    await pool.execute(
        """UPDATE payment_capture_sweeps SET
               attempts = attempts + 1, outcome = $2, reason = $3, settled = $4,
               -- The exponent capped: past about 2^38 the interval overflows.
               next_attempt_at = now() + least($5::interval * 2 ^ least(attempts, 16),
                                               $6::interval),
               updated_at = now()
           WHERE payment_id = $1""",
        payment_id, outcome, reason[:500], settled, retry_after, MAX_SWEEP_BACKOFF,
    )  # fmt: skip
    CAPTURE_SWEEPS.labels(outcome).inc()
    return outcome


async def _judge(
    pool: asyncpg.Pool, razorpay: RazorpayGateway, order_id: str, payment_id: str
) -> tuple[str, bool, str]:
    """(outcome, settled, reason) of one swept payment."""
    try:
        confirmed = await confirm_and_credit(pool, razorpay, order_id, payment_id)
    except PaymentNotCredited as exc:
        logger.warning("capture sweep: payment %s of order %s not credited: %s",
                       payment_id, order_id, exc)  # fmt: skip
        return "refused", True, str(exc)
    except (CapturePending, PaymentProviderError) as exc:
        logger.warning("capture sweep: payment %s of order %s pending: %s",
                       payment_id, order_id, exc)  # fmt: skip
        return "pending", False, str(exc)
    except Exception as exc:
        # A database error, a bug: this payment waits for its retry, the others go on.
        logger.exception("capture sweep: payment %s of order %s failed", payment_id, order_id)
        return "failed", False, repr(exc)
    logger.info("capture sweep: payment %s of order %s %s (%d tokens)",
                payment_id, order_id, confirmed.outcome, confirmed.tokens)  # fmt: skip
    return confirmed.outcome, True, ""


async def run_capture_sweeps(
    pool: asyncpg.Pool, razorpay: RazorpayGateway, *, interval_s: float, older_than_s: float
) -> None:
    """Sweeps every `interval_s` until cancelled; a pass that fails is logged and retried at
    the next."""
    older_than, retry_after = timedelta(seconds=older_than_s), timedelta(seconds=interval_s)
    while True:
        try:
            while sum((await sweep_authorised(
                pool, razorpay, older_than=older_than, retry_after=retry_after,
            )).values()) == SWEEP_BATCH:  # fmt: skip
                pass  # a full batch: more may be waiting
        except DB_ERRORS as exc:
            logger.warning("capture sweep failed (%r); retried in %.0f s", exc, interval_s)
        # Whatever else went wrong: a dead sweep would leave every later authorisation to
        # lapse, so it is logged and the sweep goes on.
        except Exception:
            logger.exception("capture sweep failed; retried in %.0f s", interval_s)
        await asyncio.sleep(interval_s)
