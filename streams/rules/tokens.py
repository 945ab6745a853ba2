"""The token account rule: balance, cycle usage, threshold alerts and the pause at zero. Pure.

* balance = credits - debits - usage, each event counted once by its id (the caller keeps the
  ids seen), so any order and any duplication of events yields the same balance.
* A cycle starts at every credit: its base is the balance right after the credit ("the tokens
  available at the last top-up"); usage in the cycle is measured against that base.
* Alerts fire when the cycle's usage first reaches 50 %, 80 % and 100 % of the base, each once
  per cycle, on the usage event that crosses it.
* A debit (tokens taken back when the money that bought them was refunded) shrinks the cycle's
  base by as much, so the cycle's percentages measure what is left of the top-up.
* A tenant is paused while its balance is zero or less; a credit that makes it positive resumes
  it. A tenant with no account has no tokens and is paused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, get_args

from schemas.tokens import Feature

THRESHOLDS_PERCENT: tuple[int, ...] = (50, 80, 100)


@dataclass(frozen=True, slots=True)
class Pack:
    name: str
    tokens: int
    # In the currency's smallest unit (cents, paise), as Razorpay's Orders API wants it.
    amount_minor: int
    currency: str


def parse_packs(spec: str, currency: str) -> dict[str, Pack]:
    """`name=tokens@price,…` (prices in major units with at most two decimals)."""
    packs: dict[str, Pack] = {}
    for item in spec.split(","):
        name, rest = item.split("=", 1)
        tokens, price = rest.split("@", 1)
        packs[name] = Pack(name, int(tokens), int(Decimal(price) * 100), currency)
    return packs


# The price of a feature TOKEN_PRICES leaves out (it was 0: that feature's AI ran free).
DEFAULT_PRICE = 1


def parse_prices(spec: str) -> dict[str, int]:
    """`feature=tokens,…`: platform tokens charged per AI action; a feature not named costs
    `DEFAULT_PRICE` (`recovery=0` makes one free)."""
    named = {feature: int(tokens) for feature, tokens in (p.split("=", 1) for p in spec.split(","))}
    return {feature: DEFAULT_PRICE for feature in get_args(Feature)} | named


def charge(
    feature: str,
    prompt_tokens: int,
    completion_tokens: int,
    prices: dict[str, int],
    model_tokens_per_token: int,
) -> int:
    """Platform tokens an AI action costs: the feature's price, plus one per
    `model_tokens_per_token` model tokens when that is set (0: flat)."""
    base = prices.get(feature, 0)
    if model_tokens_per_token <= 0:
        return base
    return base + math.ceil((prompt_tokens + completion_tokens) / model_tokens_per_token)


@dataclass(frozen=True, slots=True)
class Account:
    credited: int = 0
    used: int = 0
    cycle_base: int = 0
    cycle_used: int = 0
    alerted: tuple[int, ...] = ()
    cycles: int = 0
    debited: int = 0

    @property
    def balance(self) -> int:
        return self.credited - self.debited - self.used

    @property
    def paused(self) -> bool:
        return self.balance <= 0

    @property
    def cycle_percent(self) -> float:
        if self.cycle_base <= 0:
            return 100.0 if self.cycle_used > 0 else 0.0
        return round(100 * self.cycle_used / self.cycle_base, 2)

    def as_dict(self) -> dict[str, Any]:
        return {
            "credited": self.credited,
            "used": self.used,
            "cycle_base": self.cycle_base,
            "cycle_used": self.cycle_used,
            "alerted": list(self.alerted),
            "cycles": self.cycles,
            "debited": self.debited,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Account:
        if not data:
            return cls()
        return cls(
            credited=data["credited"],
            used=data["used"],
            cycle_base=data["cycle_base"],
            cycle_used=data["cycle_used"],
            alerted=tuple(data["alerted"]),
            cycles=data["cycles"],
            # Absent from accounts stored before debits existed.
            debited=data.get("debited", 0),
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    account: Account
    # The threshold (percent) to alert for this event: the highest it crossed for the first
    # time in the cycle. The lower ones it passed on the way are marked alerted with it but
    # not sent: a top-up's whole cycle spent by one action, or a refund that emptied the
    # balance, sent the 50, 80 and 100 % alerts at once, two of them already out of date.
    alerts: tuple[int, ...] = field(default=())


def spend(account: Account, tokens: int) -> Outcome:
    cycle_used = account.cycle_used + tokens
    crossed: tuple[int, ...] = ()
    # The thresholds ascend: none is newly crossed unless the lowest is reached.
    if len(account.alerted) < len(THRESHOLDS_PERCENT) and _reached(
        cycle_used, account.cycle_base, THRESHOLDS_PERCENT[0]
    ):
        crossed = tuple(
            t
            for t in THRESHOLDS_PERCENT
            if t not in account.alerted and _reached(cycle_used, account.cycle_base, t)
        )
    # Built directly, not with dataclasses.replace: this runs for every usage event (a fifth
    # of the account fold's time went to replace's keyword handling).
    updated = Account(
        credited=account.credited,
        used=account.used + tokens,
        cycle_base=account.cycle_base,
        cycle_used=cycle_used,
        alerted=account.alerted + crossed if crossed else account.alerted,
        cycles=account.cycles,
        debited=account.debited,
    )
    return Outcome(updated, crossed[-1:])


def credit(account: Account, tokens: int) -> Outcome:
    credited = account.credited + tokens
    return Outcome(
        replace(
            account,
            credited=credited,
            cycle_base=max(0, credited - account.debited - account.used),
            cycle_used=0,
            alerted=(),
            cycles=account.cycles + 1,
        )
    )


def debit(account: Account, tokens: int) -> Outcome:
    """Tokens taken back: the cycle's base shrinks, so the thresholds the cycle's use now
    reaches are crossed, and a debit that pauses the tenant is its 100 %. Without them, a
    refund that emptied the balance paused the tenant silently: paused, it used nothing that
    could have alerted."""
    updated = replace(
        account,
        debited=account.debited + tokens,
        cycle_base=max(0, account.cycle_base - tokens),
    )
    crossed = tuple(
        t
        for t in THRESHOLDS_PERCENT
        if t not in account.alerted
        and (
            _reached(updated.cycle_used, updated.cycle_base, t)
            or (t == THRESHOLDS_PERCENT[-1] and updated.paused)
        )
    )
    if crossed:
        updated = replace(updated, alerted=account.alerted + crossed)
    return Outcome(updated, crossed[-1:])


def refund_debit(order_tokens: int, order_amount: int, refunded_before: int, refunded: int) -> int:
    """Tokens a refund of `refunded` (minor units) takes back from an order of `order_tokens`
    for `order_amount`, after refunds of `refunded_before`: the refunded share of the tokens,
    rounded down on the running total, so partial refunds adding up to the whole take back
    exactly the order's tokens and never more."""
    if order_amount <= 0:
        return 0

    def share(amount: int) -> int:
        return order_tokens * min(max(amount, 0), order_amount) // order_amount

    return share(refunded_before + refunded) - share(refunded_before)


def _reached(cycle_used: int, cycle_base: int, percent: int) -> bool:
    if cycle_used <= 0:
        return False
    # Integer arithmetic: 80 % of 7 tokens is reached at 6 (5.6 rounded up), never by rounding.
    return cycle_used * 100 >= percent * cycle_base
