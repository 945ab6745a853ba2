"""The token rule (balance, cycles, thresholds, pause), pricing, packs and Razorpay signatures."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectors.razorpay import RazorpayGateway, check_payment, webhook_signature_valid
from flexoraa.credits import add_month, months_after
from flexoraa.settings import Settings
from streams.rules.tokens import (
    Account,
    Pack,
    charge,
    credit,
    debit,
    parse_packs,
    parse_prices,
    refund_debit,
    spend,
)


def test_default_packs_are_the_seeds() -> None:
    packs = parse_packs(Settings().token_packs, "USD")
    assert [(p.tokens, p.amount_minor) for p in packs.values()] == [
        (100, 5000), (500, 20000), (1000, 35000), (5000, 150000),
    ]  # fmt: skip
    assert packs["pro"] == Pack("pro", 1000, 35000, "USD")


def test_prices_are_flat_per_action_or_add_model_tokens() -> None:
    prices = parse_prices("qualification=2,recovery=1")
    assert charge("qualification", 900, 300, prices, 0) == 2
    # One extra platform token per started 1000 model tokens.
    assert charge("qualification", 900, 300, prices, 1000) == 4
    assert charge("unknown", 0, 0, prices, 0) == 0


def test_a_new_tenant_is_paused_until_credited() -> None:
    assert Account().paused
    assert not credit(Account(), 10).account.paused


def test_thresholds_fire_once_per_cycle_on_the_crossing_event() -> None:
    account = credit(Account(), 10).account
    crossed = []
    for _ in range(12):
        outcome = spend(account, 1)
        account = outcome.account
        crossed.append(outcome.alerts)
    assert crossed[3] == ()
    assert crossed[4] == (50,)
    assert crossed[7] == (80,)  # 8 of 10
    assert crossed[9] == (100,)  # 10 of 10: paused
    assert [a for a in crossed if a] == [(50,), (80,), (100,)]
    assert account.paused
    assert account.balance == -2


def test_a_top_up_starts_a_new_cycle_against_the_tokens_then_available() -> None:
    account = spend(credit(Account(), 10).account, 6).account  # 50 % alerted
    account = credit(account, 100).account  # 104 available
    assert (account.cycle_base, account.cycle_used, account.alerted) == (104, 0, ())
    outcome = spend(account, 52)
    assert outcome.alerts == (50,)
    assert outcome.account.cycle_percent == 50.0


def test_an_event_crossing_several_thresholds_alerts_the_highest_once() -> None:
    outcome = spend(credit(Account(), 10).account, 10)
    assert outcome.alerts == (100,)
    assert outcome.account.alerted == (50, 80, 100)  # none of them again this cycle
    assert spend(outcome.account, 1).alerts == ()


def test_account_round_trips_through_the_table_encoding() -> None:
    account = debit(spend(credit(Account(), 7).account, 6).account, 1).account
    assert Account.from_dict(account.as_dict()) == account
    # Stored before debits existed: read as none.
    stored = {k: v for k, v in account.as_dict().items() if k != "debited"}
    assert Account.from_dict(stored).debited == 0


def test_a_debit_crossing_a_threshold_alerts_it() -> None:
    account = spend(credit(Account(), 100).account, 60).account  # 60 %: 50 alerted
    assert account.alerted == (50,)
    outcome = debit(account, 20)  # 60 of 80: 75 %
    assert outcome.alerts == ()
    outcome = debit(outcome.account, 5)  # 60 of 75: 80 %
    assert (outcome.alerts, outcome.account.paused) == ((80,), False)
    # A pause with nothing used this cycle is still its 100 %.
    fresh = debit(credit(Account(), 100).account, 100)
    assert (fresh.alerts, fresh.account.paused) == ((100,), True)


def test_a_debit_takes_tokens_back_and_shrinks_the_cycle() -> None:
    account = spend(credit(Account(), 100).account, 20).account  # 20 % of the cycle used
    refunded = debit(account, 50).account
    assert (refunded.balance, refunded.cycle_base, refunded.cycle_percent) == (30, 50, 40.0)
    assert refunded.alerted == account.alerted
    refund = debit(refunded, 50)
    emptied = refund.account
    assert (emptied.balance, emptied.cycle_base, emptied.paused) == (-20, 0, True)
    # Paused by the refund: its alerts now, or never (paused, nothing is used to cross them).
    assert refund.alerts == (100,)
    assert emptied.alerted == (50, 80, 100)
    # A credit after a debit measures its cycle from the balance then available.
    assert credit(emptied, 70).account.cycle_base == 50


@given(
    tokens=st.integers(1, 10_000),
    amount=st.integers(100, 10**7),
    cuts=st.lists(st.integers(0, 10**7), max_size=8),
)
def test_partial_refunds_adding_up_to_the_price_take_back_exactly_the_pack(
    tokens: int, amount: int, cuts: list[int]
) -> None:
    points = sorted({min(c, amount) for c in cuts} | {0, amount})
    parts = [b - a for a, b in itertools.pairwise(points)]
    taken, refunded = [], 0
    for part in parts:
        taken.append(refund_debit(tokens, amount, refunded, part))
        refunded += part
    assert sum(taken) == tokens
    assert all(t >= 0 for t in taken)
    # Refunding more than the price takes nothing more.
    assert refund_debit(tokens, amount, amount, 500) == 0
    assert refund_debit(tokens, amount, 0, amount + 500) == tokens


def test_refund_shares_round_down() -> None:
    assert refund_debit(1000, 35000, 0, 10000) == 285  # 285.7
    assert refund_debit(1000, 35000, 10000, 25000) == 715


PAYMENT = {"id": "pay_1", "order_id": "order_1", "amount": 5000, "currency": "USD",
           "status": "captured", "amount_refunded": 0}  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "verdict", "reason"),
    [
        ({}, "credit", ""),
        ({"status": "authorized"}, "capture", ""),
        ({"status": "failed"}, "refuse", "payment is failed"),
        ({"status": "created"}, "refuse", "payment is created"),
        ({"status": "refunded", "amount_refunded": 5000}, "refuse", "refunded"),
        ({"amount_refunded": 100}, "refuse", "refunded"),
        ({"order_id": "order_2"}, "refuse", "is not of order order_1"),
        ({"amount": 4999}, "refuse", "does not match"),
        ({"currency": "INR"}, "refuse", "does not match"),
        ({"status": None}, "refuse", "payment is None"),
    ],
)
def test_a_payment_is_credited_only_captured_for_its_order(
    changes: dict[str, object], verdict: str, reason: str
) -> None:
    check = check_payment(PAYMENT | changes, "order_1", 5000, "USD")
    assert check.verdict == verdict
    assert reason in check.reason


usage_or_credit = st.tuples(st.sampled_from(["usage", "credit", "debit"]), st.integers(0, 500))


@given(
    events=st.lists(usage_or_credit, max_size=40),
    order=st.randoms(use_true_random=False),
    duplicates=st.lists(st.integers(0, 39), max_size=20),
)
def test_any_order_and_duplication_gives_the_same_balance(
    events: list[tuple[str, int]], order: object, duplicates: list[int]
) -> None:
    """The account agent's fold: each event id counted once, whatever the order."""
    identified = [(f"e{i}", kind, tokens) for i, (kind, tokens) in enumerate(events)]
    delivered = identified + [identified[i] for i in duplicates if i < len(identified)]
    order.shuffle(delivered)  # type: ignore[attr-defined]

    def fold(stream: list[tuple[str, str, int]]) -> Account:
        account, seen = Account(), set()
        for event_id, kind, tokens in stream:
            if event_id in seen:
                continue
            seen.add(event_id)
            if kind == "usage":
                account = spend(account, tokens).account
            elif tokens > 0:
                change = credit if kind == "credit" else debit
                account = change(account, tokens).account
        return account

    expected = sum(t for _, k, t in identified if k == "credit") - sum(
        t for _, k, t in identified if k != "credit"
    )
    replayed = fold(delivered)
    assert replayed.balance == fold(identified).balance == expected
    assert replayed.paused == (expected <= 0)


# Vectors computed independently with `openssl dgst -sha256 -hmac <secret>`.
WEBHOOK_BODY = b'{"entity":"event","event":"payment.captured"}'
WEBHOOK_SECRET = "whsec_test_123"
WEBHOOK_SIGNATURE = "afab959aab684b042f79999eee67e3974f7ed3628acb0aeac7d6fce6210d23fd"


def test_webhook_signature_vector() -> None:
    assert webhook_signature_valid(WEBHOOK_BODY, WEBHOOK_SIGNATURE, WEBHOOK_SECRET)


@pytest.mark.parametrize(
    ("body", "signature", "secret"),
    [
        (WEBHOOK_BODY + b" ", WEBHOOK_SIGNATURE, WEBHOOK_SECRET),  # body changed
        (WEBHOOK_BODY, WEBHOOK_SIGNATURE[:-1] + "0", WEBHOOK_SECRET),  # signature changed
        (WEBHOOK_BODY, WEBHOOK_SIGNATURE, "rzp_key_secret"),  # the API secret, not the webhook's
        (WEBHOOK_BODY, None, WEBHOOK_SECRET),
        (WEBHOOK_BODY, "", WEBHOOK_SECRET),
        # Non-ASCII text raised TypeError in compare_digest: a 500 anyone could cause.
        (WEBHOOK_BODY, "\xe9" * 64, WEBHOOK_SECRET),
    ],
)
def test_tampered_webhook_signatures_are_refused(
    body: bytes, signature: str | None, secret: str
) -> None:
    assert not webhook_signature_valid(body, signature, secret)


def test_checkout_signature_vector_and_tampering() -> None:
    gateway = RazorpayGateway(
        Settings(razorpay_key_id="rzp_test_1", razorpay_key_secret="EnLs21M47BllR3X8PSFtjtbd")
    )
    signature = "c7a6b6e37e5fb8b5387cd93cff2f9cedbf5cb78112fd50292c56b4cecb49b80d"
    assert gateway.payment_signature_valid("order_IluGWxBm9U8zJ8", "pay_IH4NVgf4Dreq1l", signature)
    # The same signature presented for another order (a client swapping order ids) fails.
    assert not gateway.payment_signature_valid(
        "order_OTHERxBm9U8zJ8", "pay_IH4NVgf4Dreq1l", signature
    )
    assert not gateway.payment_signature_valid(
        "order_IluGWxBm9U8zJ8", "pay_IH4NVgf4Dreq1m", signature
    )
    for garbled in ("\xe9", "é" * 64, signature + " ", ""):
        assert not gateway.payment_signature_valid("order_IluGWxBm9U8zJ8", "pay_1", garbled)


def test_subscription_cycles_advance_by_calendar_month() -> None:
    assert add_month(datetime(2026, 1, 31, 9, tzinfo=UTC)) == datetime(2026, 2, 28, 9, tzinfo=UTC)
    assert add_month(datetime(2026, 12, 15, tzinfo=UTC)) == datetime(2027, 1, 15, tzinfo=UTC)


def test_cycles_end_on_the_anchors_day_not_a_drifting_one() -> None:
    # From Jan 31: Feb 28, then Mar 31 (a month after Feb 28 was Mar 28, and every later
    # cycle ended on the 28th, three days short).
    anchor = datetime(2026, 1, 31, 9, tzinfo=UTC)
    assert [months_after(anchor, n).date().isoformat() for n in range(1, 5)] == [
        "2026-02-28", "2026-03-31", "2026-04-30", "2026-05-31",
    ]  # fmt: skip
    assert months_after(datetime(2026, 11, 15, tzinfo=UTC), 14) == datetime(2028, 1, 15, tzinfo=UTC)
