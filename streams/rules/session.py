"""The sessions table's rule: how one inbound message changes a lead's session.

The state is a plain dict so it travels through Faust's JSON changelog unchanged.
"""

from __future__ import annotations

from typing import TypedDict

# Enough to absorb a channel's retries (Meta retries for hours, but the same message id
# arriving after 64 newer messages of the same lead is not a retry any platform makes).
RECENT_IDS_KEPT = 64


class SessionState(TypedDict):
    lead_id: str
    tenant_id: str
    channel: str
    contact: str
    contact_name: str | None
    # The business account (WhatsApp phone_number_id, page id) the customer last wrote to:
    # replies go out from it.
    account_id: str | None
    first_message_ms: int
    last_customer_message_ms: int
    last_event_ms: int
    message_count: int
    recent_event_ids: list[str]


def apply_inbound(
    state: SessionState | None,
    *,
    event_id: str,
    lead_id: str,
    tenant_id: str,
    channel: str,
    contact: str,
    contact_name: str | None,
    occurred_ms: int,
    account_id: str | None = None,
) -> SessionState | None:
    """The session after an inbound message, or None when the message was already applied.

    Messages may arrive out of order (a retried webhook, a late connector), so times are maxima
    and minima rather than "the latest wins".
    """
    if state is None:
        return SessionState(
            lead_id=lead_id,
            tenant_id=tenant_id,
            channel=channel,
            contact=contact,
            contact_name=contact_name,
            account_id=account_id,
            first_message_ms=occurred_ms,
            last_customer_message_ms=occurred_ms,
            last_event_ms=occurred_ms,
            message_count=1,
            recent_event_ids=[event_id],
        )
    if event_id in state["recent_event_ids"]:
        return None
    recent = [*state["recent_event_ids"], event_id]
    return SessionState(
        lead_id=state["lead_id"],
        tenant_id=state["tenant_id"],
        channel=state["channel"],
        contact=state["contact"],
        contact_name=contact_name or state["contact_name"],
        account_id=(
            account_id
            if account_id and occurred_ms >= state["last_customer_message_ms"]
            else state.get("account_id")
        ),
        first_message_ms=min(state["first_message_ms"], occurred_ms),
        last_customer_message_ms=max(state["last_customer_message_ms"], occurred_ms),
        last_event_ms=max(state["last_event_ms"], occurred_ms),
        message_count=state["message_count"] + 1,
        recent_event_ids=recent[-RECENT_IDS_KEPT:],
    )


def read_too_late(occurred_ms: int, received_ms: int, stale_after_ms: int) -> bool:
    """Whether a customer message reached us so long after it was written that acting on it
    now would be acting on the past (a mailbox's week of mail imported when it is connected,
    a channel's retries after a long outage): it is kept and listed, but no AI answers it, no
    wait for a rep starts and no silence is counted from it. `stale_after_ms` 0: never."""
    return stale_after_ms > 0 and received_ms - occurred_ms > stale_after_ms
