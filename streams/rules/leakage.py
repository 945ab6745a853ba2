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
# times of its unanswered messages ("unanswered_ms", sorted) and the latest reply known to
# precede them ("replied_ms", -1 for none). The inbound messages and the replies are two topics
# read by two handlers, and a channel can deliver a lead's messages out of order (a Meta retry,
# a Gmail poll): these rules decide what a message or a reply read late does to the wait, the
# same whatever order they are read in. Waits written before these rules have no "replied_ms":
# what replies preceded them is unknown, so they never move earlier.

# Unanswered message times a wait keeps (past this, the closest together are thinned out).
UNANSWERED_KEPT = 16


def new_wait(occurred_ms: int, threshold_s: int, replied_ms: int | None) -> dict[str, Any]:
    """The wait a message starts; `replied_ms`, the lead's latest reply before it, if known."""
    return {"waiting_since_ms": occurred_ms, "due_ms": leak_due_ms(occurred_ms, threshold_s),
            "fired": False, "replied_ms": -1 if replied_ms is None else replied_ms,
            "unanswered_ms": [occurred_ms]}  # fmt: skip


def _unanswered(wait: dict[str, Any]) -> list[int]:
    return list(wait.get("unanswered_ms", [wait["waiting_since_ms"]]))


def _threshold_ms(wait: dict[str, Any]) -> int:
    return int(wait["due_ms"] - wait["waiting_since_ms"])


def with_message(wait: dict[str, Any], occurred_ms: int, now_ms: int) -> dict[str, Any] | None:
    """The wait after another message of the lead, or None when it is unchanged (a message read
    again, or one a reply known to precede the wait answered).

    An earlier message read after the one the wait started at becomes its start: left at the
    later one, the leak fired late by the gap. Not once the leak is due (it is being reported,
    under ids of its due time: moved, a crash would report it again under others), nor for a
    wait older than these rules."""
    if occurred_ms <= wait.get("replied_ms", -1):
        return None
    unanswered = _unanswered(wait)
    if occurred_ms in unanswered:
        return None
    unanswered = sorted([*unanswered, occurred_ms])
    if len(unanswered) > UNANSWERED_KEPT:
        # The inner time whose neighbours are nearest goes: a reply read late then leaves
        # the wait late by at most the narrowest gap, never the first or the latest.
        drop = min(range(1, len(unanswered) - 1),
                   key=lambda i: unanswered[i + 1] - unanswered[i - 1])  # fmt: skip
        del unanswered[drop]
    changed = {**wait, "unanswered_ms": unanswered}
    movable = "replied_ms" in wait and not wait["fired"] and now_ms < wait["due_ms"]
    if movable and occurred_ms < wait["waiting_since_ms"]:
        changed["waiting_since_ms"] = occurred_ms
        changed["due_ms"] = occurred_ms + _threshold_ms(wait)
    return changed


def with_earlier_reply(wait: dict[str, Any], sent_ms: int) -> dict[str, Any] | None:
    """The wait after a reply sent before it started (no answer to it, but to any earlier
    message read later), or None when it is unchanged."""
    if "replied_ms" not in wait or sent_ms <= wait["replied_ms"]:
        return None
    return {**wait, "replied_ms": sent_ms,
            "unanswered_ms": [t for t in _unanswered(wait) if t > sent_ms]}  # fmt: skip


def after_reply(wait: dict[str, Any], sent_ms: int) -> dict[str, Any] | None:
    """What is left of the wait after a reply sent at `sent_ms`, at or after its start: a wait
    for the lead's messages written after the reply but read before it, from the earliest of
    them, else None (all answered). Ended for good instead, the lead's follow-up was never
    waited on, and never leaked. It keeps the answered wait's threshold until the tenant's
    current one is known (`with_threshold`)."""
    remaining = [t for t in _unanswered(wait) if t > sent_ms]
    if not remaining:
        return None
    return {"waiting_since_ms": remaining[0], "due_ms": remaining[0] + _threshold_ms(wait),
            "fired": False, "replied_ms": sent_ms, "unanswered_ms": remaining}  # fmt: skip


def with_threshold(wait: dict[str, Any], threshold_s: int, now_ms: int) -> dict[str, Any] | None:
    """The wait due `threshold_s` after its start, or None when unchanged; not once it fired
    or is due (its leak is being reported under its due time's ids, see `with_message`)."""
    due_ms = wait["waiting_since_ms"] + threshold_s * 1000
    if wait["fired"] or now_ms >= wait["due_ms"] or due_ms == wait["due_ms"]:
        return None
    return {**wait, "due_ms": due_ms}
