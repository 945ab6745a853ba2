"""Lead leakage: when an unanswered customer becomes a leak, how hot it is, and what to do.

Temperature, one rule over the qualification score and the customer's recency:
* HOT  — score ≥ 70, or score ≥ 40 and the customer wrote again while waiting;
* WARM — score ≥ 30, or the customer wrote again while waiting;
* COLD — everything else (no or low qualification, a single unanswered message).

Actions: HOT gets an AI re-engagement message at once, WARM is reassigned to another SDR,
COLD is escalated to the tenant's admins.
"""

from __future__ import annotations

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
