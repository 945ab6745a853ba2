"""Lead leakage: when an unanswered customer becomes a leak, how hot it is, and what to do.

Temperature, one rule over the qualification score and the customer's recency:
* HOT  — score ≥ 70, or score ≥ 40 and the customer wrote again while waiting;
* WARM — score ≥ 30, or the customer wrote again while waiting;
* COLD — everything else (no or low qualification, a single unanswered message).

Actions: HOT gets an AI re-engagement message at once, WARM is reassigned to another SDR,
COLD is escalated to the tenant's admins.
"""

from __future__ import annotations

from typing import Any

ACTIONS = {"HOT": "ai_reengagement", "WARM": "reassign", "COLD": "escalate_admins"}

REENGAGEMENT_TEXT = (
    "Sorry for keeping you waiting! I'm here now — could you tell me a little more about "
    "what you need so we can help right away?"
)


def leak_due_ms(first_unanswered_ms: int, threshold_s: int) -> int:
    """The wait starts at the first unanswered message; later messages do not move it."""
    return first_unanswered_ms + threshold_s * 1000


def temperature(score: float | None, followed_up: bool) -> str:
    value = score or 0.0
    if value >= 70 or (value >= 40 and followed_up):
        return "HOT"
    if value >= 30 or followed_up:
        return "WARM"
    return "COLD"


# A lead's wait, as the leakage table keeps it: {"waiting_since_ms", "due_ms", "fired"}, the
# latest unanswered message's time once a later one was read ("latest_ms"), and the latest
# reply known to precede it ("replied_ms"). The inbound messages and the replies are two topics
# read by two handlers, and a channel can deliver a lead's messages out of order (a Meta retry,
# a Gmail poll): these decide what a message or a reply read late does to it.


def _latest_ms(wait: dict[str, Any]) -> int:
    return int(wait.get("latest_ms", wait["waiting_since_ms"]))


def with_message(wait: dict[str, Any], occurred_ms: int) -> dict[str, Any] | None:
    """The wait after another unanswered message of the lead, or None when it is unchanged.

    An earlier message read after the one the wait started at is its start (left at the later
    one, the leak fired late by the gap), unless the leak fired already or a reply is known to
    have come after it. A later one is remembered: a reply read after it, but sent before it,
    leaves it waited on (`after_reply`)."""
    if occurred_ms > _latest_ms(wait):
        return {**wait, "latest_ms": occurred_ms}
    if wait["fired"] or occurred_ms >= wait["waiting_since_ms"]:
        return None
    if occurred_ms <= wait.get("replied_ms", -1):
        return None  # answered: the reply before the wait came after it
    threshold_ms = wait["due_ms"] - wait["waiting_since_ms"]
    return {**wait, "waiting_since_ms": occurred_ms, "due_ms": occurred_ms + threshold_ms,
            "latest_ms": _latest_ms(wait)}  # fmt: skip


def after_reply(wait: dict[str, Any], sent_ms: int) -> dict[str, Any] | None:
    """What is left of the wait after a reply sent at `sent_ms`, at or after its start: a wait
    for the lead's message written after the reply but read before it, else None (answered).

    That wait starts at the latest message, the only later one known: one between the reply
    and it, read later, moves it earlier (`with_message`). Ended for good instead, the lead's
    follow-up was never waited on, and never leaked."""
    latest_ms = _latest_ms(wait)
    if latest_ms <= sent_ms:
        return None
    threshold_ms = wait["due_ms"] - wait["waiting_since_ms"]
    return {"waiting_since_ms": latest_ms, "due_ms": latest_ms + threshold_ms, "fired": False,
            "replied_ms": sent_ms}  # fmt: skip
