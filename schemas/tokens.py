"""Token economy events: usage (an AI action spent tokens), credits (tokens bought or granted)
and the tenant status every worker reads before an AI action.

Usage and credits are keyed by tenant on co-partitioned topics, so one worker owns a tenant's
account. Their `event_id`s are derived from what caused them (the inbound message, the
payment id, the subscription cycle), so a replay or a racing duplicate carries the same id
and the account counts it once.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, RootModel

from schemas.events import Event
from schemas.ids import name_based_id

Feature = Literal["qualification", "reengagement", "recovery"]
# refund_failed: a refund that failed after its tokens were taken back gives them again.
CreditSource = Literal["purchase", "subscription", "trial", "adjustment", "refund_failed"]
# What takes tokens back: money returned to the customer, by a refund or a lost dispute.
DebitSource = Literal["refund", "chargeback"]

# The most tokens one event can move. Account balances are sums of these kept as JSON integers
# (at most 2**64, orjson's limit): an event of 10**20 tokens made the account's write fail at
# every restart. 10**12 is millions of times a real purchase and leaves room for 10**7 of them.
MAX_TOKENS_PER_EVENT = 10**12

_CREDIT_NAMESPACE = uuid.UUID("8f7f8a52-1d8e-4d7b-9d5e-4b0a3b8f6c21")


def credit_event_id(tenant_id: str, source: CreditSource | DebitSource, reference: str) -> str:
    """One credit per tenant and payment id (or subscription cycle, trial, adjustment
    reference): the verify call and the webhook derive the same id."""
    return name_based_id(_CREDIT_NAMESPACE, f"{tenant_id}|{source}|{reference}")


class TokenUsage(Event):
    kind: Literal["token_usage"] = "token_usage"
    feature: Feature
    lead_id: str | None = Field(None, max_length=64)
    model: str | None = Field(None, max_length=100, description="None: the built-in extractor")
    prompt_tokens: int = Field(0, ge=0, le=MAX_TOKENS_PER_EVENT)
    completion_tokens: int = Field(0, ge=0, le=MAX_TOKENS_PER_EVENT)
    tokens: int = Field(ge=0, le=MAX_TOKENS_PER_EVENT, description="platform tokens charged")


class TokenCredit(Event):
    kind: Literal["token_credit"] = "token_credit"
    source: CreditSource
    reference: str = Field(min_length=1, max_length=128, description="payment id, cycle, …")
    tokens: int = Field(gt=0, le=MAX_TOKENS_PER_EVENT)


class TokenDebit(Event):
    """Tokens taken back because the money that bought them went back (a refund, a lost
    dispute). On the credits topic, through the same outbox, and never below zero by itself:
    a balance it makes zero or negative pauses the tenant."""

    kind: Literal["token_debit"] = "token_debit"
    source: DebitSource
    reference: str = Field(min_length=1, max_length=128, description="refund or dispute id")
    tokens: int = Field(gt=0, le=MAX_TOKENS_PER_EVENT)


# What the credits topic (and the outbox behind it) carries.
BalanceChange = TokenCredit | TokenDebit
TokenEvent = TokenUsage | TokenCredit | TokenDebit


class BalanceChangeRecord(RootModel[Annotated[BalanceChange, Field(discriminator="kind")]]):
    """A credits-topic record, either kind (what the ledger sink decodes)."""

    @property
    def tenant_id(self) -> str:
        # The key a record the ledger refuses is dead-lettered under, as for the other sinks.
        return self.root.tenant_id


class TenantStatus(BaseModel):
    """A tenant's account as every worker sees it (latest record per tenant, compacted)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant_id: str
    balance: int
    paused: bool
    updated_at: AwareDatetime
